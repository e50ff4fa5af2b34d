"""Fuzzing host normalisation (:mod:`egressd.hostport`) against the libraries that will read the same names.

Every name egressd decides on is later read by someone else: the C library
(``inet_aton``, ``getaddrinfo``) when anything dials it, dnspython when the
resolver asks for it, IDNA (the ``idna`` package) when a browser or an origin
maps it. The properties: whatever the C library reads as an address comes out
as that address or is refused, never as a name to resolve; a non-ASCII name
comes out as ``idna`` encodes it, and reads back to itself; an accepted name is
a DNS name dnspython writes and reads unchanged; normalising twice is
normalising once; and 64 KiB of input is refused, not worked through.
"""

from __future__ import annotations

import ipaddress
import socket

import dns.name
import idna
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egressd.hostport import BadDestination, normalize_host, parse_authority

FUZZ = settings.get_profile("egressd-fuzz")

# -- text that looks like an address to someone --------------------------------------------------------------------


@st.composite
def ipv4ish(draw: st.DrawFn) -> str:
    """Dotted numbers in the forms inet_aton takes: 1 to 5 parts, decimal, octal, hex, leading zeros, overflow."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.one_of(st.integers(0, 255), st.integers(0, 2**32 + 1)))
        form = draw(st.sampled_from(["{}", "{}", "0{:o}", "0x{:x}", "0X{:X}", "00{}", "{}0"]))
        parts.append(form.format(n))
    separator = draw(st.sampled_from([".", ".", ".", "\u3002", "\uff0e"]))
    text = separator.join(parts)
    return text + draw(st.sampled_from(["", "", ".", " ", "\t", " x", "%eth0"]))


@st.composite
def ipv6ish(draw: st.DrawFn) -> str:
    """IPv6 addresses spelled in every legal and several illegal ways: case, expansion, zeros, zones, brackets."""
    ip = draw(st.ip_addresses(v=6))
    text = draw(st.sampled_from([str(ip), ip.exploded, ip.exploded.upper(), str(ip).upper(),
                                 ":".join(g.lstrip("0") or "0" for g in ip.exploded.split(":")),
                                 ":".join("0" + g for g in ip.exploded.split(":"))]))
    if draw(st.integers(0, 3)) == 0:
        text = f"::ffff:{draw(st.ip_addresses(v=4))}"
    suffix = draw(st.sampled_from(["", "", "%eth0", "%25eth0", "%"]))
    return draw(st.sampled_from(["{}", "{}", "[{}]", "[{}", "{}]"])).format(text + suffix)


def _inet_aton(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(socket.inet_aton(text)))
    except (OSError, ValueError, UnicodeError):
        return None


def _numeric_host(text: str) -> bool:
    """Whether the C library's getaddrinfo reads ``text`` as a numeric address (no lookup is ever made)."""
    try:
        socket.getaddrinfo(text, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return False
    return True


@FUZZ
@given(st.one_of(ipv4ish(), ipv6ish()))
@example("0x7f.1")
@example("127.0.0.1 x")
@example("\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11")  # fullwidth 127.0.0.1
def test_what_the_c_library_reads_as_an_address_never_passes_as_a_name(text: str) -> None:
    """Text inet_aton or inet_pton reads as an address normalises to that very address or is refused; an accepted
    name is never numeric to getaddrinfo."""
    try:
        host = normalize_host(text)
    except BadDestination:
        return
    libc = _inet_aton(text)
    if libc is not None:
        assert host == libc, f"{text!r}: the C library reads {libc}, egressd {host}"
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        v6 = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, bare))
    except (OSError, ValueError, UnicodeError):
        v6 = None
    if v6 is not None:
        assert ipaddress.ip_address(host) == v6
    try:
        ipaddress.ip_address(host)
    except ValueError:
        assert not _numeric_host(host), f"{text!r} became the name {host!r}, which getaddrinfo reads as an address"


# -- internationalised names ---------------------------------------------------------------------------------------

