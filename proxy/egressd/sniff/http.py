"""HTTP/1.x messages, parsed by llhttp (through httptools): bytes in, events out.

:class:`RequestParser` and :class:`ResponseParser` are fed bytes as they arrive
and queue what llhttp found: a :class:`Head`, body pieces (``bytes``, with
chunked coding already removed) and :data:`END` at the end of each message.
Trailer fields are dropped: llhttp reports them as it reports header fields,
and they must never join the head (a trailing Content-Length or Host would be
forwarded as if the client had sent it up front).
Pipelined messages simply queue one after the other. llhttp refuses what RFC
9112 refuses (bad tokens and control characters, bare LF, obs-fold, both
Content-Length and Transfer-Encoding, duplicate Content-Length, a
Transfer-Encoding that does not end in ``chunked`` on a request); those become
:class:`~egressd.errors.BadRequest` here, with llhttp's words. So does what
llhttp lets through but RFC 9112 6.1 calls faulty framing: Transfer-Encoding
in an HTTP/1.0 request.

What a request head names (:mod:`egressd.sniff.target`) is checked apart from
the parsing here. :func:`forward_headers` drops what does not cross a hop,
never the framing or the Host, whatever a Connection header lists.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import httptools

from egressd.errors import BadRequest

# Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus the proxy's own.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
        b"te", b"trailer", b"upgrade",
    }
)
NO_BODY_STATUSES = frozenset({204, 304})
END = None  # the event that ends a message


@dataclass(slots=True)
class Head:
    """A request or response head. Header names are lower-cased; values are as sent."""

    method: bytes = b""  # requests
    target: bytes = b""  # requests
    status: int = 0  # responses
    reason: bytes = b""  # responses
    version: str = "1.1"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    keep_alive: bool = True  # what the message says of its connection, as llhttp reads it
    chunked: bool = False  # the body is chunked (Transfer-Encoding ends in chunked)
    length: int | None = None  # Content-Length, if given
    upgrade: bytes | None = None  # a protocol switch the parser stopped for (requests: b"websocket")

    def get(self, name: bytes) -> bytes | None:
        return next((value for n, value in self.headers if n == name), None)

    def size(self) -> int:
        """About the bytes of the head on the wire."""
        return len(self.method) + len(self.target) + len(self.reason) + 14 + sum(
            len(n) + len(v) + 4 for n, v in self.headers
        )


Event = Head | bytes | None


class _Parser:
    """Drives an llhttp parser; its callbacks queue events. ``limit`` bounds a head's bytes (431)."""

    __slots__ = (
        "_parser", "events", "_head", "_url", "_open_for", "_fed", "_ended", "_in_message", "limit", "_synthetic",
    )

    def __init__(self, parser: httptools.HttpRequestParser | httptools.HttpResponseParser, limit: int) -> None:
        self._parser = parser
        self.events: deque[Event] = deque()
        self._head: Head | None = None
        self._url = b""
        self._open_for = 0  # bytes fed since the current head began (0: no head in progress)
        self._fed = 0  # bytes fed in all
        self._ended = 0  # messages completed
        self._in_message = False
        self.limit = limit
        self._synthetic = False  # a head egressd made up to parse a body, never queued

    @property
    def in_head(self) -> bool:
        """Part of a head has been fed, not all of it."""
        return self._open_for > 0

    # -- llhttp callbacks (the URL and status may come in pieces; a header comes whole) --
    def on_message_begin(self) -> None:
        self._head = Head()
        self._url = b""
        self._open_for = 1
        self._in_message = True

    def on_url(self, piece: bytes) -> None:
        self._url += piece

    def on_status(self, piece: bytes) -> None:
        self._url += piece

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._open_for:  # a field of the head; a chunked body's trailer fields come later and are dropped
            self._head.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        head, parser = self._head, self._parser
        assert head is not None
        self._open_for = 0
        if self._synthetic:
            return
        head.version = parser.get_http_version()
        head.keep_alive = parser.should_keep_alive()
        self._complete(head, parser)
        for name, value in head.headers:
            if name == b"content-length":
                head.length = int(value)
            elif name == b"transfer-encoding":
                head.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        if self._fed > self.limit and head.size() > self.limit:  # (a head cannot be longer than the bytes fed)
            raise BadRequest(f"head of about {head.size()} bytes exceeds the limit of {self.limit}", status=431)
        self.events.append(head)

    def _complete(self, head: Head, parser: object) -> None:
        raise NotImplementedError

    def on_body(self, piece: bytes) -> None:
        self.events.append(piece)

    def on_message_complete(self) -> None:
        self._ended += 1
        self._in_message = False
        self.events.append(END)

    def _feed(self, data: bytes) -> None:
        """Parse data; raises httptools' errors (the subclasses say what they mean).

        A head still open after a feed is bounded by ``limit`` (431) as it grows:
        its bytes are the whole piece when it began at the piece's start (no
        message was in progress and none ended in it), else those of the pieces
        after the one it began in (that one is bounded by the read buffer). The
        complete head is measured again in on_headers_complete.
        """
        began_before = self._open_for > 0
        at_start = not self._in_message
        ended = self._ended
        self._fed += len(data)
        self._parser.feed_data(data)
        if self._open_for:
            if began_before:
                self._open_for += len(data)
            else:
                self._open_for = len(data) if at_start and self._ended == ended else 1
            if self._open_for > self.limit:
                raise BadRequest(f"head exceeds the limit of {self.limit} bytes", status=431)


