"""DNS messages a hostile client sends to the filter, and how a row sends them and reads what comes back.

Well-formed messages are built with dnspython; malformed ones are written
byte by byte (:func:`header` and a question). A row's action sends over UDP or
TCP and, once the row's records are written, collects the answers: the filter
sends every answer before it writes the query's record, so a UDP answer that
is not in the socket by then never comes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import dns.message

from hostile.table import Ledger

Address = tuple[str, int]


def header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    """A DNS header: ID, flags (RD by default), and the four section counts."""
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def name(*labels: bytes) -> bytes:
    """A name in wire form (length-prefixed labels, then the root)."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def question(qname: bytes, qtype: int = 1, qclass: int = 1) -> bytes:
    return qname + struct.pack("!HH", qtype, qclass)


def query(text: str, rdtype: str = "A", **kw) -> bytes:
    """A well-formed query built by dnspython, with ID 0x1234."""
    message = dns.message.make_query(text, rdtype, **kw)
    message.id = 0x1234
    return message.to_wire()


def with_opcode(text: str, opcode: int) -> bytes:
    message = dns.message.make_query(text, "A")
    message.id = 0x1234
    message.set_opcode(opcode)
    return message.to_wire()


@dataclass(frozen=True)
class Exchange:
    """What a row's client got back: every answer (whole messages), in order."""

    answers: list[bytes]


Action = Callable[[Address, Ledger, int], tuple[Exchange, list[dict]]]


def udp(wire: bytes) -> Action:
    """Send one datagram; after its record, take what answer came."""

    def act(address: Address, ledger: Ledger, n: int) -> tuple[Exchange, list[dict]]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(wire, address)
            records = ledger.take(n)
            sock.setblocking(False)
            answers = []
            while True:
                try:
                    answers.append(sock.recv(65536))
                except BlockingIOError:
                    break
        return Exchange(answers), records

    return act


def tcp(*messages: bytes, raw: bytes = b"", step: int | None = None) -> Action:
    """Send ``messages`` length-prefixed on one connection (then ``raw`` bytes as they are; in writes of ``step``
    bytes if given), end the sending side, and read every answer until the filter closes."""

    def act(address: Address, ledger: Ledger, n: int) -> tuple[Exchange, list[dict]]:
        with socket.create_connection(address, timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = b"".join(struct.pack("!H", len(m)) + m for m in messages) + raw
            for i in range(0, len(data), step or len(data) or 1):
                sock.sendall(data[i : i + (step or len(data))])
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        records = ledger.take(n)
        out = []
        while len(data) >= 2:
            length = struct.unpack("!H", data[:2])[0]
            out.append(data[2 : 2 + length])
            data = data[2 + length :]
        return Exchange(out), records

    return act


RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def rcode_of(answer: bytes) -> str:
    """The rcode of an answer, BADVERS read from its EDNS."""
    if len(answer) > 12 and answer[3] & 0x0F == 0:
        parsed = dns.message.from_wire(answer)
        if parsed.rcode() == 16:
            return "BADVERS"
    return next(text for text, value in RCODES.items() if value == answer[3] & 0x0F)