_TRICKY = [
    "ß", "ü", "ς", "σ", "İ", "ı", "а", "ё", "א", "ب", "٣", "中", "文", "😀", "\u200d", "\u200c", "\u0301",
    "\u00ad", "Ａ", "ﬁ", "Ⅸ", "①", "℡", "\u3002", "\uff0e", "\uff61", "ǅ", "Ω", "K", "\u2024", "\x00", " ",
    "%", ":", "/", "@", "-", "_", ".",
]
_LABEL_TEXT = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from(["", "", "", "xn--", "XN--", "a--"]),
    st.text(alphabet=st.one_of(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"),
                               st.sampled_from(_TRICKY)), min_size=1, max_size=14),
)
_UNICODE_NAMES = st.lists(_LABEL_TEXT, min_size=1, max_size=4).map(".".join)


@FUZZ
@given(_UNICODE_NAMES)
@example("Bücher.test")
@example("straße.test")
@example("xn--bcher-kva.test")
@example("a\u3002b\u3002test")
@example("A\xad.")
@example("_.xn--00C")
def test_a_name_is_what_idna_encodes_and_reads_back_to_itself(text: str) -> None:
    """An accepted non-ASCII name equals idna's UTS #46 encoding, its A-labels decode, and the decoded form normalises
    back to it; normalising twice is normalising once."""
    try:
        host = normalize_host(text)
    except BadDestination:
        return
    assert normalize_host(host) == host
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not text.isascii():
        assert host == idna.encode(text, uts46=True, transitional=False).decode("ascii").removesuffix(".")
    if any(label.startswith("xn--") for label in host.split(".")) and "_" not in host:
        # (IDNA forbids "_" beside U-labels; egressd takes it in ASCII names: _dmarc, DNS-SD)
        assert normalize_host(idna.decode(host)) == host


@FUZZ
@given(st.one_of(_UNICODE_NAMES, st.lists(st.from_regex(r"[a-z0-9_-]{1,63}", fullmatch=True), min_size=1,
                                          max_size=6).map(".".join)))
def test_an_accepted_name_is_the_dns_name_dnspython_asks_for(text: str) -> None:
    """An accepted name is at most 253 characters of lower-case LDH labels that dnspython writes and reads back
    unchanged, so the resolver asks for exactly the name that was decided."""
    try:
        host = normalize_host(text)
    except BadDestination:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = dns.name.from_text(host)
    assert name.to_text(omit_final_dot=True) == host
    assert len(name.to_wire()) <= 255 and len(host) <= 253
    wire = dns.name.from_wire(name.to_wire(), 0)[0]
    assert normalize_host(wire.to_text(omit_final_dot=True)) == host


@FUZZ
@given(
    st.sampled_from(["label", "labels", "unicode", "dots", "authority", "ipv6"]),
    st.integers(1_024, 65_536),
)
def test_64_kib_of_input_is_refused(shape: str, size: int) -> None:
    """Up to 64 KiB of name, labels, non-ASCII text, dots, authority or IPv6 groups is refused with BadDestination."""
    text = {
        "label": "a" * size,
        "labels": "a." * (size // 2) + "test",
        "unicode": "ü" * size + ".test",
        "dots": "." * size,
        "authority": "a" * size + ":443",
        "ipv6": "[" + "1:" * (size // 2) + "1]:443",
    }[shape]
    try:
        if shape in ("authority", "ipv6"):
            parse_authority(text)
        else:
            normalize_host(text)
    except BadDestination:
        return
    raise AssertionError(f"{len(text)} characters accepted as a host")


@pytest.mark.parametrize("text", ["ü" * 16_384 + ".test", "1:" * 8_192 + "1", "a" * 16_384 + "%zone:1"],
                         ids=["unicode", "ipv6", "zone"])
def test_a_refusal_quotes_a_bounded_part_of_what_it_refuses(text: str) -> None:
    """The message of a refused host quotes at most a few hundred characters of it, however long it was (16 KiB in
    a request head became 16 KiB of detail in the audit record, and in the 400 answer)."""
    with pytest.raises(BadDestination) as info:
        normalize_host(text)
    assert len(str(info.value)) <= 512
