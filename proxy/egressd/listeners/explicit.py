"""The explicit proxy listener: HTTP CONNECT tunnels and absolute-form plain HTTP.

Each accepted client gets a :class:`~egressd.relay.Side` and one task running
:func:`serve_client`. Request heads are parsed by llhttp (httptools, see
:mod:`egressd.sniff.http`); the request line names the destination, and the
shared steps of :mod:`egressd.connection` do the rest:

``CONNECT host:port``
    authorize → resolve+pin → dial → ``200`` → on TLS ports, the first client
    bytes must be a ClientHello whose SNI equals ``host`` (checked before a
    byte goes upstream) → splice; the task ends there, and the relay's callbacks
    carry the tunnel until either side ends.
``GET http://host/path`` (and every other method)
    handed to :class:`~egressd.listeners.forward.Forwarder`, which checks every request of
    a kept-alive connection again.

Denials get 403 with ``X-Egressd-Reason``, DNS and connect failures 502/504,
parse errors 400/408/431; the connection then closes. One audit record per
tunnel or forwarded request, emitted by ``Engine.close``: in the handler's
``finally``, or for a spliced tunnel when its second connection is gone.
"""

from __future__ import annotations

import asyncio

import structlog

from egressd.audit import Record
from egressd.connection import Client, Engine
from egressd.errors import BadRequest, Denied, ProxyError
from egressd.hostport import BadDestination, Destination, normalize_host
from egressd.listeners.forward import DONE, SPLICED, Forwarder
from egressd.listeners.httpio import CLOSED, next_event, whole_response
from egressd.policy.model import Reason
from egressd.relay import Side
from egressd.sniff.http import Head, RequestParser
from egressd.sniff.target import Target, parse_target
from egressd.sniff.tls import HelloStatus, parse_client_hello

LISTENER = "explicit"
log = structlog.get_logger("egressd.explicit")

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def error_response(status: int, reason: Reason, body: bytes) -> bytes:
    headers = [(b"X-Egressd-Reason", reason.value.encode()), (b"Content-Type", b"text/plain; charset=utf-8")]
    return whole_response(status, headers, body)


async def serve_client(engine: Engine, client: Side, who: Client) -> None:
    """Serve one client connection: a CONNECT tunnel, or plain HTTP requests each with its record.

    A spliced tunnel outlives this task: its record then belongs to
    :meth:`Engine.splice`, which emits it when both connections are gone.
    """
    rec = engine.open(who, LISTENER)
    requests = RequestParser(engine.config.max_header_bytes)
    forwarder = None
    spliced = False
    try:
        first = True
        while True:
            head = await read_head(engine, client, requests, first)
            if head is None:
                if not first:
                    rec.emitted = True  # the client ended a kept-alive connection: no request, no record
                else:
                    rec.note("the client closed the connection before sending a request")
                return
            rec.protocol = "connect" if head.method == b"CONNECT" else "http"
            if not first and (refused := engine.audit_refusal()) is not None:  # a kept-alive connection's next
                raise refused
            first = False
            target = parse_target(head)
            if target.connect:
                if forwarder is not None:  # plain HTTP first, then CONNECT: its upstream is done with
                    forwarder.close()
                    forwarder = None
                client.buffer[:0] = requests.rest  # the tunnel's first bytes, sent right behind the head
                await tunnel(engine, rec, client, target)
                spliced = True
                return
            if forwarder is None:
                forwarder = Forwarder(engine, client, requests)
            outcome = await forwarder.exchange(rec, head, target)
            if outcome is SPLICED:
                spliced = True
                return
            if outcome is DONE:
                return
            rec = engine.open(who, LISTENER, follows=rec)
    except ProxyError as exc:
        answered = rec.status is not None
        if exc.dest is not None and rec.host is None:
            rec.host, rec.port = exc.dest.host, exc.dest.port
        engine.fail(rec, exc)
        if answered and rec.protocol == "http":  # a response cut short: a reset, never a clean end of stream
            client.reset()
        elif answered:  # 200 to CONNECT went out: no error answer can follow it
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
        if not spliced:
            if forwarder is not None:
                forwarder.close()
            engine.close(rec)
            if not client.lingering:
                client.close()


async def read_head(engine: Engine, client: Side, requests: RequestParser, first: bool) -> Head | None:
    """The next request head; None when the client closes cleanly between requests.

    The first request must arrive within header_timeout; a kept-alive connection
    may wait idle_timeout for its next request, then header_timeout for its head.
    """
    cfg = engine.config
    loop = asyncio.get_running_loop()
    if not first and not requests.events and not client.buffer and not client.eof:
        try:
            await client.read_more(loop.time() + cfg.idle_timeout)
        except TimeoutError:
            return None
    timeout = cfg.header_timeout
    event = await next_event(
        client, requests, loop.time() + timeout,
        stalled=lambda: BadRequest(f"no complete request head within {timeout:g}s", status=408),
    )
    if event is CLOSED:
        if requests.in_head:
            raise BadRequest("the client closed the connection in the middle of its request head")
        return None
    if not isinstance(event, Head):
        raise BadRequest("request body bytes where a request head was expected")
    return event


async def tunnel(engine: Engine, rec: Record, client: Side, target: Target) -> None:
    """CONNECT: decide, dial, answer 200, bind the SNI to the name, then hand the pair to the relay."""
    rec.protocol = "connect"
    dest = target.dest
    decision = engine.authorize(rec, dest)
    upstream = await engine.connect(rec, dest)
    try:
        rec.status = 200
        client.write(ESTABLISHED)
        if decision.tls_required:
            await read_sni(engine, rec, client, dest)
    except BaseException:
        upstream.close()
        raise
    if client.lost:
        rec.note("the client closed the tunnel before sending anything")
    engine.splice(rec, client, upstream)


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

    __slots__ = ("engine", "who")

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.engine = engine
        self.who: Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        engine = self.engine
        who = self.who = engine.who(self)
        if who is None:  # reset before anyone could see who it was: nothing to serve, nobody to answer
            log.warning("connection.no_peer_address", listener=LISTENER)
            self.abort()
            return
        refused = engine.admit(who)
        if refused is not None:
            rec = engine.open(who, LISTENER)
            engine.fail(rec, refused)
            self.write(error_response(refused.status, refused.reason, engine.denial_body(rec, refused)))
            self.linger()
            engine.close(rec)
            self.who = None  # not counted as active: nothing to release
            return
        engine.serve(self, who, serve_client)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.who is not None:
            self.engine.release(self, self.who)


async def start(engine: Engine, host: str, port: int, reuse_port: bool = False) -> asyncio.Server:
    """Listen for explicit-proxy clients on host:port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Client(engine, loop), host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port or None
    )
