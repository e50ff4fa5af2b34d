"""An authoritative DNS server for a zone the test chooses, over UDP and TCP on one port.

:func:`respond` is the whole of the DNS logic, a pure function from a query
and a zone to a response and a delay; :class:`DnsServer` is the asyncio shell
that carries it over UDP (truncating oversize answers, as a real server does)
and TCP (two-byte length framing, one query at a time per connection).

Zone semantics, for a question ``name``/``type``:

1. ``name`` absent from the zone: NXDOMAIN.
2. :class:`Servfail`: SERVFAIL.
3. :class:`Slow`: as for its ``addresses``, sent ``delay`` seconds later.
4. :class:`Records`: the records of the question's type among them (any type
   dnspython can read, e.g. an HTTPS record with an ``ech`` SvcParam); none is
   NOERROR with no data.
5. Addresses: the IPv4 ones answer A, the IPv6 ones AAAA; any other type, or
   a family the name has no address in, is NOERROR with no data.

Answers carry the AA flag and the server's TTL. Names are compared lower case,
without the trailing dot, which is how zone keys must be written.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from egressd.lab._serving import IDLE_TIMEOUT, STOP_TIMEOUT, TaskSet, check_loopback, run_connection

__all__ = ["Answer", "DnsServer", "Records", "Servfail", "Slow", "respond"]

_UDP_DEFAULT_SIZE = 512  # RFC 1035 limit for a UDP answer when the query has no EDNS
_BIND_ATTEMPTS = 20  # tries at finding a port free for both UDP and TCP


@dataclass(frozen=True, slots=True)
class Servfail:
    """Answer SERVFAIL."""


@dataclass(frozen=True, slots=True)
class Slow:
    """Answer with ``addresses`` after ``delay`` seconds (the loop is never blocked meanwhile)."""

    delay: float
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.delay >= 0:
            raise ValueError(f"Slow delay must be >= 0 seconds, not {self.delay!r}")
        _parse_addresses(self.addresses)


@dataclass(frozen=True, slots=True)
class Records:
    """Answer with these records, each ``(type, rdata text)``: ``("HTTPS", '1 . alpn="h2" ech="AEn+..."')``."""

    records: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        for rdtype, text in self.records:
            dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)  # raises on a record dnspython cannot read

    def rrset(self, name: dns.name.Name, rdtype: int, ttl: int) -> dns.rrset.RRset | None:
        texts = [text for kind, text in self.records if dns.rdatatype.from_text(kind) == rdtype]
        return dns.rrset.from_text(name, ttl, "IN", rdtype, *texts) if texts else None


Answer = tuple[str, ...] | Servfail | Slow | Records
_Answered = tuple[dns.message.Message, dns.message.Message, float]  # query, response, delay


def _parse_addresses(addresses: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if not isinstance(addresses, (tuple, list)):
        raise ValueError(f"addresses must be a tuple of IP strings, not {addresses!r}")
    return [ipaddress.ip_address(address) for address in addresses]


def _check_entry(name: str, answer: Answer) -> None:
    if name != name.lower().rstrip("."):
        raise ValueError(f"zone name {name!r} must be lower case without a trailing dot")
    if not isinstance(answer, (Servfail, Slow, Records)):
        try:
            _parse_addresses(answer)
        except ValueError as exc:
            raise ValueError(f"zone entry {name!r}: {exc}") from None


def respond(query: dns.message.Message, zone: Mapping[str, Answer], ttl: int) -> tuple[dns.message.Message, float]:
    """The response to ``query`` from ``zone`` and the seconds to wait before sending it.

    Raises ValueError if the zone entry for the name is malformed.
    """
    response = dns.message.make_response(query)
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response, 0.0
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response, 0.0
    question = query.question[0]
    answer = zone.get(question_name(query))
    if answer is None:
        response.flags |= dns.flags.AA
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response, 0.0
    if isinstance(answer, Servfail):
        response.set_rcode(dns.rcode.SERVFAIL)
        return response, 0.0
    if isinstance(answer, Records):
        response.flags |= dns.flags.AA
        rrset = answer.rrset(question.name, question.rdtype, ttl) if question.rdclass == dns.rdataclass.IN else None
        if rrset is not None:
            response.answer.append(rrset)
        return response, 0.0
    delay, addresses = (answer.delay, answer.addresses) if isinstance(answer, Slow) else (0.0, answer)
    response.flags |= dns.flags.AA
    version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
    matching = [str(ip) for ip in _parse_addresses(addresses) if ip.version == version]
    if matching and question.rdclass == dns.rdataclass.IN:
        response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", question.rdtype, *matching))
    return response, delay


def question_name(query: dns.message.Message) -> str:
    """The question's name as zone keys are written: lower case, no trailing dot."""
    return query.question[0].name.to_text(omit_final_dot=True).lower()


