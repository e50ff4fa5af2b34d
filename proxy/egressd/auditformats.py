"""How an audit line is written: canonical JSON, and ``--audit-format native|ecs|ocsf``.

``ecs`` maps a record to the Elastic Common Schema (ECS_VERSION), ``ocsf`` to
OCSF (OCSF_VERSION: Network Activity 4001, DNS Activity 4003, Base Event 0 for
checkpoints). A mapping is a table of :class:`Place` (native field, path, the
conversion both ways) and the fields derived from the record; a native field no
table names goes under the format's own namespace (``egressd.*``,
``unmapped.*``): nothing is dropped. ``to_native`` reads a mapped record back
(for ``egressd audit verify``). The chain covers the line as written
(:meth:`Layout.render`); docs/forensics.md has the tables.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from egressd import records as audit
from egressd.hostport import join_host_port

ECS_VERSION = "8.11.0"
OCSF_VERSION = "1.3.0"
PRODUCT = "egressd"

Fields = dict[str, Any]


def canonical(record: Fields) -> bytes:
    """The bytes the chain covers: sorted keys, no spaces, UTF-8 (orjson)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Layout:
    """One --audit-format: native fields to the written record and back, and where the chain value goes."""

    name: str
    chain_path: tuple[str, ...]
    to_format: Callable[[Fields], Fields] = _same
    to_native: Callable[[Fields], Fields] = _same

    def render(self, mapped: Fields, canon: bytes, chain: str) -> bytes:
        """The line: canonical JSON with the chain value added (native: appended, saving a second rendering)."""
        if self.chain_path == (audit.CHAIN,):
            return b"%s,\"chain\":\"%s\"}" % (canon[:-1], chain.encode())
        node = mapped
        for key in self.chain_path[:-1]:
            node = node.setdefault(key, {})
        node[self.chain_path[-1]] = chain
        return canonical(mapped)

    def unchain(self, record: Fields) -> Fields:
        """A copy of a written record without its chain value (the record itself is left alone)."""
        top = node = dict(record)
        for key in self.chain_path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                return top
            node[key] = node = dict(child)
        node.pop(self.chain_path[-1], None)
        return top


NATIVE = Layout("native", (audit.CHAIN,))


# -- the tables ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Place:
    """Where one native field is written, and how its value is converted there and back."""

    native: str
    path: tuple[str, ...]
    out: Callable[[Any], Any] = _same
    back: Callable[[Any], Any] = _same


def at(native: str, path: str, out: Callable[[Any], Any] = _same, back: Callable[[Any], Any] = _same) -> Place:
    return Place(native, tuple(path.split(".")), out, back)


@dataclass(frozen=True, slots=True)
class Event:
    """One record type's mapping: its places, and the fields derived from the native record (dotted path -> value)."""

    places: tuple[Place, ...]
    derive: Callable[[Fields], Fields]


def _host_ip(text: str | None) -> tuple[str | None, int | None]:
    """(ip, port) of an ``ip:port`` or ``[v6]:port`` text."""
    if not text or ":" not in text:
        return None, None
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


def _endpoint(text: str) -> Fields:
    ip, port = _host_ip(text)
    return {"ip": ip, "port": port} if ip else {}


def _joined(endpoint: Fields) -> str | None:
    return join_host_port(endpoint["ip"], endpoint["port"]) if endpoint.get("ip") else None


def is_ip(host: str | None) -> bool:
    """True for an IP literal (egressd writes them canonical: dotted IPv4, or IPv6 with a colon)."""
    return bool(host) and (":" in host or host.replace(".", "").isdigit())  # type: ignore[union-attr]


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_MS = _dt.timedelta(milliseconds=1)


def epoch_ms(ts: str) -> int:
    """Milliseconds since the epoch of an RFC 3339 UTC time as egressd writes it."""
    return (_dt.datetime.fromisoformat(ts) - _EPOCH) // _MS


def _build(derived: Fields, places: tuple[Place, ...], placed: frozenset[str], fields: Fields,
           spill: tuple[str, ...]) -> Fields:
    out: Fields = {}
    for path, value in derived.items():
        if value is not None:
            _put(out, _split(path), value)
    for place in places:
        value = fields.get(place.native)
        if value is not None:
            _put(out, place.path, place.out(value))
    for name, value in fields.items():
        if value is not None and name not in placed:
            _put(out, (*spill, name), value)
    return out


def _put(out: Fields, path: tuple[str, ...], value: Any) -> None:
    node = out
    for key in path[:-1]:
        child = node.get(key)
        node = node.setdefault(key, {}) if child is None else child
    key = path[-1]
    old = node.get(key)
    node[key] = {**old, **value} if type(old) is dict and type(value) is dict else value


