"""The explicit proxy listener: HTTP CONNECT tunnels and absolute-form plain HTTP.

Each accepted client gets a :class:`~egressd.relay.Side` and one task running
:func:`serve_client`. Request heads are parsed by h11; the request line names
the destination, and the shared steps of :mod:`egressd.connection` do the rest:

``CONNECT host:port``
    authorize → resolve+pin → dial → ``200`` → on TLS ports, the first client
    bytes must be a ClientHello whose SNI equals ``host`` (checked before a
    byte goes upstream) → splice until either side ends.
``GET http://host/path`` (and every other method)
    handed to :class:`~egressd.listeners.forward.Forwarder`, which checks every request of
    a kept-alive connection again.

Denials get 403 with ``X-Egressd-Reason``, DNS and connect failures 502/504,
parse errors 400/408/431; the connection then closes. One audit record per
tunnel or forwarded request, emitted by ``Engine.close`` in a ``finally``.
"""

from __future__ import annotations

import asyncio

import h11
import structlog

from egressd.audit import Record
from egressd.connection import Client, Engine
from egressd.errors import BadRequest, Denied, ProxyError
from egressd.hostport import BadDestination, Destination, normalize_host
from egressd.listeners.forward import Forwarder
from egressd.listeners.httpio import receive
from egressd.policy.model import Reason
from egressd.relay import Side, closed, splice
from egressd.sniff.http import Target, bad_request, parse_target
from egressd.sniff.tls import HelloStatus, parse_client_hello

LISTENER = "explicit"
log = structlog.get_logger("egressd.explicit")

