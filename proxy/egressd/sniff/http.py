"""HTTP/1.1 request heads: bytes in, a value out.

A ``CONNECT`` head is parsed by llhttp (through httptools, C, about a tenth of
h11's cost): a tunnel needs only its request line, and it is the hot path.
Every other request is parsed by h11, which also frames its body and response.

Two request forms reach an explicit proxy and both name the destination:

* ``CONNECT host:port`` (authority-form) opens a tunnel;
* ``GET http://host[:port]/path`` (absolute-form) is forwarded; its Host header
  must name the same host and port (``host_mismatch`` otherwise), so that an
  origin behind one allowed IP cannot be asked for another site by Host.

Origin-form (``GET /path``), ``https://`` absolute-form and asterisk-form are
refused with 400 and a message saying what to send instead. Every error is a
:class:`~egressd.errors.BadRequest` carrying h11's status hint (400, 431 for an
oversized head).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import httptools

from egressd.errors import BadRequest, Denied
from egressd.hostport import BadDestination, Destination, parse_authority
from egressd.policy.model import Reason

# Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus the proxy's own.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
        b"te", b"trailer", b"upgrade",
    }
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the destination, and for forwarded requests the origin-form path."""

    dest: Destination
    connect: bool
    path: bytes = b""


CONNECT_PREFIX = b"CONNECT "


def starts_connect(data: bytes | bytearray) -> bool | None:
    """Whether the bytes begin a CONNECT request line; None while too few have arrived to tell."""
    n = min(len(data), len(CONNECT_PREFIX))
    if data[:n] != CONNECT_PREFIX[:n]:
        return False
    return True if n == len(CONNECT_PREFIX) else None


class ConnectHead:
    """A CONNECT request head, parsed incrementally by llhttp as the bytes arrive.

    :meth:`feed` is given the whole client buffer each time and parses only what
    it has not seen; once the head is complete it returns the head's length
    (the bytes after it are the tunnel's first bytes). llhttp refuses what RFC
    9112 refuses (bad tokens, control characters, bare LF, obs-fold); the HTTP
    version must be 1.0 or 1.1.
    """

    __slots__ = ("_parser", "_fed", "target", "headers")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._fed = 0
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []

    # llhttp callbacks (the URL may come in pieces; a header comes whole)
    def on_url(self, piece: bytes) -> None:
        self.target += piece

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def feed(self, buffer: bytes | bytearray, limit: int) -> int | None:
        """Parse the unseen part of buffer; the head's length once complete, else None.

        Raises BadRequest (400, or 431 past ``limit`` bytes of head).
        """
        start = self._fed
        try:
            self._parser.feed_data(buffer[start:])
        except httptools.HttpParserUpgrade as upgrade:  # llhttp ends every CONNECT head this way
            end = start + upgrade.args[0]
        except httptools.HttpParserError as exc:
            raise BadRequest(f"malformed HTTP: {exc}") from None
        else:
            self._fed = len(buffer)
            if self._fed > limit:
                raise BadRequest(f"request head exceeds --max-header-bytes {limit}", status=431)
            return None
        if end > limit:
            raise BadRequest(f"request head of {end} bytes exceeds --max-header-bytes {limit}", status=431)
        version = self._parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BadRequest(f"HTTP/{version} is not supported; send HTTP/1.1")
        return end

    def destination(self) -> Target:
        return connect_target(self.target.decode("ascii", "replace"))


def connect_target(target: str) -> Target:
    """The authority-form target of a CONNECT as a Target, or BadRequest."""
    try:
        return Target(parse_authority(target), connect=True)
    except BadDestination as exc:
        raise BadRequest(f"CONNECT {target}: {exc}") from None


def parse_target(request: h11.Request) -> Target:
    """Turn a request line into a Target, or raise BadRequest/Denied with the reason."""
    target = request.target.decode("ascii", "replace")
    if request.method == b"CONNECT":
        return connect_target(target)
    if target.startswith("/") or target == "*":
        raise BadRequest(
            f"{request.method.decode()} {target}: egressd is a forward proxy; send an absolute URL "
            "(http://host/path) or CONNECT host:port"
        )
    try:
        url = urlsplit(target)
    except ValueError as exc:
        raise BadRequest(f"{target!r} is not a URL: {exc}") from None
    if url.scheme != "http":
        hint = "; for https use CONNECT (curl -x does)" if url.scheme == "https" else ""
        raise BadRequest(f"{target!r}: only http:// URLs are forwarded{hint}")
    if url.username is not None or url.password is not None:
        raise BadRequest(f"{target!r}: user-info in the URL is not accepted")
    try:
        dest = parse_authority(url.netloc, default_port=80)
    except BadDestination as exc:
        raise BadRequest(f"{target!r}: {exc}") from None
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    check_host_header(request, dest)
    check_framing(request)
    return Target(dest, connect=False, path=path.encode("ascii", "replace"))


def check_host_header(request: h11.Request, dest: Destination) -> None:
    """The Host header must name the absolute-form host and port (default 80); else Denied(host_mismatch)."""
    hosts = [value for name, value in request.headers if name == b"host"]
    if len(hosts) != 1:
        raise BadRequest(f"expected exactly one Host header, got {len(hosts)}")
    value = hosts[0].decode("ascii", "replace")
    try:
        named = parse_authority(value, default_port=80)
    except BadDestination:
        named = None
    if named is None or (named.host, named.port) != (dest.host, dest.port):
        raise Denied(Reason.HOST_MISMATCH, f"Host header {value!r} does not name the requested {dest.authority}")


def check_framing(request: h11.Request) -> None:
    """A request must not carry both Content-Length and Transfer-Encoding (RFC 9112 6.1).

    h11 would frame it by Transfer-Encoding while an origin may read Content-Length:
    the gap between the two is how requests are smuggled past a proxy.
    """
    names = {name for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        raise BadRequest("the request has both Content-Length and Transfer-Encoding; send one of them")


def forward_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers and those the Connection header lists."""
    listed = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(name, value) for name, value in headers if name not in HOP_BY_HOP and name not in listed]


def bad_request(exc: h11.RemoteProtocolError) -> BadRequest:
    """h11's refusal of the client's bytes as our BadRequest, keeping its status hint (400, 431)."""
    return BadRequest(f"malformed HTTP: {exc}", status=exc.error_status_hint)
