"""The pure parts of the transparent listener: first-bytes classification, socket addresses, origin-form targets."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.errors import BadRequest, Denied
from egressd.hostport import Destination
from egressd.listeners.transparent import parse_sockaddr
from egressd.policy.model import Reason
from egressd.sniff.first import First, classify
from egressd.sniff.http import RequestParser
from egressd.sniff.target import Target, parse_origin_target

# ---------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        pytest.param(b"", First.NEED_MORE, id="nothing"),
        pytest.param(b"\x16", First.TLS, id="handshake-record-byte"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01", First.TLS, id="clienthello-prefix"),
        pytest.param(b"G", First.NEED_MORE, id="G"),
        pytest.param(b"GET", First.NEED_MORE, id="GET-without-space"),
        pytest.param(b"GET ", First.HTTP, id="GET-space"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", First.HTTP, id="GET-head"),
        pytest.param(b"POST /upload HTTP/1.1\r\n", First.HTTP, id="POST"),
        pytest.param(b"OPTIONS * HTTP/1.1\r\n", First.HTTP, id="OPTIONS-asterisk"),
        pytest.param(b"CONNECT a.example:443 HTTP/1.1\r\n", First.HTTP, id="CONNECT"),
        pytest.param(b"M-SEARCH * HTTP/1.1\r\n", First.HTTP, id="M-SEARCH"),
        pytest.param(b"PROPPATC", First.NEED_MORE, id="PROPPATCH-prefix"),
        pytest.param(b"get / HTTP/1.1\r\n", First.OTHER, id="lower-case-method"),
        pytest.param(b"GETS / HTTP/1.1\r\n", First.OTHER, id="unknown-method"),
        pytest.param(b"EHLO mail.example\r\n", First.OTHER, id="smtp-client"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", First.OTHER, id="ssh-banner"),
        pytest.param(b"PING\r\n", First.OTHER, id="redis-inline"),
        pytest.param(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", First.OTHER, id="postgres-sslrequest"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", First.OTHER, id="h2-prior-knowledge"),
        pytest.param(b"\x80\x2e\x01\x00\x02", First.OTHER, id="sslv2-hello"),
        pytest.param(b"\x17\x03\x03\x00\x10", First.OTHER, id="application-data"),
        pytest.param(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", First.OTHER, id="long-capitals"),
        pytest.param(b" GET /", First.OTHER, id="leading-space"),
    ],
)
def test_classify(data: bytes, kind: First) -> None:
    """The first bytes are TLS by their record byte, HTTP by a known method and a space, else other."""
    assert classify(data) is kind
    assert classify(bytearray(data)) is kind


@given(st.binary(max_size=64))
def test_classify_never_raises_and_more_bytes_only_decide(data: bytes) -> None:
    """Any bytes classify without raising, and once decided, more bytes never change the answer."""
    kind = classify(data)
    if kind is not First.NEED_MORE:
        assert classify(data + b"x") is kind


# ---------------------------------------------------------------- parse_sockaddr


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_pton(socket.AF_INET, ip) + bytes(8)


def sockaddr_in6(ip: str, port: int, scope: int = 0) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", scope)
    )


@pytest.mark.parametrize(
    ("raw", "ip", "port"),
    [
        pytest.param(sockaddr_in("203.0.113.10", 443), "203.0.113.10", 443, id="v4"),
        pytest.param(sockaddr_in("127.0.0.1", 15001), "127.0.0.1", 15001, id="v4-loopback"),
        pytest.param(sockaddr_in("0.0.0.0", 1), "0.0.0.0", 1, id="v4-unspecified"),
        pytest.param(sockaddr_in("255.255.255.255", 65535), "255.255.255.255", 65535, id="v4-extremes"),
        pytest.param(sockaddr_in6("2001:db8::10", 443), "2001:db8::10", 443, id="v6"),
        pytest.param(sockaddr_in6("::1", 15001), "::1", 15001, id="v6-loopback"),
        pytest.param(sockaddr_in6("fe80::1", 80, scope=3), "fe80::1", 80, id="v6-scoped"),
        pytest.param(sockaddr_in6("::ffff:198.51.100.7", 8080), "198.51.100.7", 8080, id="v4-mapped-becomes-v4"),
    ],
)
def test_parse_sockaddr(raw: bytes, ip: str, port: int) -> None:
    """A sockaddr_in or sockaddr_in6 gives its address and port, an IPv4-mapped IPv6 address as IPv4."""
    assert parse_sockaddr(raw) == (ipaddress.ip_address(ip), port)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 24, 27, 29, 128])
def test_parse_sockaddr_refuses_other_sizes(size: int) -> None:
    """A buffer that is neither 16 nor 28 bytes long is a ValueError naming its size."""
    with pytest.raises(ValueError, match=f"{size} bytes"):
        parse_sockaddr(bytes(size))


# ---------------------------------------------------------------- parse_origin_target


def head(data: bytes):
    parser = RequestParser(16384)
    parser.feed(data)
    return parser.events.popleft()


@pytest.mark.parametrize(
    ("request_bytes", "port", "dest", "path"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n", 80, ("web.test", 80), b"/", id="plain"),
        pytest.param(b"GET /a?b=c HTTP/1.1\r\nHost: Web.Test.\r\n\r\n", 80, ("web.test", 80), b"/a?b=c",
                     id="normalised-host-path-kept"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n", 8080, ("web.test", 8080), b"/",
                     id="no-port-means-the-original"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: web.test:8080\r\n\r\n", 8080, ("web.test", 8080), b"/",
                     id="same-port"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: 203.0.113.5\r\n\r\n", 80, ("203.0.113.5", 80), b"/", id="ip-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [2001:db8::5]:80\r\n\r\n", 80, ("2001:db8::5", 80), b"/",
                     id="ipv6-host"),
        pytest.param(b"GET /x HTTP/1.0\r\nHost: web.test\r\n\r\n", 80, ("web.test", 80), b"/x", id="http-1.0"),
    ],
)
def test_origin_target(request_bytes: bytes, port: int, dest: tuple[str, int], path: bytes) -> None:
    """An origin-form request names Host's host on the port the client dialled, its path forwarded as sent."""
    target = parse_origin_target(head(request_bytes), port)
    assert isinstance(target, Target) and not target.connect
    assert (target.dest.host, target.dest.port, target.path) == (*dest, path)


