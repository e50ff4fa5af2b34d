"""The audit log: one JSON line per record, written exactly once.

Field names and the record types are in :mod:`egressd.records`. A connection's state is
collected in a :class:`~egressd.records.Record` while it lives; :meth:`AuditLog.emit` turns it into
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

import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from egressd.auditwriter import AuditWriter, log, write_to
from egressd.policy.model import Reason
from egressd.records import DETAIL, EVENT, GAP_EVENT, LAST_TS, REFUSED, TS, DnsRecord, Record, RequestRecord, rfc3339

if TYPE_CHECKING:
    from egressd.auditchain import Chain

MAX_PENDING = 65_536  # lines waiting past which a refusal is counted instead of kept (about 40 MB of records)
CLOSE_TIMEOUT = 3.0  # seconds shutdown waits for the audit lines still to be written
_REFUSAL = Reason.AUDIT_UNAVAILABLE.value


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

    def emit(self, record: Record | DnsRecord | RequestRecord) -> bool:
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
