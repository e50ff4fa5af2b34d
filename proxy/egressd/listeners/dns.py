"""The sidecar's DNS filter on the wire: one UDP socket and one TCP server on one port, per ``--dns-listen``.

::

    app ─UDP──▶ _Udp.datagram_received ─┐
    app ─TCP──▶ _Tcp (length-prefixed) ─┴─▶ Filter.receive (egressd.dnsfilter) ─▶ send(answer)

Denied names and cached answers are answered inside ``datagram_received`` (or
``data_received``), with no task and no await; only a query that must go
upstream gets a task, kept by the :class:`~egressd.dnsfilter.Filter` and
cancelled (with its record written) by :meth:`DnsListener.close`.

Upstream, :func:`ask_upstream`: each resolver in turn, over UDP on a
connected socket (a closed port fails at once), again over TCP when the
answer is truncated, all within the timeout.

TCP (RFC 7766): two-byte length-prefixed messages, several per connection,
answered as they complete (pipelined queries may be answered out of order).
At most MAX_PIPELINE queries of one connection are in flight; past that, and
while the client does not read its answers, reading pauses. A connection is
closed after TCP_IDLE_TIMEOUT seconds without a complete query and with
nothing in flight (a half-sent message does not count), or once it has sent
EOF and every answer is out. At most ``--dns-max-tcp-connections`` are open;
one more closes the idlest connection of the client with the most (nothing in
flight first), so that a client holding connections open pushes out its own
and never the others' (:mod:`egressd.limits`). The UDP socket asks for a receive buffer
of UDP_RECEIVE_BUFFER, so that a burst of queries waits instead of being
dropped by the kernel.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.rcode

from egressd.connection import Engine
from egressd.dnsfilter import Filter, Upstreams
from egressd.hostport import join_host_port
from egressd.limits import DNS_MAX_TCP_CONNECTIONS, heaviest
from egressd.relay import peer_address

TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP connection may go without a complete query (and nothing in flight)
MAX_PIPELINE = 32  # queries of one TCP connection in flight
_BIND_ATTEMPTS = 20  # tries at a port free for both UDP and TCP when the port is 0
# The UDP socket's receive buffer: a burst of queries (an app resolving many names at once, a search list) waits
# there while the loop is busy. Linux's default (208 KiB) holds fewer than 100 datagrams on loopback, where each
# costs about 2 KiB; the kernel caps what is asked at net.core.rmem_max.
UDP_RECEIVE_BUFFER = 1 << 20


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, filter_: Filter) -> None:
        self.filter = filter_
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        transport = self.transport
        assert transport is not None

        def send(wire: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(wire, addr)

        self.filter.receive(data, addr, send, udp=True)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error about an answer to a client that has gone: nothing to do


class _Tcp(asyncio.Protocol):
    """One TCP client: two-byte length-prefixed queries, pipelined, with an idle timeout."""

    def __init__(self, listener: DnsListener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: tuple = ("-", 0)
        self.buffer = bytearray()
        self.pending: set[asyncio.Task[None]] = set()
        self.last = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.reading = True
        self.writable = True
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.peer = peer_address(transport) or ("-", 0)
        self.listener.admit(self)
        self.timer = self.loop.call_later(TCP_IDLE_TIMEOUT, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()

    def _process(self) -> None:
        """Answer the complete queries buffered while fewer than MAX_PIPELINE are in flight and the client reads."""
        if self.transport is None or self.transport.is_closing():
            return
        buffer, filter_ = self.buffer, self.listener.filter
        while len(buffer) >= 2 and len(self.pending) < MAX_PIPELINE and self.writable:
            end = 2 + int.from_bytes(buffer[:2], "big")
            if len(buffer) < end:
                break
            wire = bytes(buffer[2:end])
            del buffer[:end]
            self.last = self.loop.time()
            task = filter_.receive(wire, self.peer, self._send, udp=False)
            if task is not None:
                self.pending.add(task)
                task.add_done_callback(self._answered)
        self._flow()

    def _send(self, wire: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(len(wire).to_bytes(2, "big") + wire)
            self.last = self.loop.time()

    def _answered(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        if self.buffer:
            self._process()
        else:
            self._flow()

    def _flow(self) -> None:
        """Read while fewer than MAX_PIPELINE queries are in flight and the client reads its answers."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.eof and not self.pending:
            transport.close()
            return
        want = self.writable and len(self.pending) < MAX_PIPELINE
        if want != self.reading:
            self.reading = want
            (transport.resume_reading if want else transport.pause_reading)()

    def pause_writing(self) -> None:
        self.writable = False
        self._flow()

    def resume_writing(self) -> None:
        self.writable = True
        self._process()

    def eof_received(self) -> bool:
        self.eof = True  # answer what is in flight, then close
        self._flow()
        return True

    def _check_idle(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        idle = self.loop.time() - self.last
        if not self.pending and idle >= TCP_IDLE_TIMEOUT:
            transport.close()
            return
        self.timer = self.loop.call_later(max(TCP_IDLE_TIMEOUT - idle, 0.5), self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()


class DnsListener:
    """The UDP socket and the TCP server of one ``--dns-listen`` address (one port for both), with their clients."""

    def __init__(self, engine: Engine) -> None:
        self.filter = Filter(engine, ask_upstream)
        self.connections: set[_Tcp] = set()
        self.engine = engine
        self.max_connections = engine.config.dns_max_tcp_connections
        self.address: tuple[str, int] = ("", 0)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def admit(self, connection: _Tcp) -> None:
        """Count a new TCP connection in; at the limit, first close the idlest connection (nothing in flight
        before anything waiting upstream) of the client with the most."""
        while len(self.connections) >= self.max_connections:
            clients: dict[str, list[_Tcp]] = {}
            for other in self.connections:
                clients.setdefault(other.peer[0], []).append(other)
            victim = min(clients[heaviest(clients)], key=lambda c: (bool(c.pending), c.last))
            self.connections.discard(victim)
            self.engine.metrics.limit_hits[DNS_MAX_TCP_CONNECTIONS] += 1
            if victim.transport is not None:
                victim.transport.abort()
        self.connections.add(connection)

    async def bind(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(1 if port else _BIND_ATTEMPTS):
            udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.filter), local_addr=(host, port))
            udp.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            bound = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await loop.create_server(lambda: _Tcp(self), host, bound)
            except OSError:
                udp.close()
                if port:
                    raise
                continue
            self._udp = udp
            self.address = (host, bound)
            return
        raise OSError(f"no port on {host} was free for both UDP and TCP after {_BIND_ATTEMPTS} tries")

    def close(self) -> None:
        """Stop serving: close both sockets and every TCP client, record and cancel the queries in flight."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        self.filter.close()


async def start(engine: Engine, host: str, port: int) -> DnsListener:
    """Serve the DNS filter on host:port (UDP and TCP; port 0: one free port for both)."""
    listener = DnsListener(engine)
    await listener.bind(host, port)
    return listener


async def ask_upstream(
    out: dns.message.Message, upstreams: Upstreams, timeout: float
) -> tuple[dns.message.Message | None, list[str]]:
    """The first NOERROR/NXDOMAIN answer of the resolvers, tried in order with ``timeout`` each (UDP, then TCP if
    truncated); or None and what each one did."""
    errors = []
    for ip, port in upstreams:
        where = join_host_port(ip, port)
        try:
            async with asyncio.timeout(timeout):
                response = await _udp(out, ip, port)
                if response.flags & dns.flags.TC:
                    response = await dns.asyncquery.tcp(out, ip, port=port)
        except TimeoutError:
            errors.append(f"{where} did not answer within {timeout:g}s")
            continue
        except (OSError, EOFError, dns.exception.DNSException) as exc:  # EOFError: a TCP answer cut short
            errors.append(f"{where}: {_why(exc)}")
            continue
        rcode = response.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return response, errors
        errors.append(f"{where} answered {dns.rcode.to_text(rcode)}")
    return None, errors or ["no resolver to ask"]


async def _udp(out: dns.message.Message, ip: str, port: int) -> dns.message.Message:
    """One UDP exchange on a connected socket: a closed port fails at once (ICMP) instead of at the timeout."""
    backend = dns.asyncbackend.get_backend("asyncio")
    sock = await backend.make_socket(dns.inet.af_for_address(ip), socket.SOCK_DGRAM, 0, None, (ip, port))
    try:
        return await dns.asyncquery.udp(out, ip, port=port, sock=sock, ignore_unexpected=True, ignore_errors=True)
    finally:
        await sock.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, EOFError):
        return "the TCP connection closed before a whole answer came"
    return str(exc) or type(exc).__name__