@pytest.mark.parametrize(
    ("request_bytes", "port", "error", "reason", "words"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: web.test:8080\r\n\r\n", 80, Denied, Reason.HOST_MISMATCH,
                     "names port 8080 but the connection was made to port 80", id="other-port"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: web.test:80\r\n\r\n", 8080, Denied, Reason.HOST_MISMATCH,
                     "names port 80", id="default-port-named-on-other-port"),
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", 80, Denied, Reason.NO_NAME, "no Host header", id="no-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", 80, BadRequest, Reason.BAD_REQUEST,
                     "exactly one Host", id="two-hosts"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 80, BadRequest, Reason.BAD_REQUEST, "Host header",
                     id="bad-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: 0x7f.1\r\n\r\n", 80, BadRequest, Reason.BAD_REQUEST, "Host header",
                     id="non-canonical-ip"),
        pytest.param(b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n", 80, BadRequest, Reason.BAD_REQUEST,
                     "origin-form", id="absolute-form"),
        pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: web.test\r\n\r\n", 80, BadRequest, Reason.BAD_REQUEST,
                     "origin-form", id="asterisk-form"),
        pytest.param(b"CONNECT web.test:443 HTTP/1.1\r\nHost: web.test:443\r\n\r\n", 443, BadRequest,
                     Reason.BAD_REQUEST, "origin-form", id="connect"),
    ],
)
def test_origin_target_refusals(
    request_bytes: bytes, port: int, error: type, reason: Reason, words: str
) -> None:
    """A request that names no destination, another port, or not in origin-form is refused with its reason."""
    with pytest.raises(error, match=words) as caught:
        parse_origin_target(head(request_bytes), port)
    assert caught.value.reason is reason


def test_host_mismatch_keeps_the_named_host_on_the_original_port() -> None:
    """A host_mismatch refusal carries Host's name on the dialled port, for the record."""
    with pytest.raises(Denied) as caught:
        parse_origin_target(head(b"GET / HTTP/1.1\r\nHost: web.test:8080\r\n\r\n"), 80)
    assert caught.value.dest == Destination("web.test", 80)
