"""Feeding a Side's bytes to an HTTP parser until it has an event: the one read loop of HTTP."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from egressd.errors import ProxyError
from egressd.relay import Side
from egressd.sniff.http import Event, RequestParser, ResponseParser

CLOSED = object()  # next_event's answer when the peer has ended and nothing is left to parse


def serialize(start_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A message head: the start line (with its CRLF), the header lines, the empty line."""
    return start_line + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"


def whole_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete response that ends its connection: status line with the standard phrase, ``headers``,
    then Content-Length, ``Connection: close`` and the body."""
    line = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
    return serialize(line, [*headers, (b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")]) + body


def chunk(piece: bytes) -> bytes:
    """One piece of a body in chunked coding."""
    return b"%x\r\n" % len(piece) + piece + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


async def next_event(
    side: Side,
    parser: RequestParser | ResponseParser,
    deadline: float,
    stalled: Callable[[], ProxyError],
) -> Event | object:
    """The next event of parser, fed with side's bytes as they arrive, by ``deadline`` (loop.time()).

    :data:`CLOSED` when side has ended and no event is left; ``stalled()`` is
    raised when the deadline passes. Parse errors come from ``parser.feed``.
    """
    events = parser.events
    while not events:
        if side.buffer:
            parser.feed(side.take())
            continue
        if side.eof:
            return CLOSED
        try:
            await side.read_more(deadline)
        except TimeoutError:
            raise stalled() from None
    return events.popleft()
