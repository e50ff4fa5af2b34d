"""Absolute-form plain HTTP forwarding, one request at a time, each one checked.

For every request on a client connection: the Host header must name the URL's
host (checked in :func:`egressd.sniff.target.parse_target`), the policy decides,
the name is resolved and pinned, and the request goes to the origin in
origin-form without hop-by-hop headers. Messages are parsed by llhttp
(:mod:`egressd.sniff.http`); heads are written here, bodies pass through as
they arrive, re-chunked when they were chunked. The transparent listener hands
it origin-form requests named by their Host header on the port the client
dialled (:func:`egressd.sniff.target.parse_origin_target`), each checked the
same way.

Framing towards the client follows the origin's where it can: a Content-Length
body passes as is; a chunked or close-delimited body is sent chunked to an
HTTP/1.1 client and close-delimited (then the connection closes) to an HTTP/1.0
one. ``Expect: 100-continue`` is answered by egressd itself once the origin is
connected, and not forwarded. Trailers of chunked bodies are dropped.

An upstream connection is reused for the next request only when it names the
same host and port and the origin's response left it reusable (not
close-delimited, not ``Connection: close``, not an answer to HEAD); otherwise
it is closed.

Protocol upgrades: an ``h2c`` (or any non-WebSocket) offer is not carried out;
the request is forwarded without ``Upgrade``/``HTTP2-Settings``, body and all,
as Squid does. A WebSocket upgrade (``GET ws://...`` as aiohttp and Node's
``ws`` send through an HTTP proxy) is forwarded with its ``Upgrade``; when the
origin answers ``101`` the two connections are spliced like a CONNECT tunnel
and the request's record covers the whole conversation (protocol
``websocket``).
"""

from __future__ import annotations

import asyncio

from egressd.connection import Engine
from egressd.errors import BadRequest, ClientGone, Denied, UpstreamFailure, UpstreamTimeout
from egressd.hostport import IPAddress, quoted
from egressd.inspect.rules import Inspect, check_request
from egressd.listeners.httpio import CLOSED, LAST_CHUNK, chunk, next_event, serialize
from egressd.policy.model import Reason
from egressd.records import Record
from egressd.relay import Side
from egressd.sniff.http import NO_BODY_STATUSES, Head, RequestParser, ResponseParser, forward_headers
from egressd.sniff.target import Target

# An origin's response head may be larger than what clients may send, but not without bound.
RESPONSE_HEAD_LIMIT = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_NOT_FORWARDED = frozenset({b"expect", b"http2-settings"})
_SWITCH = [(b"connection", b"upgrade")]

# What :meth:`Forwarder.exchange` leaves behind.
NEXT = "next"  # the client connection may send another request
DONE = "done"  # the client connection ends here
SPLICED = "spliced"  # the connection became a tunnel (WebSocket); the relay owns it and its record


class _Batch:
    """What goes to one side, written in one call once the parser has nothing more queued
    (a small response's head and body leave in one write)."""

    __slots__ = ("side", "parts", "count")

    def __init__(self, side: Side) -> None:
        self.side = side
        self.parts: list[bytes] = []
        self.count = 0  # bytes written, for the record

    def add(self, data: bytes) -> None:
        self.parts.append(data)

    async def flush(self) -> None:
        parts = self.parts
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            self.side.write(data)
            self.count += len(data)
            await self.side.drain()


def check_plain(rec: Record, inspect: Inspect, head: Head, target: Target) -> None:
    """An inspected name's rules over a plain HTTP request: a note in the record, or Denied
    ``request_not_allowed`` naming the method and path."""
    method = head.method.decode("ascii", "replace")
    verdict = check_request(inspect, method, target.path)
    shown = verdict.path or quoted(target.path.decode("ascii", "replace"))
    if not verdict.allowed:
        why = verdict.refusal or f"no inspect: entry of {rec.rule} allows it"
        raise Denied(Reason.REQUEST_NOT_ALLOWED, f"{method} {shown} is not allowed: {why}", dest=target.dest)
    rec.note(f"{method} {shown} allowed by the inspect: entry at {verdict.source}")


