"""Feeding a Side's bytes to an h11 connection until it yields an event: the one read loop of HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import h11

from egressd.errors import ProxyError
from egressd.relay import Side


async def receive(
    side: Side,
    conn: h11.Connection,
    timeout: float,
    stalled: Callable[[], ProxyError],
    malformed: Callable[[h11.RemoteProtocolError], ProxyError],
) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event from side, reading as needed for at most ``timeout`` seconds.

    ``stalled()`` is raised when the time runs out, ``malformed(exc)`` when h11
    refuses the bytes; at EOF h11 is told, so it yields ConnectionClosed or
    refuses an incomplete message.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if side.buffer:
            conn.receive_data(side.take())
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise malformed(exc) from None
        if event is not h11.NEED_DATA:
            return event
        if side.eof:
            conn.receive_data(b"")
            continue
        try:
            await side.read_more(deadline)
        except TimeoutError:
            raise stalled() from None
