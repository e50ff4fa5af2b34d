"""The audit record: one JSON line per connection, written exactly once.

Field names are the constants below and nowhere else. A connection's state is
collected in :class:`Record` while it lives; :meth:`AuditLog.emit` turns it into
one JSON line, and the record refuses a second emission, so a
connection that fails in two places still produces exactly one line.

Records do not go through structlog's processor chain (operational logs do):
a record is data with a fixed shape, and the chain's per-call context copy and
keyword merge cost twice the record's own rendering on the hot path.

Lines are written by :class:`egressd.auditwriter.AuditWriter` on a thread of
its own, in whole lines, never skipping a byte; while they cannot be written
(:attr:`AuditLog.unavailable`) the proxy refuses new connections. Those
refusals are records too; past ``max_pending`` lines waiting, a refusal is only
counted, and one ``egress.audit_gap`` record (GAP_FIELDS) says how many there
were once lines can be written again. :meth:`AuditLog.close` writes what is
left within a deadline on shutdown.

Every line is chained (:mod:`egressd.auditchain`): it names its ``stream`` (one
per process), its ``seq`` in it and a ``chain`` value over the previous line's
and its own; every ``--audit-checkpoint-records`` records or
``--audit-checkpoint-seconds`` seconds, and at shutdown, an ``egress.checkpoint``
line (CHECKPOINT_FIELDS), signed when a key is given. Lines are sealed under one
lock in the order they are queued, so the chain follows the order they are
written; with ``--audit-format ecs|ocsf`` (:mod:`egressd.auditformats`) the
chain covers the mapped record.
"""

from __future__ import annotations

import datetime as _dt
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from egressd.auditwriter import AuditWriter, log, write_to
from egressd.policy.model import Reason

if TYPE_CHECKING:
    from egressd.auditchain import Chain

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

CONNECTION_EVENT = "egress.connection"

# The record of one query to the sidecar's DNS filter (DnsRecord): EVENT, TS, SERVICE, CLIENT, the fields
# below, DECISION, REASON, DETAIL, RULE, POLICY_VERSION.
DNS_EVENT = "egress.dns"
QNAME = "qname"
QTYPE = "qtype"
RCODE = "rcode"
ANSWERS = "answers"  # [{"address": ..., "ttl": ...}] of the A/AAAA answers returned
UPSTREAM_MS = "upstream_ms"

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

MAX_PENDING = 65_536  # lines waiting past which a refusal is counted instead of kept (about 40 MB of records)
CLOSE_TIMEOUT = 3.0  # seconds shutdown waits for the audit lines still to be written
_REFUSAL = Reason.AUDIT_UNAVAILABLE.value


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
        "original_dst", "original_dst_in_answer", "ech", "identity", "emitted",
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
        }


class DnsRecord:
    """What one query to the DNS filter got; filled in by the filter, emitted once."""

    __slots__ = (
        "started", "service", "client", "qname", "qtype", "rcode", "answers", "decision", "reason", "detail",
        "rule", "policy_version", "upstream_ms", "emitted",
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
        }


