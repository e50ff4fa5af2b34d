"""The audit record: one JSON line per connection, written exactly once.

Field names are the constants below and nowhere else. A connection's state is
collected in :class:`Record` while it lives; :meth:`AuditLog.emit` turns it into
one JSON line (orjson), and the record refuses a second emission, so a
connection that fails in two places still produces exactly one line.

Records do not go through structlog's processor chain (operational logs do):
a record is data with a fixed shape, and the chain's per-call context copy and
keyword merge cost twice the record's own rendering on the hot path.

Lines are buffered for FLUSH_DELAY (20 ms) and written with
one ``write`` per batch (whole lines only, so streams from several workers never
interleave partial lines); :meth:`AuditLog.flush` is called on shutdown.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import select
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import orjson

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

CONNECTION_EVENT = "egress.connection"

# Records are gathered for this long and written together: one write per batch
# instead of one per record under load. Shutdown flushes at once.
FLUSH_DELAY = 0.02


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
        "bytes_up", "bytes_down", "duration_ms", "dns_ms", "connect_ms", "request", "status", "emitted",
    )

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
        }


class _BatchWriter:
    """Queues rendered lines and writes them in batches of whole lines.

    Every ``write`` carries whole lines and at most PIPE_BUF bytes when it can
    (a longer single line goes alone), so that several worker processes sharing
    one pipe or one O_APPEND file never interleave partial lines.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._scheduled = False

    def msg(self, line: bytes) -> None:
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            fd = None
        try:
            if fd is None:
                self._stream.write("".join(line.decode() + "\n" for line in lines))
                self._stream.flush()
                return
            self._stream.flush()
            for chunk in _chunks(lines):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        except OSError as exc:  # a closed or broken audit stream must not kill the proxy
            print(f"egressd: cannot write audit records: {exc}", file=sys.stderr)


def _chunks(lines: list[bytes]) -> Iterator[bytes]:
    """Whole lines grouped into pieces of at most PIPE_BUF bytes (a longer line is a piece of its own)."""
    piece: list[bytes] = []
    size = 0
    for line in lines:
        data = line + b"\n"
        if piece and size + len(data) > select.PIPE_BUF:
            yield b"".join(piece)
            piece, size = [], 0
        piece.append(data)
        size += len(data)
    if piece:
        yield b"".join(piece)


class AuditLog:
    """The single emit-once writer of audit records (stdout by default, or a file opened for append)."""

    def __init__(self, path: str | None = None, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._own = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 - closed in close()
        self._writer = _BatchWriter(self._own or sys.stdout)
        self._sink = sink

    def emit(self, record: Record) -> bool:
        """Write the record unless it was written already; return whether this call wrote it."""
        if record.emitted:
            return False
        record.emitted = True
        fields = record.fields()
        fields[EVENT] = CONNECTION_EVENT
        if self._sink is not None:
            self._sink(dict(fields))
        self._writer.msg(orjson.dumps(fields))
        return True

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self.flush()
        if self._own is not None:
            self._own.close()