STATUS_TEXT = {
    400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def error_response(status: int, reason: Reason, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}\r\n"
        f"X-Egressd-Reason: {reason.value}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def serve_client(engine: Engine, client: Side, who: Client) -> None:
    """Serve one client connection until it closes; every request on it gets its record."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=engine.config.max_header_bytes)
    rec = engine.open(who, LISTENER)
    forwarder = Forwarder(engine, client, conn)
    first = True
    try:
        while True:
            request = await read_head(engine, client, conn, first)
            if request is None:
                if not first:
                    rec.emitted = True  # the client ended a kept-alive connection: no request, no record
                else:
                    rec.note("the client closed the connection before sending a request")
                return
            first = False
            target = parse_target(request)
            if target.connect:
                await tunnel(engine, rec, client, conn, target)
                return
            if not await forwarder.exchange(rec, request, target):
                return
            rec = engine.open(who, LISTENER, follows=rec)
    except ProxyError as exc:
        answered = rec.status is not None
        engine.fail(rec, exc)
        if answered:
            client.close()
        else:
            client.write(error_response(exc.status, exc.reason, engine.denial_body(rec, exc)))
            client.linger()
    except asyncio.CancelledError:
        rec.note("the proxy shut down")
        client.abort()
        raise
    except Exception as exc:  # a bug must cost one connection, never the process; the record still goes out
        log.exception("connection.internal_error", conn_id=rec.conn_id)
        rec.decision = "deny"
        rec.note(f"internal error: {type(exc).__name__}: {exc}")
        client.abort()
    finally:
        forwarder.close()
        engine.close(rec)
        if not client.lingering:
            client.close()


async def read_head(engine: Engine, client: Side, conn: h11.Connection, first: bool) -> h11.Request | None:
    """Read until h11 yields a request head; None when the client closes cleanly between requests.

    The first request must arrive within header_timeout; a kept-alive connection
    may wait idle_timeout for its next request, then header_timeout for its head.
    """
    cfg = engine.config
    loop = asyncio.get_running_loop()
    if not first and not client.buffer and not client.eof:
        try:
            await client.read_more(loop.time() + cfg.idle_timeout)
        except TimeoutError:
            return None
    timeout = cfg.header_timeout
    event = await receive(
        client, conn, timeout,
        stalled=lambda: BadRequest(f"no complete request head within {timeout:g}s", status=408),
        malformed=bad_request,
    )
    if isinstance(event, h11.Request):
        check_head_size(event, cfg.max_header_bytes)
        return event
    if isinstance(event, h11.ConnectionClosed):
        return None
    raise BadRequest(f"unexpected HTTP event {type(event).__name__}")


def check_head_size(request: h11.Request, limit: int) -> None:
    """h11 bounds only incomplete heads; a head that arrived whole is measured here."""
    size = len(request.method) + len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers) + 14
    if size > limit:
        raise BadRequest(f"request head of about {size} bytes exceeds --max-header-bytes {limit}", status=431)


async def tunnel(engine: Engine, rec: Record, client: Side, conn: h11.Connection, target: Target) -> None:
    """CONNECT: decide, dial, answer 200, bind the SNI to the name, then splice."""
    rec.protocol = "connect"
    dest = target.dest
    trailing, _ = conn.trailing_data
    if trailing:
        client.buffer[:0] = trailing
    decision = engine.authorize(rec, dest)
    upstream = await engine.connect(rec, dest)
    try:
        rec.status = 200
        client.write(ESTABLISHED)
        if decision.tls_required:
            await read_sni(engine, rec, client, dest)
        if client.lost:
            rec.note("the client closed the tunnel before sending anything")
        splice(client, upstream)
        engine.sweeper.add(client, upstream)
        try:
            await closed(client, upstream)
        finally:
            engine.sweeper.discard(client, upstream)
    finally:
        upstream.close()
        rec.bytes_up = client.forwarded
        rec.bytes_down = upstream.forwarded


async def read_sni(engine: Engine, rec: Record, client: Side, dest: Destination) -> None:
    """Wait for the ClientHello and record its SNI; raise Denied unless it names dest (nothing went upstream)."""
    deadline = asyncio.get_running_loop().time() + engine.config.hello_timeout
    try:
        while True:
            hello = parse_client_hello(client.buffer)
            if hello.status is not HelloStatus.NEED_MORE:
                break
            if client.eof:
                raise Denied(Reason.SNI_MISSING, "the client closed the tunnel before a complete TLS ClientHello")
            await client.read_more(deadline)
    except TimeoutError:
        raise Denied(
            Reason.SNI_MISSING, f"no TLS ClientHello within {engine.config.hello_timeout:g}s on a TLS port"
        ) from None
    if hello.status is not HelloStatus.OK:
        raise Denied(Reason.SNI_MISSING, f"the first bytes on a TLS port are not a TLS ClientHello: {hello.detail}")
    rec.sni = hello.sni
    if hello.sni is None:
        if dest.ip is not None:
            return
        raise Denied(Reason.SNI_MISSING, f"the TLS ClientHello carries no server name; expected {dest.host}")
    try:
        sni = normalize_host(hello.sni)
    except BadDestination as exc:
        raise Denied(Reason.SNI_MISMATCH, f"the TLS server name is not a host name: {exc}") from None
    if sni != dest.host:
        raise Denied(Reason.SNI_MISMATCH, f"TLS server name {sni} does not match CONNECT host {dest.host}")
    rec.sni = sni


class _Client(Side):
    """The client side of a connection: starts serve_client when accepted, or answers 503 when full."""

    __slots__ = ("engine",)

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.engine = engine

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        engine = self.engine
        who = engine.who(self)
        if len(engine.clients) >= engine.config.max_connections:
            rec = engine.open(who, LISTENER)
            exc = ProxyError(
                Reason.OVERLOADED, f"{len(engine.clients)} connections are open, the --max-connections limit", 503
            )
            engine.fail(rec, exc)
            self.write(error_response(503, exc.reason, engine.denial_body(rec, exc)))
            self.linger()
            engine.close(rec)
            return
        engine.serve(self, who, serve_client)


async def start(engine: Engine, host: str, port: int, reuse_port: bool = False) -> asyncio.Server:
    """Listen for explicit-proxy clients on host:port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Client(engine, loop), host, port, backlog=1024, reuse_port=reuse_port or None
    )
