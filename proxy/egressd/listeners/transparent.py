"""The transparent listener: connections that iptables redirected here, named by their first bytes.

The app has no proxy settings. The pod's rules ``REDIRECT`` its outbound TCP
to this listener, and the kernel remembers where each connection was going
(``SO_ORIGINAL_DST``, ``IP6T_SO_ORIGINAL_DST``). That address is recorded
(``original_dst``) but it is not what the policy decides, and egressd never
dials it for a name::

    accept ─▶ who, original ip:port ─▶ admit ─▶ itself? (loopback, this listener) ─▶ forbidden_address
                                                  │
          a cidr: rule allows ip:port (not a TLS port) ─▶ dial ip:port at once ─▶ splice   (server-first works)
                                                  │ otherwise
                      the first bytes, by content, within --hello-timeout:
          TLS ClientHello with SNI ─▶ authorize SNI:port ─▶ resolve, dial egressd's own answer
                                      ─▶ the buffered hello goes upstream first ─▶ splice
          HTTP/1.x request head    ─▶ Forwarder, each request named by Host on the original port
          anything else, nothing   ─▶ no_name (on a TLS port a cidr: rule allows: TLS without SNI is
                                      dialled like CONNECT to an IP, anything else is sni_missing)

``original_dst_in_answer`` says whether the address the client dialled was
among egressd's answers for the name (it is then tried first, keeping the
client's choice of family and front end): a client that reached an allowed
name's shared address with a forbidden SNI is refused by name, and one that
dialled a forbidden address with an allowed SNI reaches only the allowed
name's own addresses.

What a refused client gets (nothing here can answer 403 on TLS):

* plain HTTP: the explicit listener's ``403`` (or 400, 502, ...) with
  ``X-Egressd-Reason``, then the connection closes;
* TLS: a fatal ``access_denied`` alert (nothing else a client can read comes
  before the handshake; curl says ``alert access denied``), then the
  connection closes; for failures past the decision (DNS, connect) a reset, as
  if the origin had refused the connection;
* no name, and the other refusals without TLS: the connection is closed (FIN);
  a cidr-allowed service that cannot be reached: a reset;
* refused at admission (the connection caps, an audit log that cannot be
  written): a reset, after the record. The protocol is not known yet and a
  503 would be garbage to a TLS client; a reset makes clients fail at once,
  as with a refused connection.

Records carry ``protocol`` ``tls``, ``http`` (one record per request, as in
the explicit listener), ``tcp`` (neither; the cidr path) or none (the client
sent nothing), and ``ech`` for TLS. ``status`` is set only where an HTTP
answer was sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import structlog

from egressd.connection import Client, Engine
from egressd.errors import BadRequest, Denied, ProxyError
from egressd.hostport import BadDestination, Destination, IPAddress, ip_text, join_host_port, parse_authority
from egressd.listeners import Accepted, client_ip, internal_error, recorded_sni
from egressd.listeners.requests import serve_requests
from egressd.policy.decide import decide
from egressd.policy.model import Decision, Reason
from egressd.records import Record
from egressd.relay import Side
from egressd.sniff.first import First, classify
from egressd.sniff.target import parse_origin_target
from egressd.sniff.tls import ClientHello, HelloStatus, parse_client_hello

__all__ = ["LISTENER", "original_destination", "parse_sockaddr", "start"]

LISTENER = "transparent"
log = structlog.get_logger("egressd.transparent")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h) is 80 too
SOL_IPV6 = getattr(socket, "SOL_IPV6", socket.IPPROTO_IPV6)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address, zero
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, address, scope id

# The record of a fatal access_denied alert (RFC 8446 6.2, alert 49), what a refused TLS client reads.
ALERT_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"

def parse_sockaddr(raw: bytes) -> tuple[IPAddress, int]:
    """(address, port) from a ``sockaddr_in`` (16 bytes) or ``sockaddr_in6`` (28 bytes); IPv4-mapped IPv6
    comes out as IPv4. ValueError for any other length."""
    if len(raw) == _SOCKADDR_IN.size:
        port, packed = _SOCKADDR_IN.unpack(raw)
        return ipaddress.IPv4Address(packed), port
    if len(raw) == _SOCKADDR_IN6.size:
        port, packed = _SOCKADDR_IN6.unpack(raw)
        ip6 = ipaddress.IPv6Address(packed)
        return (ip6.ipv4_mapped or ip6), port
    raise ValueError(f"a socket address of {len(raw)} bytes is neither sockaddr_in (16) nor sockaddr_in6 (28)")


def original_destination(sock: socket.socket) -> tuple[IPAddress, int]:
    """Where the client was going before iptables redirected it here.

    A connection that no NAT rule touched has no original destination of its
    own (``ENOENT``): it was made to this listener itself, and that is what is
    returned, so the caller refuses it.
    """
    v4, v6 = (socket.SOL_IP, 16), (SOL_IPV6, 28)
    # An IPv6 socket may carry IPv4 (a dual-stack listener): its conntrack entry is then an IPv4 one.
    for level, size in (v6, v4) if sock.family == socket.AF_INET6 else (v4,):
        try:
            return parse_sockaddr(sock.getsockopt(level, SO_ORIGINAL_DST, size))
        except (OSError, ValueError):
            continue
    host, port = sock.getsockname()[:2]
    return ipaddress.ip_address(host.split("%", 1)[0]), port


class _Client(Accepted):
    """A redirected client: where it was going is read at accept, then serve_client runs."""

    __slots__ = ("original", "local")
    listener = LISTENER

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(engine, loop)
        self.original: tuple[IPAddress, int] = (ipaddress.IPv4Address(0), 0)
        self.local: tuple[str, int] | None = None

    @staticmethod
    async def handler(engine: Engine, client: Side, who: Client) -> None:
        await serve_client(engine, client, who)

    def accepted(self, transport: asyncio.BaseTransport) -> bool:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            self.original = original_destination(sock)
            self.local = sock.getsockname()[:2]
        except OSError:
            pass  # gone already: the 0.0.0.0 placeholder is refused as this listener's own address
        return True

    def refuse(self, rec: Record, refused: ProxyError) -> None:
        rec.original_dst = join_host_port(ip_text(self.original[0]), self.original[1])
        rec.status = None  # nothing was answered: the protocol is not known yet
        self.reset()


async def serve_client(engine: Engine, client: Side, who: Client) -> None:
    """Serve one redirected connection: a tunnel (TLS or a cidr-allowed service), or plain HTTP requests.

    A spliced tunnel outlives this task: its record then belongs to
    :meth:`Engine.splice`, which emits it when both connections are gone.
    """
    assert isinstance(client, _Client)
    ip, port = client.original
    rec = engine.open(who, LISTENER)
    rec.original_dst = join_host_port(ip_text(ip), port)
    try:
        if not await route(engine, rec, client):
            return  # spliced
    except ProxyError as exc:
        engine.fail(rec, exc)
        rec.status = None  # no HTTP answer on a TLS or raw connection
        if rec.protocol == "tls" and exc.status < 500:
            client.write(ALERT_ACCESS_DENIED)
            client.linger()
        elif exc.status >= 500:  # the origin could not be reached or named: as if it refused the connection
            client.reset()
        else:
            client.close()
        engine.close(rec)
        return
    except asyncio.CancelledError:
        rec.note("the proxy shut down")
        client.abort()
        engine.close(rec)
        raise
    except Exception as exc:  # a bug must cost one connection, never the process; the record still goes out
        internal_error(rec, client, exc)
        engine.close(rec)
        return
    await serve_http(engine, client, who, rec)


async def route(engine: Engine, rec: Record, client: _Client) -> bool:
    """Decide a connection by its original destination or first bytes; True when it speaks HTTP (nothing is
    decided yet), False once it is spliced. Raises ProxyError when refused (nothing went upstream)."""
    ip, port = client.original
    if engine.identifier.fixed is None and client.who is not None:  # a gateway: by the client's address alone
        engine.identify(rec, client.who.ip)
    if ip.is_loopback or ip.is_unspecified or client.local == (ip_text(ip), port):
        raise Denied(
            Reason.FORBIDDEN_ADDRESS,
            f"the original destination {rec.original_dst} is {'loopback' if ip.is_loopback else 'this listener'}: "
            "a redirect loop or a connection straight to egressd's listener; egressd never connects to itself",
        )
    by_ip = cidr_decision(engine, rec.service, ip, port)
    if by_ip is not None and not by_ip.tls_required:
        rec.protocol = "tcp"
        await tunnel(engine, rec, client, Destination(ip_text(ip), port, ip))
        return False
    loop = asyncio.get_running_loop()
    timeout = engine.config.hello_timeout
    kind, hello = await engine.heads.reading(client, client_ip(client), sniff(client, loop.time() + timeout))
    if kind is First.HTTP:
        rec.protocol = "http"
        return True
    if kind is First.TLS and hello is not None:
        rec.protocol = "tls"
        if hello.status is HelloStatus.MALFORMED:
            raise BadRequest(f"malformed TLS ClientHello: {hello.detail}")
        rec.sni, rec.ech = recorded_sni(hello.sni), hello.ech
        if hello.sni is not None:
            dest = named(hello.sni, port)
            rec.sni = dest.host
            await tunnel(engine, rec, client, dest)
            return False
        if by_ip is not None:  # TLS without a name to a cidr-allowed TLS port, as CONNECT to an IP may
            await tunnel(engine, rec, client, Destination(ip_text(ip), port, ip))
            return False
        raise Denied(Reason.NO_NAME, f"the TLS ClientHello carries no server name and no cidr: rule allows "
                     f"{rec.original_dst}")
    if kind is First.OTHER:
        rec.protocol = "tcp"
    why = nameless(client, kind, timeout)
    if by_ip is not None:
        raise Denied(Reason.SNI_MISSING, f"{why}; a cidr: rule allows {rec.original_dst} for TLS only")
    raise Denied(Reason.NO_NAME, f"{why}, and no cidr: rule allows {rec.original_dst}")


def cidr_decision(engine: Engine, service: str | None, ip: IPAddress, port: int) -> Decision | None:
    """The decision for the original ip:port when a cidr: rule allows it (audit mode's would-deny does not
    count), else None. Nothing is recorded: a name may still decide."""
    policy = engine.policy.current
    if policy is None:
        return None
    decision = decide(policy, service, Destination(ip_text(ip), port, ip), engine.config.mode)
    return decision if decision.reason is Reason.ALLOWED else None


def named(sni: str, port: int) -> Destination:
    """The destination a server name names on the original port; BadRequest when it is not a host name."""
    try:
        return parse_authority(join_host_port(sni, port))
    except BadDestination as exc:
        raise BadRequest(f"the TLS server name is not a host name: {exc}") from None


async def sniff(client: Side, deadline: float) -> tuple[First, ClientHello | None]:
    """Read until the first bytes say what they are: (TLS, the parsed hello: OK or MALFORMED), (HTTP, None),
    (OTHER, None), or (NEED_MORE, None) when the client stopped or ended before that (by ``deadline``)."""
    while True:
        buffer = client.buffer
        kind = classify(buffer)
        if kind is First.TLS:
            hello = parse_client_hello(buffer)
            if hello.status is HelloStatus.NOT_TLS:
                return First.OTHER, None
            if hello.status is not HelloStatus.NEED_MORE:
                return kind, hello
        elif kind is not First.NEED_MORE:
            return kind, None
        if client.eof:
            return First.NEED_MORE, None
        try:
            await client.read_more(deadline)
        except TimeoutError:
            return First.NEED_MORE, None


def nameless(client: Side, kind: First, timeout: float) -> str:
    """Why the first bytes named nothing, for the record."""
    if kind is First.OTHER:
        return f"the first bytes ({client.buffer[:8].hex()}...) are neither a TLS ClientHello nor an HTTP request"
    if not client.buffer:
        if client.eof:
            return "the client closed the connection before sending anything"
        return f"the client sent nothing within {timeout:g}s (--hello-timeout)"
    ended = "closed the connection" if client.eof else f"stopped for {timeout:g}s (--hello-timeout)"
    return f"the client {ended} after {len(client.buffer)} bytes, before a complete ClientHello or request"


async def tunnel(engine: Engine, rec: Record, client: _Client, dest: Destination) -> None:
    """Decide dest (a name, or the original address under a cidr: rule), dial egressd's own answer and hand
    the pair to the relay; the bytes the client sent so far (its ClientHello) go upstream first."""
    decision = engine.authorize(rec, dest)
    upstream = await engine.connect(rec, dest, client.original[0], decision.inspect)
    if client.lost:
        rec.note("the client closed the connection before it was connected")
    engine.splice(rec, client, upstream)


async def serve_http(engine: Engine, client: _Client, who: Client, rec: Record) -> None:
    """Plain HTTP requests, each named by its Host on the original port and decided again, as the explicit
    listener forwards them; one record each."""
    port = client.original[1]
    await serve_requests(
        engine, client, who, rec, listener=LISTENER, parse=lambda head: parse_origin_target(head, port),
        original=client.original[0],
    )


async def start(engine: Engine, host: str, port: int) -> asyncio.Server:
    """Listen for redirected connections on host:port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Client(engine, loop), host, port, backlog=1024, reuse_address=True
    )