class Forwarder:
    """The plain-HTTP side of one client connection, with at most one kept-alive upstream."""

    def __init__(
        self, engine: Engine, client: Side, requests: RequestParser, original: IPAddress | None = None
    ) -> None:
        """``original``: the address a redirected client dialled (transparent listener), for the records."""
        self.engine = engine
        self.client = client
        self.requests = requests
        self.original = original
        self.key: tuple[str, int] | None = None
        self.upstream: Side | None = None
        self.responses: ResponseParser | None = None
        self.pinned: tuple[str | None, list[str], bool | None] = (None, [], None)

    async def exchange(self, rec: Record, head: Head, target: Target) -> str:
        """Forward one request and its response; return :data:`NEXT`, :data:`DONE` or :data:`SPLICED`."""
        rec.protocol = "http"
        rec.request = rec.request or 1
        dest = target.dest
        inspect = self.engine.authorize(rec, dest).inspect
        if inspect is not None:  # plain HTTP shows its method and path without interception: checked here
            check_plain(rec, inspect, head, target)
        key = (dest.host, dest.port)
        if self.upstream is None or self.key != key or self.upstream.eof:
            self.close()
            self.upstream = await self.engine.connect(rec, dest, self.original)
            self.responses = ResponseParser(RESPONSE_HEAD_LIMIT)
            self.key = key
            self.pinned = (rec.upstream, rec.resolved, rec.original_dst_in_answer)
        else:
            rec.upstream, rec.resolved, rec.original_dst_in_answer = self.pinned
        upstream, responses = self.upstream, self.responses
        assert responses is not None
        line = head.method + b" " + target.path + b" HTTP/1.1\r\n"
        headers = forward_headers(head.headers, _NOT_FORWARDED)
        if head.get(b"host") is None:  # HTTP/1.0 without Host: the URL named it, HTTP/1.1 needs it
            headers.insert(0, (b"host", dest.authority.removesuffix(":80").encode()))
        if head.upgrade is not None:
            headers += [*_SWITCH, (b"upgrade", head.upgrade)]
            responses.expect_switch(head.upgrade)
        up = _Batch(upstream)
        up.add(serialize(line, headers))
        expect = head.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and (head.chunked or head.length):
            self.client.write(CONTINUE)
        try:
            await self._send_body(up, head.chunked)
        finally:
            rec.bytes_up += up.count
        down = _Batch(self.client)
        try:
            reusable, keep_client = await self._relay_response(rec, down, responses, head)
        finally:
            rec.bytes_down += down.count
        if responses.upgraded:
            return self._switch(rec)
        if not reusable:
            self.close()
        # The parser stopped at an upgrade: this request's (the connection ends), or that of a CONNECT or
        # WebSocket head pipelined behind it, which is served next like any other request.
        if keep_client and (not self.requests.upgraded or head.upgrade is None):
            self.engine.close(rec)
            return NEXT
        return DONE

    def _switch(self, rec: Record) -> str:
        """The origin switched to the protocol the client asked for: from here on the pair is a tunnel."""
        upstream, responses = self.upstream, self.responses
        assert upstream is not None and responses is not None
        self.upstream = self.responses = self.key = None
        rec.protocol = "websocket"
        self.client.buffer[:0] = self.requests.rest
        upstream.buffer[:0] = responses.rest
        self.engine.splice(rec, self.client, upstream)
        return SPLICED

    async def _send_body(self, up: _Batch, chunked: bool) -> None:
        """Pass the request body on; the head is already in ``up``."""
        timeout = self.engine.config.idle_timeout
        loop = asyncio.get_running_loop()
        requests = self.requests
        while True:
            if not requests.events:
                await up.flush()
            event = await next_event(
                self.client, requests, loop.time() + timeout,
                stalled=lambda: BadRequest(f"the request body stalled for {timeout:g}s", status=408),
            )
            if event is CLOSED:
                raise ClientGone("the client closed the connection in the middle of its request body")
            if event is None:  # END
                if chunked:
                    up.add(LAST_CHUNK)
                await up.flush()
                return
            assert isinstance(event, bytes)
            up.add(chunk(event) if chunked else event)

    async def _relay_response(
        self, rec: Record, down: _Batch, responses: ResponseParser, request: Head
    ) -> tuple[bool, bool]:
        """Pass the origin's response on; (upstream reusable, client connection may continue)."""
        upstream = self.upstream
        assert upstream is not None
        timeout = self.engine.config.idle_timeout
        loop = asyncio.get_running_loop()
        head_only = request.method == b"HEAD"
        if head_only:
            responses.expect_head_only()
        rechunk = False
        reusable = keep_client = False
        while True:
            if not responses.events:
                await down.flush()
            try:
                event = await next_event(
                    upstream, responses, loop.time() + timeout,
                    stalled=lambda: UpstreamTimeout(f"the origin sent no response within {timeout:g}s"),
                )
            except ValueError as exc:
                raise UpstreamFailure(f"the origin sent malformed HTTP: {exc}") from None
            if event is CLOSED:
                if upstream.error is not None:
                    raise UpstreamFailure(f"the origin reset the connection: {upstream.error}")
                if responses.feed_eof():
                    continue
                raise UpstreamFailure("the origin closed the connection before a complete response")
            if isinstance(event, Head):
                if event.upgrade is not None:  # 101 to the protocol the client asked for
                    rec.status = 101
                    line = b"HTTP/1.1 101 %s\r\n" % event.reason
                    down.add(serialize(line, [*forward_headers(event.headers), *_SWITCH, (b"upgrade", event.upgrade)]))
                    await down.flush()
                    return False, False
                if event.status < 200:  # interim: pass it on, the final response follows
                    line = b"HTTP/1.1 %d %s\r\n" % (event.status, event.reason)
                    down.add(serialize(line, forward_headers(event.headers)))
                    continue
                rec.status = event.status
                out, rechunk, keep_client = self._response_head(event, request, head_only)
                down.add(out)
                reusable = event.keep_alive and not head_only and (
                    event.chunked or event.length is not None or event.status in NO_BODY_STATUSES
                )
            elif event is None:  # END
                if rechunk:
                    down.add(LAST_CHUNK)
                await down.flush()
                return reusable, keep_client
            else:
                down.add(chunk(event) if rechunk else event)

    @staticmethod
    def _response_head(head: Head, request: Head, head_only: bool) -> tuple[bytes, bool, bool]:
        """The response head for the client; (bytes, re-chunk the body, client connection may continue)."""
        keep = request.keep_alive
        if head_only or head.status in NO_BODY_STATUSES:
            headers, rechunk = forward_headers(head.headers), False
        elif head.length is not None and not head.chunked:
            headers, rechunk = forward_headers(head.headers), False
        else:
            headers = forward_headers(head.headers, _FRAMING)
            coding = head.get(b"transfer-encoding")
            codings = [c.strip() for c in coding.split(b",")] if coding else []
            if head.chunked:
                codings.pop()  # removed by the parser; other codings stay on the body
            rechunk = request.version == "1.1"
            if rechunk:
                codings.append(b"chunked")
            else:
                keep = False  # HTTP/1.0 client: the body ends when the connection does
            if codings:
                headers.append((b"transfer-encoding", b", ".join(codings)))
        if not keep:
            headers.append((b"connection", b"close"))
        elif request.version == "1.0":
            headers.append((b"connection", b"keep-alive"))
        return serialize(b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason), headers), rechunk, keep

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        self.upstream = self.responses = self.key = None