@functools.lru_cache(maxsize=512)
def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _get(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = record
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


@dataclass(frozen=True, slots=True)
class Mapped:
    """A format that maps native records: its common places, its per-event tables, its own namespace."""

    name: str
    spill: tuple[str, ...]  # where native fields without a place go
    common: tuple[Place, ...]
    derive: Callable[[Fields], Fields]  # what every line carries (an event's own derived fields win)
    events: dict[str, Event]
    other: Event  # a record type without a table of its own

    def to_format(self, fields: Fields) -> Fields:
        event = self.events.get(fields.get(audit.EVENT), self.other)
        places, placed = _plan(self, event)
        return _build({**self.derive(fields), **event.derive(fields)}, places, placed, fields, self.spill)

    def to_native(self, record: Fields) -> Fields:
        name = next(_get(record, p.path) for p in self.common if p.native == audit.EVENT)
        places = self.common + self.events.get(name, self.other).places if isinstance(name, str) else self.common
        native: Fields = {}
        for place in places:
            value = _get(record, place.path)
            native[place.native] = None if value is None else place.back(value)
        depth = len(self.spill)
        claimed = {p.path[depth] for p in places if p.path[:depth] == self.spill and len(p.path) > depth}
        spilled = _get(record, self.spill)
        for key, value in (spilled.items() if isinstance(spilled, dict) else ()):
            if key not in claimed:
                native[key] = value
        return native


_PLANS: dict[tuple[int, int], tuple[tuple[Place, ...], frozenset[str]]] = {}


def _plan(mapped: Mapped, event: Event) -> tuple[tuple[Place, ...], frozenset[str]]:
    """An event's places after the common ones, and the native fields they name (worked out once)."""
    plan = _PLANS.get((id(mapped), id(event)))
    if plan is None:
        places = mapped.common + event.places
        plan = _PLANS[(id(mapped), id(event))] = (places, frozenset(p.native for p in places))
    return plan


# -- ECS ----------------------------------------------------------------------------------------------------------

_OUTCOME = {"allow": "success", "deny": "failure"}
_DECISION = {v: k for k, v in _OUTCOME.items()}


def _ecs_source(fields: Fields, kind: str) -> Fields:
    ip, port = _host_ip(fields.get(audit.CLIENT))
    allowed = "allowed" if fields.get(audit.DECISION) == "allow" else "denied"
    return {"source.ip": ip, "source.port": port, "network.direction": "egress", "event.category": ["network"],
            "event.type": [kind, allowed]}


def _ecs_connection(fields: Fields) -> Fields:
    host = fields.get(audit.HOST)
    literal = is_ip(host)
    return {**_ecs_source(fields, "connection"), "network.transport": "tcp",
            "destination.domain": None if literal else host,
            "destination.ip": host if literal else _host_ip(fields.get(audit.UPSTREAM))[0]}


def _ecs_dns(fields: Fields) -> Fields:
    return {**_ecs_source(fields, "protocol"), "network.protocol": "dns"}


def _ecs_answers(answers: list[Fields]) -> list[Fields]:
    return [{"data": a.get("address"), "ttl": a.get("ttl"), "type": "AAAA" if ":" in str(a.get("address")) else "A"}
            for a in answers]


_ECS_COMMON = (
    at(audit.TS, "@timestamp"), at(audit.EVENT, "event.action"), at(audit.SEQ, "event.sequence"),
    at(audit.CHAIN, "event.hash"), at(audit.STREAM, "egressd.stream"),
)
_ECS_POLICY = (
    at(audit.SERVICE, "service.origin.name"), at(audit.CLIENT, "source.address"),
    at(audit.DECISION, "event.outcome", _OUTCOME.get, _DECISION.get), at(audit.REASON, "event.reason"),
    at(audit.DETAIL, "message"), at(audit.RULE, "rule.id"), at(audit.POLICY_VERSION, "rule.version"),
    at(audit.LIMIT, "egressd.limit"),
)
ECS = Mapped("ecs", ("egressd",), _ECS_COMMON, lambda f: {
    "ecs.version": ECS_VERSION, "event.kind": "event", "event.dataset": "egressd.audit", "observer.type": "proxy",
    "observer.product": PRODUCT, "observer.vendor": PRODUCT,
}, {
    audit.CONNECTION_EVENT: Event(_ECS_POLICY + (
        at(audit.CONN_ID, "egressd.conn_id"), at(audit.LISTENER, "egressd.listener"),
        at(audit.PROTOCOL, "network.protocol"), at(audit.HOST, "destination.address"),
        at(audit.PORT, "destination.port"), at(audit.SNI, "tls.client.server_name"),
        at(audit.WOULD_DENY, "egressd.would_deny"), at(audit.RESOLVED, "egressd.resolved"),
        at(audit.UPSTREAM, "egressd.upstream"), at(audit.BYTES_UP, "source.bytes"),
        at(audit.BYTES_DOWN, "destination.bytes"),
        at(audit.DURATION_MS, "event.duration", lambda ms: round(ms * 1_000_000), lambda ns: round(ns / 1e6, 3)),
        at(audit.DNS_MS, "egressd.dns_ms"), at(audit.CONNECT_MS, "egressd.connect_ms"),
        at(audit.REQUEST, "egressd.request"), at(audit.STATUS, "http.response.status_code"),
        at(audit.ORIGINAL_DST, "egressd.original_dst"),
        at(audit.ORIGINAL_DST_IN_ANSWER, "egressd.original_dst_in_answer"), at(audit.ECH, "egressd.ech"),
        at(audit.IDENTITY, "egressd.identity"),
    ), _ecs_connection),
    audit.DNS_EVENT: Event(_ECS_POLICY + (
        at(audit.QNAME, "dns.question.name"), at(audit.QTYPE, "dns.question.type"),
        at(audit.RCODE, "dns.response_code"),
        at(audit.ANSWERS, "dns.answers", _ecs_answers, lambda v: [{"address": a["data"], "ttl": a["ttl"]} for a in v]),
        at(audit.UPSTREAM_MS, "egressd.upstream_ms"),
    ), _ecs_dns),
    audit.GAP_EVENT: Event((
        at(audit.LAST_TS, "event.end"), at(audit.REFUSED, "egressd.refused"), at(audit.DETAIL, "message"),
    ), lambda f: {"event.category": ["network"], "event.type": ["connection", "denied"], "event.outcome": "failure",
                  "network.direction": "egress"}),
    audit.CHECKPOINT_EVENT: Event(tuple(
        at(name, f"egressd.checkpoint.{name}") for name in
        (audit.COVERS_SEQ, audit.COVERS_CHAIN, audit.RECORDS, audit.FINAL, audit.KEY_ID, audit.SIGNATURE)
    ), lambda f: {"event.kind": "state"}),
}, Event((), lambda f: {}))


# -- OCSF ---------------------------------------------------------------------------------------------------------


def _classified(class_uid: int, class_name: str, category: tuple[int, str], activity: tuple[int, str],
                type_caption: str | None = None) -> Fields:
    return {
        "class_uid": class_uid, "class_name": class_name, "category_uid": category[0], "category_name": category[1],
        "activity_id": activity[0], "activity_name": activity[1], "type_uid": class_uid * 100 + activity[0],
        "type_name": f"{class_name}: {type_caption or activity[1]}",
    }


_NETWORK = (4, "Network Activity")


def _ocsf_disposition(allowed: bool) -> Fields:
    return {"action": "Allowed" if allowed else "Denied", "disposition_id": 1 if allowed else 2,
            "disposition": "Allowed" if allowed else "Blocked", "status_id": 1 if allowed else 2,
            "status": "Success" if allowed else "Failure", "metadata.profiles": ["security_control", "datetime"]}


def _ocsf_connection(fields: Fields) -> Fields:
    allowed, host = fields.get(audit.DECISION) == "allow", fields.get(audit.HOST)
    up, down = fields.get(audit.BYTES_UP) or 0, fields.get(audit.BYTES_DOWN) or 0
    duration = fields.get(audit.DURATION_MS)
    return {
        **_classified(4001, "Network Activity", _NETWORK, (2, "Close") if allowed else (5, "Refuse")),
        **_ocsf_disposition(allowed), "traffic.bytes": up + down,
        "duration": None if duration is None else round(duration),
        "connection_info.direction_id": 2, "connection_info.direction": "Outbound",
        "connection_info.protocol_name": "tcp",
        "dst_endpoint.ip": _host_ip(fields.get(audit.UPSTREAM))[0] if host and not is_ip(host) else None,
    }


_RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def _ocsf_dns(fields: Fields) -> Fields:
    rcode = fields.get(audit.RCODE)
    return {**_classified(4003, "DNS Activity", _NETWORK, (2, "Response")),
            **_ocsf_disposition(fields.get(audit.DECISION) == "allow"),
            "rcode_id": None if rcode is None else _RCODES.get(rcode, 99)}


def _ocsf_gap(fields: Fields) -> Fields:
    last = fields.get(audit.LAST_TS)
    return {**_classified(4001, "Network Activity", _NETWORK, (5, "Refuse")), **_ocsf_disposition(False),
            "end_time": None if last is None else epoch_ms(last)}


def _ocsf_host(host: str) -> Fields:
    return {"ip": host} if is_ip(host) else {"hostname": host}

_OCSF_COMMON = (
    at(audit.TS, "time_dt"), at(audit.EVENT, "metadata.event_code"), at(audit.SEQ, "metadata.sequence"),
    at(audit.STREAM, "unmapped.stream"), at(audit.CHAIN, "unmapped.chain"),
)
_OCSF_POLICY = (
    at(audit.CLIENT, "src_endpoint", _endpoint, _joined), at(audit.SERVICE, "src_endpoint.svc_name"),
    at(audit.DECISION, "action_id", {"allow": 1, "deny": 2}.get, {1: "allow", 2: "deny"}.get),
    at(audit.REASON, "status_code"), at(audit.DETAIL, "message"), at(audit.RULE, "firewall_rule.uid"),
    at(audit.POLICY_VERSION, "firewall_rule.version"), at(audit.LIMIT, "unmapped.limit"),
)
OCSF = Mapped("ocsf", ("unmapped",), _OCSF_COMMON, lambda f: {
    "metadata.version": OCSF_VERSION, "metadata.product.name": PRODUCT, "metadata.product.vendor_name": PRODUCT,
    "severity_id": 1, "severity": "Informational", "time": epoch_ms(f[audit.TS]) if f.get(audit.TS) else None,
}, {
    audit.CONNECTION_EVENT: Event(_OCSF_POLICY + (
        at(audit.CONN_ID, "connection_info.uid"),
        at(audit.HOST, "dst_endpoint", _ocsf_host, lambda v: v["hostname"] if "hostname" in v else v.get("ip")),
        at(audit.PORT, "dst_endpoint.port"), at(audit.SNI, "tls.sni"),
        at(audit.BYTES_UP, "traffic.bytes_out"), at(audit.BYTES_DOWN, "traffic.bytes_in"),
        *(at(name, f"unmapped.{name}") for name in (
            audit.LISTENER, audit.PROTOCOL, audit.WOULD_DENY, audit.RESOLVED, audit.UPSTREAM, audit.DURATION_MS,
            audit.DNS_MS, audit.CONNECT_MS, audit.REQUEST, audit.STATUS, audit.ORIGINAL_DST,
            audit.ORIGINAL_DST_IN_ANSWER, audit.ECH, audit.IDENTITY)),
    ), _ocsf_connection),
    audit.DNS_EVENT: Event(_OCSF_POLICY + (
        at(audit.QNAME, "query.hostname"), at(audit.QTYPE, "query.type"), at(audit.RCODE, "rcode"),
        at(audit.ANSWERS, "answers",
           lambda v: [{"rdata": a.get("address"), "ttl": a.get("ttl")} for a in v],
           lambda v: [{"address": a["rdata"], "ttl": a["ttl"]} for a in v]),
        at(audit.UPSTREAM_MS, "unmapped.upstream_ms"),
    ), _ocsf_dns),
    audit.GAP_EVENT: Event((
        at(audit.LAST_TS, "end_time_dt"), at(audit.REFUSED, "count"), at(audit.DETAIL, "message"),
    ), _ocsf_gap),
    audit.CHECKPOINT_EVENT: Event(tuple(
        at(name, f"unmapped.{name}") for name in
        (audit.COVERS_SEQ, audit.COVERS_CHAIN, audit.RECORDS, audit.FINAL, audit.KEY_ID, audit.SIGNATURE)
    ), lambda f: {**_classified(0, "Base Event", (0, "Uncategorized"), (99, "Checkpoint"), "Other"),
                  "metadata.profiles": ["datetime"]}),
}, Event((), lambda f: {**_classified(0, "Base Event", (0, "Uncategorized"), (99, str(f.get(audit.EVENT))),
                                      "Other"), "metadata.profiles": ["datetime"]}))


FORMATS: dict[str, Layout] = {
    "native": NATIVE,
    "ecs": Layout("ecs", ("event", "hash"), ECS.to_format, ECS.to_native),
    "ocsf": Layout("ocsf", ("unmapped", "chain"), OCSF.to_format, OCSF.to_native),
}


def detect(record: Fields) -> Layout:
    """The format a written line is in: ECS has ``ecs``, OCSF ``class_uid``; anything else is native."""
    if "ecs" in record:
        return FORMATS["ecs"]
    return FORMATS["ocsf"] if "class_uid" in record else NATIVE
