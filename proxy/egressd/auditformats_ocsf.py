"""``--audit-format ocsf``: the native records mapped to OCSF (OCSF_VERSION).

Connections and refusals are Network Activity (4001), requests inside an inspected tunnel HTTP Activity (4002),
DNS queries DNS Activity (4003), checkpoints and record types without a table Base Event (0). A native field
without an OCSF attribute goes under ``unmapped.*`` with its own name. docs/forensics.md has the same tables,
and a test compares them.
"""

from __future__ import annotations

from egressd import records as audit
from egressd.auditformats_map import (
    PRODUCT,
    Event,
    Fields,
    Mapped,
    Place,
    at,
    endpoint,
    epoch_ms,
    host_ip,
    http_version_number,
    is_ip,
    joined,
    url_place,
)

OCSF_VERSION = "1.3.0"


def _classified(class_uid: int, class_name: str, category: tuple[int, str], activity: tuple[int, str],
                type_caption: str | None = None) -> Fields:
    return {
        "class_uid": class_uid, "class_name": class_name, "category_uid": category[0], "category_name": category[1],
        "activity_id": activity[0], "activity_name": activity[1], "type_uid": class_uid * 100 + activity[0],
        "type_name": f"{class_name}: {type_caption or activity[1]}",
    }


_NETWORK = (4, "Network Activity")


def _disposition(allowed: bool) -> Fields:
    return {"action": "Allowed" if allowed else "Denied", "disposition_id": 1 if allowed else 2,
            "disposition": "Allowed" if allowed else "Blocked", "status_id": 1 if allowed else 2,
            "status": "Success" if allowed else "Failure", "metadata.profiles": ["security_control", "datetime"]}


def _traffic(fields: Fields) -> Fields:
    """What a connection and a request both derive: the total bytes, whole ms, the direction, the pinned address."""
    host, duration = fields.get(audit.HOST), fields.get(audit.DURATION_MS)
    return {
        **_disposition(fields.get(audit.DECISION) == "allow"),
        "traffic.bytes": (fields.get(audit.BYTES_UP) or 0) + (fields.get(audit.BYTES_DOWN) or 0),
        "duration": None if duration is None else round(duration),
        "connection_info.direction_id": 2, "connection_info.direction": "Outbound",
        "connection_info.protocol_name": "tcp",
        "dst_endpoint.ip": host_ip(fields.get(audit.UPSTREAM))[0] if host and not is_ip(host) else None,
    }


def _connection(fields: Fields) -> Fields:
    allowed = fields.get(audit.DECISION) == "allow"
    return {**_classified(4001, "Network Activity", _NETWORK, (2, "Close") if allowed else (5, "Refuse")),
            **_traffic(fields)}


# HTTP Activity's activity_id and its caption, from the method as sent (methods are case-sensitive: "get" is
# not GET, and PATCH has no activity of its own in 1.3.0).
METHOD_ACTIVITIES = {
    "CONNECT": (1, "Connect"), "DELETE": (2, "Delete"), "GET": (3, "Get"), "HEAD": (4, "Head"),
    "OPTIONS": (5, "Options"), "POST": (6, "Post"), "PUT": (7, "Put"), "TRACE": (8, "Trace"),
}


def _method_activity(method: str | None) -> tuple[int, str]:
    """(activity_id, activity_name): 0 Unknown without a method; 99, named by the method itself, for any other."""
    if method is None:
        return 0, "Unknown"
    return METHOD_ACTIVITIES.get(method) or (99, method)


def _request(fields: Fields) -> Fields:
    activity = _method_activity(fields.get(audit.METHOD))
    return {**_classified(4002, "HTTP Activity", _NETWORK, activity, "Other" if activity[0] == 99 else None),
            **_traffic(fields), "http_request.version": http_version_number(fields)}


_RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def _dns(fields: Fields) -> Fields:
    rcode = fields.get(audit.RCODE)
    return {**_classified(4003, "DNS Activity", _NETWORK, (2, "Response")),
            **_disposition(fields.get(audit.DECISION) == "allow"),
            "rcode_id": None if rcode is None else _RCODES.get(rcode, 99)}


def _gap(fields: Fields) -> Fields:
    last = fields.get(audit.LAST_TS)
    return {**_classified(4001, "Network Activity", _NETWORK, (5, "Refuse")), **_disposition(False),
            "end_time": None if last is None else epoch_ms(last)}


