"""``--audit-format ecs``: the native records mapped to the Elastic Common Schema (ECS_VERSION).

One table per record type (:class:`egressd.auditformats_map.Event`); a native field without an ECS field goes
under ``egressd.*`` with its own name. docs/forensics.md has the same tables, and a test compares them.
"""

from __future__ import annotations

from egressd import records as audit
from egressd.auditformats_map import (
    PRODUCT,
    Event,
    Fields,
    Mapped,
    at,
    host_ip,
    http_version_number,
    is_ip,
    url_place,
)

ECS_VERSION = "8.11.0"

_OUTCOME = {"allow": "success", "deny": "failure"}
_DECISION = {v: k for k, v in _OUTCOME.items()}


def _source(fields: Fields, kind: str, category: tuple[str, ...] = ("network",)) -> Fields:
    ip, port = host_ip(fields.get(audit.CLIENT))
    allowed = "allowed" if fields.get(audit.DECISION) == "allow" else "denied"
    return {"source.ip": ip, "source.port": port, "network.direction": "egress", "event.category": list(category),
            "event.type": [kind, allowed]}


def _destination(fields: Fields) -> Fields:
    host = fields.get(audit.HOST)
    literal = is_ip(host)
    return {"destination.domain": None if literal else host,
            "destination.ip": host if literal else host_ip(fields.get(audit.UPSTREAM))[0]}


def _connection(fields: Fields) -> Fields:
    return {**_source(fields, "connection"), "network.transport": "tcp", **_destination(fields)}


def _request(fields: Fields) -> Fields:
    return {**_source(fields, "access", ("network", "web")), "network.transport": "tcp", "network.protocol": "http",
            **_destination(fields), "http.version": http_version_number(fields)}


def _dns(fields: Fields) -> Fields:
    return {**_source(fields, "protocol"), "network.protocol": "dns"}


def _answers(answers: list[Fields]) -> list[Fields]:
    return [{"data": a.get("address"), "ttl": a.get("ttl"), "type": "AAAA" if ":" in str(a.get("address")) else "A"}
            for a in answers]


_COMMON = (
    at(audit.TS, "@timestamp"), at(audit.EVENT, "event.action"), at(audit.SEQ, "event.sequence"),
    at(audit.CHAIN, "event.hash"), at(audit.STREAM, "egressd.stream"),
)
_POLICY = (
    at(audit.SERVICE, "service.origin.name"), at(audit.CLIENT, "source.address"),
    at(audit.DECISION, "event.outcome", _OUTCOME.get, _DECISION.get), at(audit.REASON, "event.reason"),
    at(audit.DETAIL, "message"), at(audit.RULE, "rule.id"), at(audit.POLICY_VERSION, "rule.version"),
)
_LIMIT = at(audit.LIMIT, "egressd.limit")
_DURATION = at(audit.DURATION_MS, "event.duration", lambda ms: round(ms * 1_000_000), lambda ns: round(ns / 1e6, 3))

ECS = Mapped("ecs", ("egressd",), _COMMON, lambda f: {
    "ecs.version": ECS_VERSION, "event.kind": "event", "event.dataset": "egressd.audit", "observer.type": "proxy",
    "observer.product": PRODUCT, "observer.vendor": PRODUCT,
}, {
    audit.CONNECTION_EVENT: Event(_POLICY + (
        _LIMIT, at(audit.CONN_ID, "egressd.conn_id"), at(audit.LISTENER, "egressd.listener"),
        at(audit.PROTOCOL, "network.protocol"), at(audit.HOST, "destination.address"),
        at(audit.PORT, "destination.port"), at(audit.SNI, "tls.client.server_name"),
        at(audit.WOULD_DENY, "egressd.would_deny"), at(audit.RESOLVED, "egressd.resolved"),
        at(audit.UPSTREAM, "egressd.upstream"), at(audit.BYTES_UP, "source.bytes"),
        at(audit.BYTES_DOWN, "destination.bytes"), _DURATION,
        at(audit.DNS_MS, "egressd.dns_ms"), at(audit.CONNECT_MS, "egressd.connect_ms"),
        at(audit.REQUEST, "egressd.request"), at(audit.STATUS, "http.response.status_code"),
        at(audit.ORIGINAL_DST, "egressd.original_dst"),
        at(audit.ORIGINAL_DST_IN_ANSWER, "egressd.original_dst_in_answer"), at(audit.ECH, "egressd.ech"),
        at(audit.IDENTITY, "egressd.identity"),
    ), _connection),
    audit.REQUEST_EVENT: Event(_POLICY + (
        at(audit.CONN_ID, "egressd.conn_id"), at(audit.HOST, "destination.address"),
        at(audit.PORT, "destination.port"), at(audit.UPSTREAM, "egressd.upstream"),
        at(audit.REQUEST, "egressd.request"), at(audit.METHOD, "http.request.method"),
        url_place(audit.PATH, "url", "query"), at(audit.HTTP_VERSION, "egressd.http_version"),
        at(audit.STATUS, "http.response.status_code"), at(audit.BYTES_UP, "http.request.body.bytes"),
        at(audit.BYTES_DOWN, "http.response.body.bytes"), _DURATION,
    ), _request),
    audit.DNS_EVENT: Event(_POLICY + (
        _LIMIT, at(audit.QNAME, "dns.question.name"), at(audit.QTYPE, "dns.question.type"),
        at(audit.RCODE, "dns.response_code"),
        at(audit.ANSWERS, "dns.answers", _answers, lambda v: [{"address": a["data"], "ttl": a["ttl"]} for a in v]),
        at(audit.UPSTREAM_MS, "egressd.upstream_ms"),
    ), _dns),
    audit.GAP_EVENT: Event((
        at(audit.LAST_TS, "event.end"), at(audit.REFUSED, "egressd.refused"), at(audit.DETAIL, "message"),
    ), lambda f: {"event.category": ["network"], "event.type": ["connection", "denied"], "event.outcome": "failure",
                  "network.direction": "egress"}),
    audit.CHECKPOINT_EVENT: Event(tuple(
        at(name, f"egressd.checkpoint.{name}") for name in
        (audit.COVERS_SEQ, audit.COVERS_CHAIN, audit.RECORDS, audit.FINAL, audit.KEY_ID, audit.SIGNATURE)
    ), lambda f: {"event.kind": "state"}),
}, Event((), lambda f: {}))