def _udp_wire(query: dns.message.Message, response: dns.message.Message) -> bytes:
    """The response as it fits one datagram: if it is too big, an empty answer with TC set."""
    limit = max(_UDP_DEFAULT_SIZE, query.payload) if query.edns >= 0 else _UDP_DEFAULT_SIZE
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.TC | (response.flags & dns.flags.AA)
        truncated.set_rcode(response.rcode())
        return truncated.to_wire(max_size=limit)


class DnsServer:
    """Serves ``zone`` (mutable: tests change it between lookups) over UDP and TCP on one loopback port.

    ``queries`` lists ``(name, type)`` of every query received, in order;
    ``received`` the same queries whole, with the transport they came over
    (``("udp", message)``), for tests that look at flags and EDNS options.
    """

    def __init__(self, zone: Mapping[str, Answer], ttl: int = 30) -> None:
        if not 0 <= ttl < 2**31:
            raise ValueError(f"ttl must be between 0 and 2**31 - 1 seconds, not {ttl}")
        for name, answer in zone.items():
            _check_entry(name, answer)
        self.zone: dict[str, Answer] = dict(zone)
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self.received: list[tuple[str, dns.message.Message]] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks = TaskSet()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host`` for UDP and TCP on the same port (an ephemeral one unless ``port`` is given)."""
        check_loopback(host)
        if self._udp is not None:
            raise RuntimeError(f"DnsServer is already started on {self.address}")
        loop = asyncio.get_running_loop()
        for _ in range(1 if port else _BIND_ATTEMPTS):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self.answer, self._tasks), local_addr=(host, port)
            )
            bound = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:  # the port is taken for TCP: try another
                udp.close()
                continue
            self._udp = udp
            return self.address
        raise OSError(f"no port on {host} was free for both UDP and TCP after {_BIND_ATTEMPTS} tries")

    async def stop(self) -> None:
        if self._udp is None or self._tcp is None:
            return
        (udp, self._udp), (tcp, self._tcp) = (self._udp, None), (self._tcp, None)
        udp.close()
        tcp.close()
        await self._tasks.cancel()
        async with asyncio.timeout(STOP_TIMEOUT):
            await tcp.wait_closed()

    @property
    def address(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError("DnsServer is not started")
        host, port = self._udp.get_extra_info("sockname")[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    def answer(self, wire: bytes, transport: str = "udp") -> _Answered | None:
        """Parse, record and answer one query; None if it does not parse."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        self.received.append((transport, query))
        if len(query.question) == 1:
            self.queries.append((question_name(query), dns.rdatatype.to_text(query.question[0].rdtype)))
        try:
            response, delay = respond(query, self.zone, self.ttl)
        except ValueError as exc:  # a malformed entry put in by a test: say so loudly, answer SERVFAIL
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"lab DnsServer: bad zone entry: {exc}", "exception": exc}
            )
            response, delay = dns.message.make_response(query), 0.0
            response.set_rcode(dns.rcode.SERVFAIL)
        return query, response, delay

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await run_connection(self._tasks, lambda: self._converse_tcp(reader, writer), writer)

    async def _converse_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer queries one at a time until the client leaves or sends one that does not parse."""
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT):
                length = int.from_bytes(await reader.readexactly(2), "big")
                wire = await reader.readexactly(length)
            answered = self.answer(wire, "tcp")
            if answered is None:
                return
            _, response, delay = answered
            await asyncio.sleep(delay)
            writer.write(response.to_wire(prepend_length=True, max_size=65535))
            await writer.drain()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, answer: Callable[[bytes], _Answered | None], tasks: TaskSet) -> None:
        self._answer = answer
        self._tasks = tasks
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: on Python 3.11 the selector loop's UDP transport is no DatagramTransport subclass
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answered = self._answer(data)
        if answered is None:
            return
        query, response, delay = answered
        wire = _udp_wire(query, response)
        if delay > 0:
            self._tasks.spawn(self._send_later(wire, addr, delay))
        else:
            self._send(wire, addr)

    async def _send_later(self, wire: bytes, addr: tuple[str, int], delay: float) -> None:
        await asyncio.sleep(delay)
        self._send(wire, addr)

    def _send(self, wire: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error about an answer to a client that has gone: nothing to do
