"""Origins on loopback: HTTPS and HTTP/1.1 servers that say what they saw, and a TCP echo.

Every HTTP request is answered from :func:`plan_reply`, a pure function of the
request: status 200, ``Content-Type: text/plain``, ``X-Origin: <label>`` and
the body ``<label> saw <METHOD> <target> host=<Host> sni=<SNI>\\n``, except

* ``/status/<code>`` answers with that status (200-599),
* ``/bytes/<n>`` answers ``n`` bytes of the pattern 00 01 .. ff 00 01 ..,
  streamed in 64 KiB chunks,
* ``/echo`` answers with the request body.

The HTTP shell is h11 in the server role, with keep-alive and request bodies;
each request is recorded in ``requests`` as an :class:`OriginRequest`.

The SNI a TLS client sent is not on the server's ``SSLObject``
(``server_hostname`` is None there); only the context's ``sni_callback`` sees
it, so :class:`TlsOrigin` records it from there, keyed by ``SSLObject``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

import h11
import trustme

from egressd.lab._serving import StreamServer, read_some

__all__ = [
    "CHUNK_SIZE",
    "EchoOrigin",
    "HttpOrigin",
    "OriginRequest",
    "Reply",
    "TlsOrigin",
    "client_ssl_context",
    "make_ca",
    "plan_reply",
]

CHUNK_SIZE = 64 * 1024
_PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)
_BYTES = re.compile(r"/bytes/([0-9]{1,15})\Z")
_STATUS = re.compile(r"/status/([0-9]{3})\Z")
_NO_BODY_STATUSES = frozenset({204, 304})


def make_ca() -> trustme.CA:
    """A fresh certificate authority for lab origins; nothing outside the lab trusts it."""
    return trustme.CA(organization_name="egressd lab")


def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``ca`` and nothing else, checking host names."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


@dataclass(frozen=True, slots=True)
class OriginRequest:
    """One request as the origin saw it; ``connection`` is the serial number (from 1) of the connection it came on."""

    method: str
    target: str
    host: str | None
    sni: str | None
    body_length: int
    connection: int


@dataclass(frozen=True, slots=True)
class Reply:
    """What an origin answers: a status and ``length`` bytes of body, in chunks."""

    status: int
    length: int
    chunks: Iterable[bytes]


def _path(target: str) -> str:
    return target.partition("?")[0] if target.startswith("/") else urlsplit(target).path


def echoes(target: str) -> bool:
    """Whether the reply to ``target`` needs the request body (the others only count it)."""
    return _path(target) == "/echo"


def _pattern(n: int) -> Iterator[bytes]:
    full, rest = divmod(n, CHUNK_SIZE)
    for _ in range(full):
        yield _PATTERN
    if rest:
        yield _PATTERN[:rest]


def plan_reply(label: str, request: OriginRequest, body: bytes = b"") -> Reply:
    """The reply to ``request`` (whose body was ``body``) from the origin called ``label``."""
    path = _path(request.target)
    if path == "/echo":
        return Reply(200, len(body), (body,))
    if match := _BYTES.match(path):
        n = int(match[1])
        return Reply(200, n, _pattern(n))
    status = 200
    if match := _STATUS.match(path):
        status = int(match[1]) if 200 <= int(match[1]) <= 599 else 400
    text = (
        f"{label} saw {request.method} {request.target} host={request.host or '-'} sni={request.sni or '-'}\n"
    ).encode()
    return Reply(status, len(text), (text,))


class _SniRecorder:
    """An ``sni_callback`` that remembers the name each handshake asked for."""

    def __init__(self) -> None:
        self._names: weakref.WeakKeyDictionary[ssl.SSLObject, str | None] = weakref.WeakKeyDictionary()

    def __call__(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        self._names[ssl_object] = server_name

    def name_of(self, ssl_object: ssl.SSLObject | None) -> str | None:
        return None if ssl_object is None else self._names.get(ssl_object)


class HttpOrigin(StreamServer):
    """A plain HTTP/1.1 origin; ``requests`` lists every request it has seen."""

    def __init__(self, label: str = "origin", *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context)
        self.label = label
        self.requests: list[OriginRequest] = []

    def _sni(self, writer: asyncio.StreamWriter) -> str | None:
        return None

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serial: int) -> None:
        conn = h11.Connection(h11.SERVER)
        sni = self._sni(writer)
        try:
            while await self._exchange(conn, reader, writer, serial, sni):
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                headers = [("Content-Length", "0"), ("Connection", "close")]
                writer.write(conn.send(h11.Response(status_code=exc.error_status_hint, headers=headers)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()

    async def _exchange(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        serial: int,
        sni: str | None,
    ) -> bool:
        """Serve one request; True if the connection may carry another."""
        event = await _next_event(conn, reader)
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request), event
        method, target = event.method.decode("latin-1"), event.target.decode("latin-1")
        host = next((value.decode("latin-1") for name, value in event.headers if name == b"host"), None)
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        keep, body, length = echoes(target), bytearray(), 0
        while isinstance(part := await _next_event(conn, reader), h11.Data):
            length += len(part.data)
            if keep:
                body += part.data
        request = OriginRequest(method, target, host, sni, length, serial)
        self.requests.append(request)
        await self._send(conn, writer, plan_reply(self.label, request, bytes(body)), method)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, method: str) -> None:
        headers = [("Content-Type", "text/plain"), ("X-Origin", self.label)]
        has_body = reply.status not in _NO_BODY_STATUSES
        if has_body:
            headers.append(("Content-Length", str(reply.length)))
        reason = _reason(reply.status)
        writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason)) or b"")
        if has_body and method != "HEAD":
            for chunk in reply.chunks:
                writer.write(conn.send(h11.Data(data=chunk)) or b"")
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event | type[h11.PAUSED]:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await read_some(reader))
    return event


class TlsOrigin(HttpOrigin):
    """An HTTPS/1.1 origin with a certificate from ``ca`` for ``names``; records the SNI of each request."""

    def __init__(self, ca: trustme.CA, names: Sequence[str], label: str = "origin") -> None:
        if isinstance(names, str) or not names:
            raise ValueError(f"TlsOrigin needs a sequence of one or more names, not {names!r}")
        self.names = tuple(names)
        self.cert = ca.issue_cert(*self.names)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        context.set_alpn_protocols(["http/1.1"])
        self._sni_recorder = _SniRecorder()
        context.sni_callback = self._sni_recorder
        super().__init__(label, ssl_context=context)

    def _sni(self, writer: asyncio.StreamWriter) -> str | None:
        return self._sni_recorder.name_of(writer.get_extra_info("ssl_object"))


class EchoOrigin(StreamServer):
    """A raw TCP server that sends back every byte it receives and half-closes when the client does."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_received = 0

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serial: int) -> None:
        while data := await read_some(reader):
            self.bytes_received += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
