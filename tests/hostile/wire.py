"""What a hostile client does on the wire: actions that send bytes and report what came back.

An action is a function of a :class:`Target` (where the listener is, how to
reach it, the lab's ports) that returns an :class:`Outcome`: every byte the
client read and how the connection ended. The client reads until egressd ends
the connection, or, in a tunnel, until the origin has answered its
ClientHello. Every read has a deadline. Request bytes may name the lab's ports
as ``{http}``, ``{tls}`` and ``{echo}``; :meth:`Target.fill` puts them in.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

DEADLINE = 10.0  # seconds for any one exchange
TLS_RECORD_TYPES = (0x15, 0x16)  # alert, handshake: what an origin answers a ClientHello with

Address = tuple[str, int]


@dataclass(frozen=True)
class Target:
    """A listener to attack: its address, how to open a connection to it, and the ports rows may name."""

    address: Address
    ports: dict[str, int]
    connect: Callable[[Address], socket.socket] | None = None

    def dial(self) -> socket.socket:
        return (self.connect or dial_tcp)(self.address)

    def fill(self, data: bytes) -> bytes:
        for name, port in self.ports.items():
            data = data.replace(b"{%s}" % name.encode(), str(port).encode())
        return data


@dataclass(frozen=True)
class Outcome:
    """What the client saw: the bytes it read and how the connection ended (``eof``, ``reset``, ``open`` when
    the client stopped reading because it had what it waited for, ``client-reset`` when the client reset it)."""

    data: bytes
    end: str

    @property
    def head(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[0]

    @property
    def after_head(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


Action = Callable[[Target], Outcome]


def dial_tcp(address: Address) -> socket.socket:
    """A plain TCP connection from this namespace, without Nagle so that every write is its own segment."""
    sock = socket.create_connection(address, timeout=DEADLINE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_end(sock: socket.socket, until: Callable[[bytes], bool] = lambda data: False) -> Outcome:
    """Read until the peer ends the connection, or until ``until(data)`` holds (then the end is ``open``)."""
    data = b""
    end_by = time.monotonic() + DEADLINE
    while time.monotonic() < end_by:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return Outcome(data, "reset")
        except TimeoutError:
            break
        if not chunk:
            return Outcome(data, "eof")
        data += chunk
        if until(data):
            return Outcome(data, "open")
    raise AssertionError(f"the connection neither ended nor answered within {DEADLINE}s; read {data[:200]!r}")


def write(sock: socket.socket, data: bytes, step: int | None) -> None:
    """Send ``data`` at once, or in writes of ``step`` bytes."""
    if step is None:
        sock.sendall(data)
        return
    for i in range(0, len(data), step):
        sock.sendall(data[i : i + step])


def raw(data: bytes, *, step: int | None = None, half_close: bool = False) -> Action:
    """Send ``data`` (in writes of ``step`` bytes), optionally end the sending side, read until egressd ends."""

    def act(target: Target) -> Outcome:
        with target.dial() as sock:
            write(sock, target.fill(data), step)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            return read_to_end(sock)

    return act


def then_reset(data: bytes) -> Action:
    """Send ``data`` and reset the connection at once (SO_LINGER 0), reading nothing: the client is gone before
    egressd answers."""

    def act(target: Target) -> Outcome:
        sock = target.dial()
        sock.sendall(target.fill(data))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        return Outcome(b"", "client-reset")

    return act


def tunnel(authority: str, hello: bytes, *, step: int | None = None, half_close: bool = False,
           headers: str = "") -> Action:
    """CONNECT ``authority`` (with ``headers``, lines ending in CRLF); after the 200 send ``hello`` (in writes of
    ``step`` bytes); read until egressd ends the tunnel or the origin answers (any byte past the 200 is the
    origin's)."""

    def act(target: Target) -> Outcome:
        with target.dial() as sock:
            line = target.fill(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{headers}\r\n".encode())
            sock.sendall(line)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)
                if not chunk:
                    return Outcome(head, "eof")
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                rest = read_to_end(sock)
                return Outcome(head + rest.data, rest.end)
            write(sock, hello, step)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            rest = read_to_end(sock, until=bool)
            return Outcome(head + rest.data, rest.end)

    return act


def first_flight(hello: bytes, *, step: int | None = None, half_close: bool = False) -> Action:
    """A redirected TLS client: send ``hello`` (in writes of ``step`` bytes) and read until egressd ends the
    connection or the origin answers."""

    def act(target: Target) -> Outcome:
        with target.dial() as sock:
            write(sock, hello, step)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            return read_to_end(sock, until=lambda data: data[:1] != b"\x15" and bool(data))

    return act


def slow_clients(address: Address, n: int, source: str) -> list[socket.socket]:
    """``n`` connections to ``address`` from the loopback address ``source`` (so they count apart from a normal
    client's)."""
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(DEADLINE)
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
    return socks


def trickle(socks: list[socket.socket], data: bytes, deadline: float) -> list[Outcome]:
    """Send ``data`` a byte per socket per round (slowloris) until egressd has ended every connection; what each
    one read, in order."""
    read = {sock: b"" for sock in socks}
    ended: dict[socket.socket, str] = {}
    sent = 0
    while len(ended) < len(socks):
        assert time.monotonic() < deadline, f"{len(socks) - len(ended)} slow clients were never closed"
        live = [s for s in socks if s not in ended]
        if sent < len(data):
            for sock in live:
                with contextlib.suppress(OSError):
                    sock.send(data[sent : sent + 1])
            sent += 1
        readable, _, _ = select.select(live, [], [], 0.05)
        for sock in readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                ended[sock] = "reset"
                continue
            read[sock] += chunk
            if not chunk:
                ended[sock] = "eof"
    return [Outcome(read[s], ended[s]) for s in socks]
