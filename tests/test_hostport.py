"""Tables for egressd.hostport: canonical forms in, everything else rejected at the edge."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.hostport import BadDestination, Destination, normalize_host, parse_authority

CANONICAL = [
    ("example.com", "example.com"),
    ("EXAMPLE.com.", "example.com"),
    ("API.Example.COM.", "api.example.com"),
    ("a.", "a"),
    ("localhost", "localhost"),
    ("_dmarc.example.com", "_dmarc.example.com"),
    ("123.example", "123.example"),
    ("0x.com", "0x.com"),
    ("x" * 63 + ".com", "x" * 63 + ".com"),
    (".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]), ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])),
    # IDNA (UTS #46, non-transitional) to punycode
    ("bücher.example", "xn--bcher-kva.example"),
    ("Bücher.Example.", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
    ("faß.de", "xn--fa-hia.de"),
    ("\uff21\uff22\uff23.com", "abc.com"),  # fullwidth ABC
    ("a\u3002b", "a.b"),
    # IP literals in the one form ipaddress prints
    ("127.0.0.1", "127.0.0.1"),
    ("0.0.0.0", "0.0.0.0"),
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("[2001:DB8::1]", "2001:db8::1"),
    ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
]

REJECTED = [
    ("", "empty host name"),
    (".", "'.' is not a host name"),
    ("0177.0.0.1", "non-canonical form"),
    ("0x7f.0.0.1", "non-canonical form"),
    ("0x7f000001", "non-canonical form"),
    ("2130706433", "non-canonical form"),
    ("127.1", "non-canonical form"),
    ("1.2.3", "non-canonical form"),
    ("1.2.3.4.5", "non-canonical form"),
    ("01.2.3.4", "non-canonical form"),
    ("a.123", "non-canonical form"),
    ("256.1.1.1", "each part must be 0-255"),
    ("[127.0.0.1]", "only IPv6 addresses may be written in brackets"),
    ("[fe80::1%25eth0]", "zone identifiers are not accepted"),
    ("fe80::1%eth0", "zone identifiers are not accepted"),
    ("a..b", "label '' is not a DNS label"),
    (".a", "label '' is not a DNS label"),
    ("a.b..", "label '' is not a DNS label"),
    ("-a.com", "label '-a' is not a DNS label"),
    ("a-.com", "label 'a-' is not a DNS label"),
    ("x" * 64 + ".com", "is not a DNS label"),
    (".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62]), "host name of 254 characters is longer than 253"),
    ("ü" * 60 + ".com", "Label too long"),
    ("a b.com", "not a valid internationalised host name"),
    ("*.a.com", "not a valid internationalised host name"),
    ("\u200b.com", "not a valid internationalised host name"),
    ("xn--zz.com", "label 'xn--zz' is not valid punycode"),
]

AUTHORITIES = [
    ("example.com:443", Destination("example.com", 443)),
    ("EXAMPLE.COM.:80", Destination("example.com", 80)),
    ("bücher.example:443", Destination("xn--bcher-kva.example", 443)),
    ("1.2.3.4:80", Destination("1.2.3.4", 80, ipaddress.IPv4Address("1.2.3.4"))),
    ("[::1]:443", Destination("::1", 443, ipaddress.IPv6Address("::1"))),
    ("[2001:DB8::1]:8443", Destination("2001:db8::1", 8443, ipaddress.IPv6Address("2001:db8::1"))),
    ("example.com:1", Destination("example.com", 1)),
    ("example.com:65535", Destination("example.com", 65535)),
]

BAD_AUTHORITIES = [
    ("", "is not a host:port authority"),
    ("a@b:1", "is not a host:port authority"),
    ("user:pw@example.com:443", "is not a host:port authority"),
    ("example.com/x:443", "is not a host:port authority"),
    ("example.com :443", "is not a host:port authority"),
    ("example.com", "a port is required"),
    ("[::1]", "a port is required"),
    ("example.com:", "port '' is not a decimal number 1-65535"),
    ("example.com:0", "port '0' is not a decimal number 1-65535"),
    ("example.com:65536", "port 65536 is out of range 1-65535"),
    ("example.com:+1", "port '+1' is not a decimal number 1-65535"),
    ("example.com:-1", "port '-1' is not a decimal number 1-65535"),
    ("example.com:\uff11\uff12", "is not a decimal number 1-65535"),  # fullwidth digits
    ("example.com:443x", "is not a decimal number 1-65535"),
    ("::1:443", "IPv6 addresses must be written in brackets"),
    ("[::1:443", "unterminated '['"),
    ("[::1]x443", "expected ':port' after ']'"),
    ("[127.0.0.1]:80", "only IPv6 addresses may be written in brackets"),
    ("[fe80::1%25eth0]:443", "zone identifiers are not accepted"),
    ("fe80::1%eth0:443", "IPv6 addresses must be written in brackets"),
    ("127.1:80", "non-canonical form"),
    ("0x7f000001:80", "non-canonical form"),
    (":443", "empty host name"),
]


@pytest.mark.parametrize(("text", "expected"), CANONICAL)
def test_normalize_host_canonical(text: str, expected: str) -> None:
    """Names and IP literals come out in their one canonical form."""
    assert normalize_host(text) == expected


@pytest.mark.parametrize(("text", "fragment"), REJECTED)
def test_normalize_host_rejects(text: str, fragment: str) -> None:
    """Non-canonical IP forms, zone ids, bad labels and overlong names raise BadDestination saying why."""
    with pytest.raises(BadDestination) as info:
        normalize_host(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("text", "expected"), AUTHORITIES)
def test_parse_authority(text: str, expected: Destination) -> None:
    """host:port (with [v6]:port) parses to a Destination with a canonical host and, for literals, the ip."""
    assert parse_authority(text) == expected


@pytest.mark.parametrize(("text", "fragment"), BAD_AUTHORITIES)
def test_parse_authority_rejects(text: str, fragment: str) -> None:
    """User-info, paths, missing or out-of-range ports and unbracketed IPv6 raise BadDestination."""
    with pytest.raises(BadDestination) as info:
        parse_authority(text)
    assert fragment in str(info.value)


def test_parse_authority_default_port() -> None:
    """default_port is used only when the authority has no port."""
    assert parse_authority("example.com", default_port=80) == Destination("example.com", 80)
    assert parse_authority("example.com:8080", default_port=80) == Destination("example.com", 8080)


def test_authority_brackets_ipv6_only() -> None:
    """Destination.authority brackets IPv6 literals and nothing else."""
    assert parse_authority("[2001:db8::1]:443").authority == "[2001:db8::1]:443"
    assert parse_authority("1.2.3.4:443").authority == "1.2.3.4:443"
    assert parse_authority("Example.com.:443").authority == "example.com:443"


def test_port_with_leading_zero_rejected() -> None:
    """A port is canonical decimal: 0443 is rejected, as the allowlist loader rejects it."""
    with pytest.raises(BadDestination):
        parse_authority("example.com:0443")


# --- properties ---------------------------------------------------------------

_LABEL_CHARS = "abcXYZ019-_"
_PIECES = [*_LABEL_CHARS, ".", ":", "[", "]", "%", "@", "ü", "ß", "\u3002", "\u200d", "xn--", "0x", "::"]
_hostish = st.lists(st.sampled_from(_PIECES), max_size=24).map("".join)
_any_text = st.one_of(st.text(max_size=80), _hostish)


def _label() -> st.SearchStrategy[str]:
    return st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
        lambda label: not label.startswith("-") and not label.endswith("-")
    )


_names = st.lists(_label(), min_size=1, max_size=5).map(".".join)
_ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(_any_text)
def test_normalize_host_only_raises_bad_destination(text: str) -> None:
    """normalize_host on arbitrary text returns a string or raises BadDestination, nothing else."""
    with contextlib.suppress(BadDestination):
        normalize_host(text)


@given(_any_text)
def test_parse_authority_only_raises_bad_destination(text: str) -> None:
    """parse_authority on arbitrary text returns a Destination or raises BadDestination, nothing else."""
    with contextlib.suppress(BadDestination):
        parse_authority(text)


@given(st.one_of(_any_text, _names, _ips))
def test_normalize_host_idempotent(text: str) -> None:
    """Whatever normalize_host returns is already canonical: normalising it again changes nothing."""
    try:
        once = normalize_host(text)
    except BadDestination:
        return
    assert normalize_host(once) == once


@given(st.one_of(_names, _ips, _hostish), st.integers(1, 65535))
def test_parse_authority_round_trips(host: str, port: int) -> None:
    """parse_authority(dest.authority) gives back the same Destination."""
    try:
        dest = parse_authority(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except BadDestination:
        return
    assert parse_authority(dest.authority) == dest