class AuditLog:
    """The single emit-once writer of audit records (stdout by default, or a file opened for append)."""

    def __init__(
        self,
        path: str | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
        *,
        writer: AuditWriter | None = None,
        max_pending: int = MAX_PENDING,
        chain: Chain | None = None,
    ) -> None:
        """``chain``: the stream's chain (its name, format, signing key, checkpoint intervals); by default
        native, unsigned, named after this process."""
        from egressd.auditchain import Chain, default_stream  # auditchain reads this module's field names

        self._chain = chain or Chain(default_stream())
        self._own = open(path, "a", encoding="utf-8") if path and writer is None else None  # noqa: SIM115
        self._writer = writer or AuditWriter(write_to(self._own or sys.stdout), path or "stdout")
        self._writer.on_available = self._write_gap
        self._writer.tick = self._tick
        self._writer.tick_every = min(1.0, self._chain.every_seconds)
        self._sink = sink
        self._max_pending = max_pending
        self._lock = threading.Lock()  # seals and queues a line: the chain follows the order lines are written
        self._final = False  # the final checkpoint is queued: close() began
        self._gap_lock = threading.Lock()  # the loop counts refusals, the writer thread takes the count
        self._gap: list[float] = []  # [refused, first ts, last ts] while refusals go unrecorded

    @property
    def stream(self) -> str:
        """This log's stream name (every line carries it)."""
        return self._chain.stream

    @property
    def checkpoints(self) -> int:
        """Checkpoints queued so far."""
        return self._chain.checkpoints

    def emit(self, record: Record | DnsRecord) -> bool:
        """Write the record unless it was written already; return whether this call wrote it."""
        if record.emitted:
            return False
        record.emitted = True
        fields = record.fields()
        fields[EVENT] = record.event
        if self._sink is not None:
            self._sink(dict(fields))
        if record.reason == _REFUSAL and self._writer.queued >= self._max_pending:
            self._count_refusal(record.started)
            return True
        self._append(fields)
        return True

    def _append(self, fields: dict[str, Any]) -> None:
        with self._lock:
            self._queue(fields)

    def _queue(self, fields: dict[str, Any]) -> None:
        """Seal one record into the chain and queue it, then a checkpoint when N records have passed (locked)."""
        chain = self._chain
        self._writer.msg(chain.record(fields))
        if chain.since >= chain.every_records:
            self._checkpoint()

    def _checkpoint(self, final: bool = False) -> bool:
        """Queue a checkpoint (locked). One that cannot be made is logged and never holds up a record (the stream
        then shows the records no checkpoint vouches for); return whether it was queued."""
        try:
            self._writer.msg(self._chain.checkpoint(time.time(), final))
        except Exception as exc:
            log.error("audit.checkpoint_failed", error=repr(exc), stream=self._chain.stream)
            return False
        return True

    def _tick(self) -> None:
        """On the writer thread, at least once a second while it waits: the checkpoint due by time, if any."""
        if self._chain.due():
            with self._lock:
                if self._chain.due() and not self._final:
                    self._checkpoint()

    def _count_refusal(self, ts: float) -> None:
        with self._gap_lock:
            if self._gap:
                self._gap[0] += 1
                self._gap[2] = ts
            else:
                self._gap = [1, ts, ts]

    def _write_gap(self) -> None:
        """On the writer thread, when lines can be written again: one record of the refusals only counted."""
        with self._lock:
            self._queue_gap()

    def _queue_gap(self) -> None:
        with self._gap_lock:
            gap, self._gap = self._gap, []
        if gap:
            self._queue({
                EVENT: GAP_EVENT, TS: rfc3339(gap[1]), LAST_TS: rfc3339(gap[2]), REFUSED: int(gap[0]),
                DETAIL: f"{int(gap[0])} connections refused while the audit log could not be written; "
                f"more than {self._max_pending} records were waiting, so these were only counted",
            })

    @property
    def unavailable(self) -> str | None:
        """Why records cannot be written now (new connections are refused meanwhile), or None when they can."""
        return self._writer.unavailable

    @property
    def unrecorded(self) -> int:
        """Refused connections only counted, whose summary record is not written yet."""
        return int(self._gap[0]) if self._gap else 0

    def state(self) -> tuple[int, int, int]:
        """(failed writes, records waiting, 1 when records can be written else 0), for the metrics."""
        return self._writer.write_errors, self._writer.pending, int(self._writer.unavailable is None)

    def flush(self) -> None:
        """Hand every emitted record to the writer now (does not wait)."""
        self._writer.flush()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> int:
        """Queue the final checkpoint, write every line within timeout seconds; return how many records could not
        be written (0 normally; the final checkpoint, last in line, is not counted)."""
        with self._lock:
            final, self._final = not self._final, True
            if final:
                self._queue_gap()  # refusals only counted are summed up before the final checkpoint, not after
                final = self._checkpoint(final=True)
        unwritten = self._writer.close(timeout)
        if self._own is not None and not unwritten:
            self._own.close()  # left open while the writer thread may still be in a write to it
        return max(0, unwritten - final)
