"""The explicit proxy listener: HTTP CONNECT tunnels and absolute-form plain HTTP.

Each accepted client gets a :class:`~egressd.relay.Side` and one task running
:func:`serve_client`, the request loop of :mod:`egressd.listeners.requests`.
Request heads are parsed by llhttp (httptools, see :mod:`egressd.sniff.http`);
the request line names the destination, and the shared steps of
:mod:`egressd.connection` do the rest:

``CONNECT host:port``
    authorize → resolve+pin → dial → ``200`` → on TLS ports, the first client
    bytes must be a ClientHello whose SNI equals ``host``, or, when ``host``
    is an IP address, a ClientHello without SNI (checked before a byte goes
    upstream) → splice; the task ends there, and the relay's callbacks
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

from egressd.connection import Client, Engine
from egressd.errors import Denied, ProxyError
from egressd.hostport import BadDestination, Destination, normalize_host, quoted
from egressd.listeners import Accepted, client_ip, recorded_sni
from egressd.listeners.requests import error_response, serve_requests
from egressd.policy.model import Reason
from egressd.records import Record
from egressd.relay import Side
from egressd.sniff.target import Target, parse_target
from egressd.sniff.tls import ClientHello, HelloStatus, parse_client_hello

LISTENER = "explicit"
log = structlog.get_logger("egressd.explicit")

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


async def serve_client(engine: Engine, client: Side, who: Client) -> None:
    """Serve one client connection: a CONNECT tunnel, or plain HTTP requests each with its record."""
    rec = engine.open(who, LISTENER)
    await serve_requests(engine, client, who, rec, listener=LISTENER, parse=parse_target, tunnel=tunnel)


async def tunnel(engine: Engine, rec: Record, client: Side, target: Target) -> None:
    """CONNECT: decide, dial, answer 200, bind the SNI to the name, then hand the pair to the relay."""
    rec.protocol = "connect"
    dest = target.dest
    decision = engine.authorize(rec, dest)
    upstream = await engine.connect(rec, dest, inspect=decision.inspect)
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
    hello = await engine.heads.reading(client, client_ip(client), _hello(engine, client))
    if hello.status is not HelloStatus.OK:
        raise Denied(Reason.SNI_MISSING, f"the first bytes on a TLS port are not a TLS ClientHello: {hello.detail}")
    rec.sni = recorded_sni(hello.sni)
    if hello.sni is None:
        if dest.ip is not None:
            return
        raise Denied(Reason.SNI_MISSING, f"the TLS ClientHello carries no server name; expected {dest.host}")
    if dest.ip is not None:  # even its own address: SNI would steer a shared front end to a name never decided
        raise Denied(Reason.SNI_MISMATCH, f"the TLS ClientHello names {quoted(hello.sni)} but the CONNECT host is "
                     f"the address {dest.host}, which has no name to match; send no server name to an address")
    try:
        sni = normalize_host(hello.sni)
    except BadDestination as exc:
        raise Denied(Reason.SNI_MISMATCH, f"the TLS server name is not a host name: {exc}") from None
    if sni != dest.host:
        raise Denied(Reason.SNI_MISMATCH, f"TLS server name {sni} does not match CONNECT host {dest.host}")
    rec.sni = sni


async def _hello(engine: Engine, client: Side) -> ClientHello:
    """The client's whole ClientHello (or what stands in its place), within --hello-timeout."""
    deadline = asyncio.get_running_loop().time() + engine.config.hello_timeout
    try:
        while True:
            hello = parse_client_hello(client.buffer)
            if hello.status is not HelloStatus.NEED_MORE:
                return hello
            if client.eof:
                raise Denied(Reason.SNI_MISSING, "the client closed the tunnel before a complete TLS ClientHello")
            await client.read_more(deadline)
    except TimeoutError:
        raise Denied(
            Reason.SNI_MISSING, f"no TLS ClientHello within {engine.config.hello_timeout:g}s on a TLS port"
        ) from None


class _Client(Accepted):
    """The client side of a connection: serve_client runs when it is admitted, else it gets a 503."""

    __slots__ = ()
    listener = LISTENER
    handler = staticmethod(serve_client)

    def refuse(self, rec: Record, refused: ProxyError) -> None:
        self.write(error_response(refused.status, refused.reason, self.engine.denial_body(rec, refused)))
        self.linger()


async def start(engine: Engine, host: str, port: int, reuse_port: bool = False) -> asyncio.Server:
    """Listen for explicit-proxy clients on host:port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Client(engine, loop), host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port or None
    )
