"""Writing audit lines to the audit stream, on a thread of its own: the event loop never waits on it.

The event loop only appends rendered lines to a deque and, once per batch of
FLUSH_DELAY, sets an event; :class:`AuditWriter`'s thread owns every write to
the stream (a pipe whose reader stopped, a file on a full or hung disk block or
fail only this thread). It writes whole lines in pieces of at most PIPE_BUF
bytes (a longer line goes alone), so that several worker processes sharing one
pipe or one O_APPEND file never interleave partial lines.

Nothing is skipped. A partial write keeps the unwritten rest of its piece and
writes it first on the next try; a failed write (ENOSPC, EPIPE, EIO, ...) keeps
everything, counts ``write_errors``, and is retried after RETRY_MIN growing to
RETRY_MAX seconds. The writer is *unavailable* (:attr:`AuditWriter.unavailable`
says why) from the first failed write, or a write blocked for ``stall_after``
seconds, or more than ``high_water`` lines waiting, until a write succeeds
with fewer than ``low_water`` lines left to write; the proxy then refuses new
connections (see :meth:`egressd.connection.Engine.admit`).

While it has nothing to write, the thread calls :attr:`AuditWriter.tick` at
least every ``tick_every`` seconds (the audit log's checkpoints due by time).
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

import structlog

log = structlog.get_logger("egressd.audit")

# Lines are gathered for this long and handed to the writer thread together.
FLUSH_DELAY = 0.02
STALL_AFTER = 1.0  # seconds one write may block (a reader that stopped reading) before the log is unavailable
HIGH_WATER = 16_384  # lines waiting: above, the log is unavailable ...
LOW_WATER = 1_024  # ... until a write succeeds with fewer than this left
RETRY_MIN, RETRY_MAX = 0.1, 1.0  # seconds between tries of a failing write, doubling

Write = Callable[[memoryview], int]


def write_to(stream: IO[str]) -> Write:
    """The raw write for a stream: ``os.write`` on its file descriptor, or the stream's own write without one."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        fd = None
    if fd is not None:
        stream.flush()  # anything written through the stream object before goes first, once
        return lambda data: os.write(fd, data)

    def text_write(data: memoryview) -> int:
        stream.write(bytes(data).decode())
        stream.flush()
        return len(data)

    return text_write


class AuditWriter:
    """A bounded hand-off from the event loop to a thread that writes whole lines and never skips a byte."""

    def __init__(
        self,
        write: Write,
        name: str,
        *,
        stall_after: float = STALL_AFTER,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
    ) -> None:
        self.name = name
        self.write_errors = 0  # failed writes, every try counted (written by the writer thread only)
        self.on_available: Callable[[], None] | None = None  # called on the writer thread when it recovers
        self.tick: Callable[[], None] | None = None  # called on the writer thread while idle, every tick_every s
        self.tick_every = 1.0
        self._write = write
        self._stall_after = stall_after
        self._high, self._low = high_water, low_water
        self._queue: deque[bytes] = deque()  # appended by the event loop, taken by the writer thread
        self._piece = memoryview(b"")  # the unwritten rest of the piece being written
        self._piece_lines = 0
        self._down: str | None = None  # why lines cannot be written now; None while they can
        self._failing = False
        self._since = 0.0  # monotonic start of the write in progress, 0 when none is
        self._scheduled = False
        self._closing = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="egressd-audit", daemon=True)
        self._thread.start()

    # -- the event loop's side ----------------------------------------------------------
    def msg(self, line: bytes) -> None:
        """Queue one line (without its newline); the writer is woken once per FLUSH_DELAY batch."""
        self._queue.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._wake.set()
            return
        self._scheduled = True
        loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Hand every queued line to the writer thread now (does not wait for the write)."""
        self._scheduled = False
        self._wake.set()

    @property
    def queued(self) -> int:
        """Lines queued and not yet taken by the writer thread."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Lines not yet written."""
        return len(self._queue) + self._piece_lines

    @property
    def unavailable(self) -> str | None:
        """Why lines cannot be written now (new connections are refused meanwhile), or None when they can."""
        if self._down is None:
            since = self._since
            if since and time.monotonic() - since >= self._stall_after:
                self._mark_down(f"a write to {self.name} has been blocked for {time.monotonic() - since:.1f}s")
            elif len(self._queue) > self._high:
                self._mark_down(f"{len(self._queue)} records wait to be written to {self.name}")
        return self._down

    def _mark_down(self, why: str) -> None:
        self._down = why
        log.error("audit.unavailable", reason=why, pending=self.pending)
        self._wake.set()  # the writer re-checks, in case the write ended meanwhile

    def close(self, timeout: float) -> int:
        """Write what is queued, waiting up to timeout seconds; return how many lines are still unwritten."""
        self._closing = True
        self._wake.set()
        self._stop.set()  # a failing write is tried again at once
        self._thread.join(timeout)
        return self.pending

    # -- the writer thread ------------------------------------------------------------
    def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            if not self._piece:
                if not self._queue:
                    self._settle()
                    if self._queue:  # the summary of a gap, queued on recovery
                        continue
                    if self._closing:
                        return
                    self._idle()
                    continue
                self._take()
            if not self._since:
                self._since = time.monotonic()
            try:
                written = self._write(self._piece)
            except BlockingIOError:  # O_NONBLOCK set on a shared stream by another process: wait as a blocking write
                time.sleep(0.005)
                continue
            except (OSError, ValueError) as exc:
                self._since = 0.0
                self._failed(exc)
                if self._stop.wait(delay):  # close() cuts one wait short
                    self._stop.clear()
                delay = min(delay * 2, RETRY_MAX)
                continue
            self._since = 0.0
            self._failing = False
            delay = RETRY_MIN
            self._piece = self._piece[written:]
            if not self._piece:
                self._piece_lines = 0
                self._settle()

    def _idle(self) -> None:
        """Wait for lines; call tick after each wait (woken or timed out) when one is set."""
        tick = self.tick
        if self._wake.wait(self.tick_every if tick is not None else None):
            self._wake.clear()
        if tick is not None:
            try:
                tick()
            except Exception as exc:  # a checkpoint that fails must not stop the records behind it
                log.error("audit.tick_failed", error=repr(exc))

    def _take(self) -> None:
        """The next piece: whole lines from the queue, at most PIPE_BUF bytes unless one line is longer."""
        queue = self._queue
        lines = [queue.popleft()]
        size = len(lines[0]) + 1
        while queue and size + len(queue[0]) + 1 <= select.PIPE_BUF:
            line = queue.popleft()
            lines.append(line)
            size += len(line) + 1
        lines.append(b"")
        self._piece = memoryview(b"\n".join(lines))
        self._piece_lines = len(lines) - 1

    def _failed(self, exc: OSError | ValueError) -> None:
        self.write_errors += 1
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self._down = f"writes to {self.name} fail: {text}"
        if not self._failing:
            self._failing = True
            log.error("audit.write_failed", error=text, errno=getattr(exc, "errno", None), pending=self.pending)

    def _settle(self) -> None:
        """Available again once a write succeeded and the backlog is below the low-water mark."""
        if self._down is not None and not self._failing and self.pending < self._low:
            self._down = None
            log.info("audit.available", pending=self.pending, write_errors=self.write_errors)
            if self.on_available is not None:
                self.on_available()
