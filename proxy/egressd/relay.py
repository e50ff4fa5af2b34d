"""The byte pump: one asyncio Protocol per TCP connection, two of them per tunnel.

A :class:`Side` (a BufferedProtocol: reads land in one shared buffer, no
allocation per read) starts in *buffer mode*: bytes collect in ``buffer`` and a
coroutine (the connection's handler) waits for them with :meth:`Side.read_more`
to parse a request head or a ClientHello. :func:`splice` switches a pair of
Sides to *splice mode*: from then on ``buffer_updated`` writes each chunk
straight to the peer's transport and adds its length to a counter; no other
Python work per chunk, no task, no copy unless the peer's transport must queue it.

Back-pressure: when a transport's write buffer passes its high-water mark the
event loop calls ``pause_writing`` on that side's protocol, which pauses
reading on the peer until ``resume_writing``. Half-close is passed through
(EOF from one side becomes ``write_eof`` on the other); when both directions
have ended, or either connection is lost, both are closed; a connection reset
is passed on as a reset (the peer is aborted, so it sees RST, not a clean end
of stream). Idle tunnels are
found by :class:`IdleSweeper`, which compares byte counters between sweeps
instead of re-arming a timer per chunk. :func:`peer_address` reads who is on
the other end of an accepted connection, even once it has reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

BUFFER_LIMIT = 1 << 20
WRITE_HIGH_WATER = 512 * 1024


READ_SIZE = 256 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)


class _ReadBuffer:
    """The one buffer every Side reads into (reads are handled one at a time on the loop).

    When a write of a slice of it is queued by the peer's transport (uvloop keeps
    a reference to the memory, it does not copy), the buffer is handed over and a
    new one is made, so queued bytes are never overwritten.
    """

    view = memoryview(bytearray(READ_SIZE))

    @classmethod
    def renew(cls) -> None:
        cls.view = memoryview(bytearray(READ_SIZE))


class Side(asyncio.BufferedProtocol):
    """One TCP connection of a proxied pair (the client's or the upstream's)."""

    __slots__ = (
        "transport", "buffer", "eof", "lost", "error", "peer", "forwarded", "loop", "on_lost",
        "_waiter", "_drain", "_paused", "_linger",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self.error: Exception | None = None  # why the connection was lost, when it did not end cleanly
        self.peer: Side | None = None
        self.forwarded = 0
        self.loop = loop
        self.on_lost: Callable[[], None] | None = None  # called once, at the end of connection_lost
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _ReadBuffer.view

    def buffer_updated(self, nbytes: int) -> None:
        data = _ReadBuffer.view[:nbytes]
        peer = self.peer
        if peer is not None:
            self.forwarded += nbytes
            transport = peer.transport
            transport.write(data)  # type: ignore[union-attr]
            if transport.get_write_buffer_size():  # type: ignore[union-attr]
                _ReadBuffer.renew()  # the transport queued (and holds) this memory
            return
        self.buffer += data
        if len(self.buffer) > BUFFER_LIMIT and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self._linger is not None:
            self.close()
            return True
        if self.peer is not None:
            self.pass_eof()
        self._wake()
        return True

    def pass_eof(self) -> bool:
        """Half-close: pass this side's EOF on to the peer, or close both when the peer has ended too
        (or cannot half-close). False when the pair was closed."""
        peer = self.peer
        if peer.eof or not peer.transport.can_write_eof():  # type: ignore[union-attr]
            self.close_pair()
            return False
        peer.transport.write_eof()  # type: ignore[union-attr]
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self.lost = True
        self.eof = True
        self.error = exc
        if self.peer is not None:
            if exc is None:
                self.peer.close()
            else:
                self.peer.reset()
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()  # type: ignore[union-attr]
        elif self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()  # type: ignore[union-attr]
        if self._drain is not None:
            if not self._drain.done():
                self._drain.set_result(None)
            self._drain = None

    # -- buffer mode --------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_more(self, deadline: float | None = None) -> None:
        """Wait until more bytes are buffered or the peer has sent EOF (callers look at buffer and eof).

        ``deadline`` is a loop.time() after which TimeoutError is raised. A timer
        exists only while actually waiting, so a head that is already buffered
        costs no timer at all.
        """
        if self.eof:
            return
        loop = self.loop
        waiter = self._waiter = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        """Remove and return everything buffered."""
        data = bytes(self.buffer)
        self.buffer.clear()
        if self._paused:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return data

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def linger(self, seconds: float = 2.0) -> None:
        """Close politely after an error answer: send EOF, let the peer read it, close at its EOF or after seconds.

        Closing a socket with unread input makes the kernel send RST, which can
        destroy the answer before the client reads it.
        """
        if self.lost or self.transport is None or self.transport.is_closing():
            return
        if self.eof or not self.transport.can_write_eof():
            self.close()
            return
        self.transport.write_eof()
        self.buffer.clear()
        self._linger = self.loop.call_later(seconds, self.close)

    @property
    def lingering(self) -> bool:
        return self._linger is not None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Abort with a TCP reset (SO_LINGER 0), so the peer sees an error, not a clean end of stream."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    def close_pair(self) -> None:
        self.close()
        if self.peer is not None:
            self.peer.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def splice(client: Side, upstream: Side) -> None:
    """Connect two Sides: everything buffered is forwarded, then every chunk as it arrives."""
    for src, dst in ((client, upstream), (upstream, client)):
        if src.buffer:
            data = src.take()
            src.forwarded += len(data)
            dst.write(data)
    client.peer, upstream.peer = upstream, client
    if client.lost or upstream.lost:
        client.close_pair()
        return
    for side in (client, upstream):
        if side.eof and not side.pass_eof():
            return


class IdleSweeper:
    """Closes tunnels whose byte counters did not move for ``idle_timeout`` seconds."""

    def __init__(self, idle_timeout: float, clock: Callable[[], float]) -> None:
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._pairs: dict[tuple[Side, Side], tuple[int, float]] = {}

    @property
    def interval(self) -> float:
        return max(0.05, min(self.idle_timeout / 4, 5.0))

    def add(self, client: Side, upstream: Side) -> None:
        self._pairs[(client, upstream)] = (-1, self._clock())

    def discard(self, client: Side, upstream: Side) -> None:
        self._pairs.pop((client, upstream), None)

    def sweep(self) -> int:
        """Abort idle pairs; return how many were aborted."""
        now = self._clock()
        aborted = 0
        for pair, (seen, since) in list(self._pairs.items()):
            total = pair[0].forwarded + pair[1].forwarded
            if total != seen:
                self._pairs[pair] = (total, now)
            elif now - since >= self.idle_timeout:
                del self._pairs[pair]
                pair[0].abort()
                pair[1].abort()
                aborted += 1
        return aborted

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep()


SO_PEERNAME = getattr(socket, "SO_PEERNAME", 28)  # Linux


def peer_address(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """The client's (ip, port), as the kernel knows it from the accept.

    ``getpeername`` fails once the client has reset the connection, which a
    client can do right behind a complete request; ``SO_PEERNAME`` reads the
    same address without that check (Linux keeps it on the socket until it is
    closed). None only when neither answers.
    """
    peer = transport.get_extra_info("peername")
    if peer:
        return peer[0], peer[1]
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    v6 = sock.family == socket.AF_INET6
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERNAME, 28 if v6 else 16)
    except OSError:
        return None
    port = int.from_bytes(raw[2:4], "big")
    if v6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
