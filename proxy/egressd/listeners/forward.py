"""Absolute-form plain HTTP forwarding, one request at a time, each one checked.

For every request on a client connection: the Host header must name the URL's
host (checked in :func:`egressd.sniff.http.parse_target`), the policy decides,
the name is resolved and pinned, and the request is re-framed by h11 towards
the origin in origin-form without hop-by-hop headers. The response is framed
back by the client-side h11 connection. An upstream connection is reused for
the next request only when it names the same host and port and both h11 sides
finished their exchange cleanly; otherwise each side is closed.
"""

from __future__ import annotations

import h11

from egressd.audit import Record
from egressd.connection import Engine
from egressd.errors import BadRequest, UpstreamFailure, UpstreamTimeout
from egressd.listeners.httpio import receive
from egressd.relay import Side
from egressd.sniff.http import Target, bad_request, forward_headers


class Forwarder:
    """The plain-HTTP side of one client connection, with at most one kept-alive upstream."""

    def __init__(self, engine: Engine, client: Side, conn: h11.Connection) -> None:
        self.engine = engine
        self.client = client
        self.conn = conn
        self.key: tuple[str, int] | None = None
        self.upstream: Side | None = None
        self.origin: h11.Connection | None = None
        self.pinned: tuple[str | None, list[str]] = (None, [])

    async def exchange(self, rec: Record, request: h11.Request, target: Target) -> bool:
        """Forward one request and its response; return True when the client connection can take another."""
        rec.protocol = "http"
        rec.request = rec.request or 1
        dest = target.dest
        self.engine.authorize(rec, dest)
        key = (dest.host, dest.port)
        if self.upstream is None or self.key != key or self.upstream.eof:
            self.close()
            self.upstream = await self.engine.connect(rec, dest)
            self.origin = h11.Connection(h11.CLIENT)
            self.key = key
            self.pinned = (rec.upstream, rec.resolved)
        else:
            rec.upstream, rec.resolved = self.pinned
        upstream, origin = self.upstream, self.origin
        assert origin is not None
        headers = forward_headers(list(request.headers))
        up = origin.send(h11.Request(method=request.method, target=target.path, headers=headers))
        upstream.write(up)
        rec.bytes_up += len(up)
        await self._send_body(rec, upstream, origin)
        await self._relay_response(rec, upstream, origin)
        if not next_cycle(origin):
            self.close()
        if next_cycle(self.conn):
            self.engine.close(rec)
            return True
        return False

    async def _send_body(self, rec: Record, upstream: Side, origin: h11.Connection) -> None:
        timeout = self.engine.config.idle_timeout
        while True:
            event = await receive(
                self.client, self.conn, timeout,
                stalled=lambda: BadRequest(f"the request body stalled for {timeout:g}s", status=408),
                malformed=bad_request,
            )
            if not isinstance(event, h11.Data | h11.EndOfMessage):
                raise BadRequest(f"unexpected {type(event).__name__} while reading the request body")
            out = origin.send(event)
            if out:
                upstream.write(out)
                rec.bytes_up += len(out)
                await upstream.drain()
            if isinstance(event, h11.EndOfMessage):
                return

    async def _relay_response(self, rec: Record, upstream: Side, origin: h11.Connection) -> None:
        client, conn = self.client, self.conn
        timeout = self.engine.config.idle_timeout
        while True:
            event = await receive(
                upstream, origin, timeout,
                stalled=lambda: UpstreamTimeout(f"the origin sent no response within {timeout:g}s"),
                malformed=lambda exc: UpstreamFailure(f"the origin sent malformed HTTP: {exc}"),
            )
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamFailure("the origin closed the connection before a complete response")
            if isinstance(event, h11.InformationalResponse | h11.Response):
                if rec.status is None or isinstance(event, h11.Response):
                    rec.status = event.status_code
                event = type(event)(
                    status_code=event.status_code, headers=forward_headers(list(event.headers)), reason=event.reason
                )
            try:
                out = conn.send(event)
            except h11.LocalProtocolError as exc:
                raise UpstreamFailure(f"cannot pass the origin's response on: {exc}") from None
            if out:
                client.write(out)
                rec.bytes_down += len(out)
                await client.drain()
            if isinstance(event, h11.EndOfMessage):
                return

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        self.upstream = self.origin = self.key = None


def next_cycle(conn: h11.Connection) -> bool:
    """Start the connection's next request/response cycle if both sides finished this one cleanly."""
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return True
    return False