class RequestParser(_Parser):
    """Client requests. After a CONNECT or a WebSocket upgrade llhttp stops: ``upgraded`` is set and
    ``rest`` holds the bytes that came behind the head."""

    __slots__ = ("upgraded", "rest")

    def __init__(self, limit: int) -> None:
        super().__init__(httptools.HttpRequestParser(self), limit)
        self.upgraded = False
        self.rest = b""

    def _complete(self, head: Head, parser: httptools.HttpRequestParser) -> None:  # type: ignore[override]
        head.method = parser.get_method()
        head.target = self._url
        if head.version not in ("1.1", "1.0"):
            raise BadRequest(f"HTTP/{head.version} is not supported; send HTTP/1.1")
        if head.version == "1.0" and head.get(b"transfer-encoding") is not None:  # RFC 9112 6.1: faulty framing
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request cannot be trusted; send HTTP/1.1")

    def feed(self, data: bytes) -> None:
        """Parse client bytes; BadRequest (400, 431) when they are not HTTP/1.x."""
        if self.upgraded:
            self.rest += data
            return
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, BadRequest):
                raise cause from None
            raise BadRequest(f"malformed HTTP: {exc}") from None
        except httptools.HttpParserError as exc:
            raise BadRequest(f"malformed HTTP: {exc}") from None

    def _upgrade(self, rest: bytes) -> None:
        """llhttp stopped behind a head that asks for another protocol (it skipped any body).

        CONNECT and a bodiless WebSocket upgrade stop here for good. Any other
        offer (``Upgrade: h2c``, as curl --http2 sends) is not carried out: a fresh
        llhttp parses the body the head announced (behind a head made up for it,
        never queued), then the requests that follow.
        """
        head = next(event for event in reversed(self.events) if isinstance(event, Head))
        offer = (head.get(b"upgrade") or b"").strip().lower()
        if head.method == b"CONNECT" or (offer == b"websocket" and not head.chunked and not head.length):
            head.upgrade = None if head.method == b"CONNECT" else offer
            self.upgraded = True
            self.rest = rest
            return
        self._parser = httptools.HttpRequestParser(self)
        if head.chunked or head.length:
            self.events.pop()  # the END llhttp queued without the body
            framing = b"transfer-encoding: chunked" if head.chunked else b"content-length: %d" % head.length
            self._synthetic = True
            try:
                self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
            finally:
                self._synthetic = False
        if rest:
            self.feed(rest)


class ResponseParser(_Parser):
    """Origin responses to the requests sent on one connection, in order.

    llhttp cannot be told that a response answers HEAD (it would wait for the
    body its Content-Length announces), so :meth:`expect_head_only` makes the
    next final response end at its head; the connection must then not be reused.
    A body delimited by the connection's end (no Content-Length, not chunked)
    ends at :meth:`feed_eof`.
    """

    __slots__ = ("_head_only", "_close_delimited", "switch_to", "upgraded", "rest")

    def __init__(self, limit: int) -> None:
        super().__init__(httptools.HttpResponseParser(self), limit)
        self._head_only = False
        self._close_delimited = False
        self.switch_to: bytes | None = None  # the protocol the request asked to switch to, if any
        self.upgraded = False
        self.rest = b""

    def expect_head_only(self) -> None:
        self._head_only = True

    def expect_switch(self, protocol: bytes) -> None:
        """The request asked for ``protocol``: a ``101`` naming it ends HTTP on this connection (``rest``
        then holds the bytes behind its head); any other 101 is still an error."""
        self.switch_to = protocol

    def _complete(self, head: Head, parser: httptools.HttpResponseParser) -> None:  # type: ignore[override]
        head.status = parser.get_status_code()
        head.reason = self._url

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        head = self.events[-1]
        assert isinstance(head, Head)
        if head.status >= 200:
            self._close_delimited = not (
                head.chunked or head.length is not None or head.status in NO_BODY_STATUSES or self._head_only
            )
            if self._head_only:
                self.events.append(END)
                raise _HeadOnly

    def on_message_complete(self) -> None:
        self._close_delimited = False
        super().on_message_complete()

    def feed(self, data: bytes) -> None:
        """Parse origin bytes; ValueError with llhttp's words when they are not an HTTP/1.x response."""
        if self.upgraded:
            self.rest += data
            return
        try:
            self._feed(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadOnly):
                return
            raise ValueError(str(cause or exc)) from None
        except httptools.HttpParserUpgrade as upgrade:
            head = next((e for e in reversed(self.events) if isinstance(e, Head)), None)
            offer = (head.get(b"upgrade") or b"").strip().lower() if head is not None else b""
            if head is None or head.status != 101 or self.switch_to is None or offer != self.switch_to:
                raise ValueError("the origin switched protocols (101) unasked; egressd forwards HTTP/1.x") from None
            head.upgrade = offer
            self.upgraded = True
            self.rest = data[upgrade.args[0]:]
        except httptools.HttpParserError as exc:
            raise ValueError(str(exc)) from None
        except BadRequest as exc:
            raise ValueError(str(exc)) from None

    def feed_eof(self) -> bool:
        """The origin closed: END for a close-delimited body; False if a message was cut short."""
        if self._close_delimited:
            self._close_delimited = False
            self.events.append(END)
            return True
        return False


class _HeadOnly(Exception):
    """Stops llhttp after the head of a response to HEAD."""


Headers = list[tuple[bytes, bytes]]


# What a Connection header may not remove: the fields that frame the message and name its host. A client that
# lists Content-Length there would have its body reach the origin without it, read as a request never decided.
KEPT = frozenset({b"content-length", b"transfer-encoding", b"host"})


def forward_headers(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """Drop hop-by-hop headers, those the Connection header lists (never those of :data:`KEPT`), and ``drop``."""
    listed = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    } - KEPT
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in listed and n not in drop]