def _host(host: str) -> Fields:
    return {"ip": host} if is_ip(host) else {"hostname": host}


def _unhost(endpoint: Fields) -> str | None:
    return endpoint["hostname"] if "hostname" in endpoint else endpoint.get("ip")


_COMMON = (
    at(audit.TS, "time_dt"), at(audit.EVENT, "metadata.event_code"), at(audit.SEQ, "metadata.sequence"),
    at(audit.STREAM, "unmapped.stream"), at(audit.CHAIN, "unmapped.chain"),
)
_POLICY = (
    at(audit.CLIENT, "src_endpoint", endpoint, joined), at(audit.SERVICE, "src_endpoint.svc_name"),
    at(audit.DECISION, "action_id", {"allow": 1, "deny": 2}.get, {1: "allow", 2: "deny"}.get),
    at(audit.REASON, "status_code"), at(audit.DETAIL, "message"), at(audit.RULE, "firewall_rule.uid"),
    at(audit.POLICY_VERSION, "firewall_rule.version"),
)
_LIMIT = at(audit.LIMIT, "unmapped.limit")
_TUNNEL = (  # the destination of a connection and of a request in it
    at(audit.CONN_ID, "connection_info.uid"), at(audit.HOST, "dst_endpoint", _host, _unhost),
    at(audit.PORT, "dst_endpoint.port"), at(audit.BYTES_UP, "traffic.bytes_out"),
    at(audit.BYTES_DOWN, "traffic.bytes_in"),
)


def _unmapped(*names: str) -> tuple[Place, ...]:
    return tuple(at(name, f"unmapped.{name}") for name in names)


OCSF = Mapped("ocsf", ("unmapped",), _COMMON, lambda f: {
    "metadata.version": OCSF_VERSION, "metadata.product.name": PRODUCT, "metadata.product.vendor_name": PRODUCT,
    "severity_id": 1, "severity": "Informational", "time": epoch_ms(f[audit.TS]) if f.get(audit.TS) else None,
}, {
    audit.CONNECTION_EVENT: Event(_POLICY + (_LIMIT,) + _TUNNEL + (
        at(audit.SNI, "tls.sni"),
        *_unmapped(audit.LISTENER, audit.PROTOCOL, audit.WOULD_DENY, audit.RESOLVED, audit.UPSTREAM,
                   audit.DURATION_MS, audit.DNS_MS, audit.CONNECT_MS, audit.REQUEST, audit.STATUS, audit.ORIGINAL_DST,
                   audit.ORIGINAL_DST_IN_ANSWER, audit.ECH, audit.IDENTITY),
    ), _connection),
    audit.REQUEST_EVENT: Event(_POLICY + _TUNNEL + (
        at(audit.METHOD, "http_request.http_method"), url_place(audit.PATH, "http_request.url", "query_string"),
        at(audit.STATUS, "http_response.code"),
        *_unmapped(audit.UPSTREAM, audit.REQUEST, audit.HTTP_VERSION, audit.DURATION_MS),
    ), _request),
    audit.DNS_EVENT: Event(_POLICY + (
        _LIMIT, at(audit.QNAME, "query.hostname"), at(audit.QTYPE, "query.type"), at(audit.RCODE, "rcode"),
        at(audit.ANSWERS, "answers",
           lambda v: [{"rdata": a.get("address"), "ttl": a.get("ttl")} for a in v],
           lambda v: [{"address": a["rdata"], "ttl": a["ttl"]} for a in v]),
        at(audit.UPSTREAM_MS, "unmapped.upstream_ms"),
    ), _dns),
    audit.GAP_EVENT: Event((
        at(audit.LAST_TS, "end_time_dt"), at(audit.REFUSED, "count"), at(audit.DETAIL, "message"),
    ), _gap),
    audit.CHECKPOINT_EVENT: Event(_unmapped(
        audit.COVERS_SEQ, audit.COVERS_CHAIN, audit.RECORDS, audit.FINAL, audit.KEY_ID, audit.SIGNATURE,
    ), lambda f: {**_classified(0, "Base Event", (0, "Uncategorized"), (99, "Checkpoint"), "Other"),
                  "metadata.profiles": ["datetime"]}),
}, Event((), lambda f: {**_classified(0, "Base Event", (0, "Uncategorized"), (99, str(f.get(audit.EVENT))),
                                      "Other"), "metadata.profiles": ["datetime"]}))
