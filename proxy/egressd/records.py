"""The records egressd writes and their field names: the constants below and nowhere else.

:class:`Record` is one connection (or one forwarded HTTP request), :class:`DnsRecord` one query to the DNS
filter, :class:`RequestRecord` one request inside an inspected TLS tunnel; all are mutable while they live and
turned into one JSON line, once, by :meth:`egressd.audit.AuditLog.emit`. The gap and checkpoint lines are built
by :mod:`egressd.audit` and :mod:`egressd.auditchain` from the names here.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

EVENT = "event"
TS = "ts"
CONN_ID = "conn_id"
SERVICE = "service"
CLIENT = "client"
LISTENER = "listener"
PROTOCOL = "protocol"
HOST = "host"
PORT = "port"
SNI = "sni"
DECISION = "decision"
WOULD_DENY = "would_deny"
REASON = "reason"
DETAIL = "detail"
RULE = "rule"
POLICY_VERSION = "policy_version"
RESOLVED = "resolved"
UPSTREAM = "upstream"
BYTES_UP = "bytes_up"
BYTES_DOWN = "bytes_down"
DURATION_MS = "duration_ms"
DNS_MS = "dns_ms"
CONNECT_MS = "connect_ms"
REQUEST = "request"
STATUS = "status"
ORIGINAL_DST = "original_dst"  # transparent: the address the client dialled (ip:port)
ORIGINAL_DST_IN_ANSWER = "original_dst_in_answer"  # ... and whether egressd's own answer for the name held it
ECH = "ech"  # the ClientHello carried encrypted_client_hello (decided on its outer SNI)
IDENTITY = "identity"  # who the identify step found ({"source": "token", "namespace": ...}); null when fixed
LIMIT = "limit"  # the limit that refused (reason overloaded) or trimmed it, egressd.limits' name for its flag; or null

CONNECTION_EVENT = "egress.connection"

# The record of one query to the sidecar's DNS filter (DnsRecord): EVENT, TS, SERVICE, CLIENT, the fields
# below, DECISION, REASON, DETAIL, RULE, POLICY_VERSION.
DNS_EVENT = "egress.dns"
QNAME = "qname"
QTYPE = "qtype"
RCODE = "rcode"
ANSWERS = "answers"  # [{"address": ..., "ttl": ...}] of the A/AAAA answers returned
UPSTREAM_MS = "upstream_ms"

# The record of one HTTP request decided inside an inspected TLS tunnel (RequestRecord): EVENT, TS, CONN_ID (the
# tunnel's), SERVICE, CLIENT, HOST (the SNI), PORT, UPSTREAM (the pinned ip:port), REQUEST (1, 2, ... in the
# tunnel), the fields below, STATUS, BYTES_UP, BYTES_DOWN (body bytes; bodies are never logged), DECISION,
# REASON, DETAIL, RULE (the inspect entry that allowed it, else the host rule), POLICY_VERSION, DURATION_MS.
REQUEST_EVENT = "egress.request"
METHOD = "method"
PATH = "path"  # the path as the client sent it, without the query string unless --inspect-log-query
HTTP_VERSION = "http_version"  # HTTP/1.1, HTTP/2.0

# The record of connections refused while records could not be written, past max_pending lines waiting:
# event, ts (the first such refusal), last_ts, refused (how many), detail.
GAP_EVENT = "egress.audit_gap"
LAST_TS = "last_ts"
REFUSED = "refused"

# Every line's place in the tamper-evident chain (see egressd.auditchain).
STREAM = "stream"  # the writing process (host/pid/start time, /wN for a worker): one chain per stream
SEQ = "seq"  # 1, 2, 3, ... per stream
CHAIN = "chain"  # hex SHA-256 over the previous line's chain and this line's canonical JSON without chain

GAP_FIELDS = (EVENT, TS, LAST_TS, REFUSED, DETAIL, STREAM, SEQ, CHAIN)

# The checkpoint, every N records or T seconds and at shutdown: event, ts, stream, seq, chain and the fields below.
CHECKPOINT_EVENT = "egress.checkpoint"
COVERS_SEQ = "covers_seq"  # the line it vouches for: the one just before it (0 in a stream with no line yet)
COVERS_CHAIN = "covers_chain"  # ... and that line's chain value (the stream's genesis value for 0)
RECORDS = "records"  # records (lines other than checkpoints) in the stream up to covers_seq
FINAL = "final"  # true at a clean shutdown: nothing follows in this stream
KEY_ID = "key_id"  # "sha256:" + hex SHA-256 of the signing key's public key (DER SubjectPublicKeyInfo); null unsigned
SIGNATURE = "signature"  # base64 Ed25519 signature of auditchain.signed_message(...); null unsigned
CHECKPOINT_FIELDS = (
    EVENT, TS, STREAM, SEQ, COVERS_SEQ, COVERS_CHAIN, RECORDS, FINAL, KEY_ID, SIGNATURE, CHAIN,
)


_second: list = [None, ""]  # the last whole second formatted, and its text: one strftime per second


def rfc3339(ts: float) -> str:
    """UTC, microseconds, 'Z' suffix: 2026-11-23T05:21:12.123456Z."""
    second = int(ts)
    if _second[0] != second:
        _second[0] = second
        _second[1] = _dt.datetime.fromtimestamp(second, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{min(round((ts - second) * 1_000_000), 999_999):06d}Z"


class Record:
    """What one connection (or one forwarded HTTP request) did; mutable while it lives, emitted once."""

    __slots__ = (
        "conn_id", "started", "service", "client", "listener", "protocol", "host", "port", "sni",
        "decision", "would_deny", "reason", "detail", "rule", "policy_version", "resolved", "upstream",
        "bytes_up", "bytes_down", "duration_ms", "dns_ms", "connect_ms", "request", "status",
        "original_dst", "original_dst_in_answer", "ech", "identity", "limit", "emitted",
    )

    event = CONNECTION_EVENT

    def __init__(self, conn_id: str, started: float, client: str, listener: str, service: str | None) -> None:
        self.conn_id = conn_id
        self.started = started
        self.client = client
        self.listener = listener
        self.service = service
        self.protocol: str | None = None
        self.host: str | None = None
        self.port: int | None = None
        self.sni: str | None = None
        self.decision = "deny"
        self.would_deny = False
        self.reason = "bad_request"
        self.detail: str | None = None
        self.rule: str | None = None
        self.policy_version: str | None = None
        self.resolved: list[str] = []
        self.upstream: str | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.duration_ms = 0.0
        self.dns_ms: float | None = None
        self.connect_ms: float | None = None
        self.request: int | None = None
        self.status: int | None = None
        self.original_dst: str | None = None
        self.original_dst_in_answer: bool | None = None
        self.ech: bool | None = None
        self.identity: dict[str, Any] | None = None
        self.limit: str | None = None
        self.emitted = False

    def note(self, text: str) -> None:
        """Add a human-readable remark to ``detail`` (remarks accumulate, none is lost)."""
        self.detail = text if not self.detail else f"{self.detail}; {text}"

    def fields(self) -> dict[str, Any]:
        return {
            TS: rfc3339(self.started),
            CONN_ID: self.conn_id,
            SERVICE: self.service,
            CLIENT: self.client,
            LISTENER: self.listener,
            PROTOCOL: self.protocol,
            HOST: self.host,
            PORT: self.port,
            SNI: self.sni,
            DECISION: self.decision,
            WOULD_DENY: self.would_deny,
            REASON: self.reason,
            DETAIL: self.detail,
            RULE: self.rule,
            POLICY_VERSION: self.policy_version,
            RESOLVED: self.resolved,
            UPSTREAM: self.upstream,
            BYTES_UP: self.bytes_up,
            BYTES_DOWN: self.bytes_down,
            DURATION_MS: round(self.duration_ms, 3),
            DNS_MS: None if self.dns_ms is None else round(self.dns_ms, 3),
            CONNECT_MS: None if self.connect_ms is None else round(self.connect_ms, 3),
            REQUEST: self.request,
            STATUS: self.status,
            ORIGINAL_DST: self.original_dst,
            ORIGINAL_DST_IN_ANSWER: self.original_dst_in_answer,
            ECH: self.ech,
            IDENTITY: self.identity,
            LIMIT: self.limit,
        }


class DnsRecord:
    """What one query to the DNS filter got; filled in by the filter, emitted once."""

    __slots__ = (
        "started", "service", "client", "qname", "qtype", "rcode", "answers", "decision", "reason", "detail",
        "rule", "policy_version", "upstream_ms", "limit", "emitted",
    )

    event = DNS_EVENT

    def __init__(self, started: float, service: str | None, client: str) -> None:
        self.started = started
        self.service = service
        self.client = client
        self.qname: str | None = None
        self.qtype: str | None = None
        self.rcode: str | None = None
        self.answers: list[dict[str, Any]] = []
        self.decision = "deny"
        self.reason = "bad_request"
        self.detail: str | None = None
        self.rule: str | None = None
        self.policy_version: str | None = None
        self.upstream_ms: float | None = None
        self.limit: str | None = None
        self.emitted = False

    def fields(self) -> dict[str, Any]:
        return {
            TS: rfc3339(self.started),
            SERVICE: self.service,
            CLIENT: self.client,
            QNAME: self.qname,
            QTYPE: self.qtype,
            RCODE: self.rcode,
            ANSWERS: self.answers,
            DECISION: self.decision,
            REASON: self.reason,
            DETAIL: self.detail,
            RULE: self.rule,
            POLICY_VERSION: self.policy_version,
            UPSTREAM_MS: None if self.upstream_ms is None else round(self.upstream_ms, 3),
            LIMIT: self.limit,
        }


class RequestRecord:
    """What one request inside an inspected TLS tunnel did (reported by the inspection worker); emitted once."""

    __slots__ = (
        "started", "conn_id", "service", "client", "host", "port", "upstream", "request", "method", "path",
        "http_version", "status", "bytes_up", "bytes_down", "decision", "reason", "detail", "rule",
        "policy_version", "duration_ms", "emitted",
    )

    event = REQUEST_EVENT

    def __init__(self, started: float, conn_id: str, service: str | None, client: str | None) -> None:
        self.started = started
        self.conn_id = conn_id
        self.service = service
        self.client = client
        self.host: str | None = None
        self.port: int | None = None
        self.upstream: str | None = None
        self.request: int | None = None
        self.method: str | None = None
        self.path: str | None = None
        self.http_version: str | None = None
        self.status: int | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.decision = "deny"
        self.reason = "bad_request"
        self.detail: str | None = None
        self.rule: str | None = None
        self.policy_version: str | None = None
        self.duration_ms = 0.0
        self.emitted = False

    def fields(self) -> dict[str, Any]:
        return {
            TS: rfc3339(self.started),
            CONN_ID: self.conn_id,
            SERVICE: self.service,
            CLIENT: self.client,
            HOST: self.host,
            PORT: self.port,
            UPSTREAM: self.upstream,
            REQUEST: self.request,
            METHOD: self.method,
            PATH: self.path,
            HTTP_VERSION: self.http_version,
            STATUS: self.status,
            BYTES_UP: self.bytes_up,
            BYTES_DOWN: self.bytes_down,
            DECISION: self.decision,
            REASON: self.reason,
            DETAIL: self.detail,
            RULE: self.rule,
            POLICY_VERSION: self.policy_version,
            DURATION_MS: round(self.duration_ms, 3),
        }
