"""Fuzzing the ClientHello parser (:mod:`egressd.sniff.tls`) with hellos built field by field, defects included.

The generator knows what it built: a hello whose every length agrees and whose
server_name holds one visible-ASCII host_name must parse OK to exactly that
name, ALPN and ECH flag; a hello with a defect it put in on purpose (a session
id of 33 bytes, an odd cipher-suite length, two host_name entries, a NUL in the
name, a repeated extension, a length that lies) must be MALFORMED, however the
records are cut. Around that: the bytes a client sends one at a time give
NEED_MORE and then one verdict that never changes; more than ``max_size`` bytes
are never NEED_MORE (bounded buffering); and mitmproxy's parser, on Python
3.12+, finds the same hello and the same name in whatever we accept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egressd.hostport import BadDestination, normalize_host
from egressd.sniff.tls import MAX_RECORDS, ClientHello, HelloStatus, parse_client_hello

FUZZ = settings.get_profile("egressd-fuzz")
OK, NEED_MORE, MALFORMED, NOT_TLS = HelloStatus.OK, HelloStatus.NEED_MORE, HelloStatus.MALFORMED, HelloStatus.NOT_TLS


def vec(width: int, payload: bytes) -> bytes:
    """``payload`` behind its length in ``width`` bytes."""
    return len(payload).to_bytes(width, "big") + payload


def ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


@dataclass(frozen=True)
class Built:
    """A generated hello: its records, and what it must parse to (``defects`` empty) or why it must not."""

    data: bytes
    sni: str | None
    alpn: tuple[str, ...]
    ech: bool
    defects: tuple[str, ...]
    record_end: int  # where the hello's records end in ``data`` (early data may follow)
    entries: int = 1  # entries in the server_name list


_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,14}[A-Za-z0-9])?", fullmatch=True)
_GOOD_NAMES = st.one_of(
    st.lists(_LABEL, min_size=1, max_size=5).map(".".join),
    st.lists(_LABEL, min_size=1, max_size=3).map(lambda labels: ".".join(labels) + "."),  # trailing dot
    st.ip_addresses().map(str),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    st.just("a" * 300),
)
# (defect name, raw host_name bytes)
_BAD_NAMES = st.sampled_from([
    ("nul in name", b"evil.test\x00.api.test"), ("empty name", b""), ("space in name", b"a b.test"),
    ("non-ascii name", "bücher.test".encode()), ("del in name", b"a\x7f.test"), ("high bytes", b"\xff\xfe"),
])
_OTHER_TYPES = st.integers(1, 0xFFFF).filter(lambda t: t not in (0, 16, 0xFE0D))


@st.composite
def server_name(draw: st.DrawFn) -> tuple[bytes, str | None, list[str], int]:
    """A server_name extension body, the host name it names, its defects and its number of entries."""
    defects: list[str] = []
    if draw(st.integers(0, 9)) == 0:
        defect, raw = draw(_BAD_NAMES)
        defects.append(defect)
        name = None
    else:
        name = draw(_GOOD_NAMES)
        raw = name.encode()
    entries = [bytes([0]) + vec(2, raw)]
    for _ in range(draw(st.integers(0, 2))):  # other name types are skipped; a second host_name is a defect
        kind = draw(st.sampled_from([0, 1, 2, 255]))
        if kind == 0:
            defects.append("two host_name entries")
        entries.insert(draw(st.integers(0, len(entries))), bytes([kind]) + vec(2, draw(st.binary(max_size=12))))
    listed = b"".join(entries)
    lie = draw(st.sampled_from([0] * 8 + [-1, 1, 2]))
    if lie:
        defects.append("server_name list length lies")
    return (len(listed) + lie).to_bytes(2, "big") + listed, name, defects, len(entries)


@st.composite
def hellos(draw: st.DrawFn) -> Built:
    """A ClientHello in records, every field drawn, with defects now and then."""
    defects: list[str] = []
    parts: list[tuple[int, bytes]] = [(t, draw(st.binary(max_size=30))) for t in
                                      draw(st.lists(_OTHER_TYPES, max_size=6, unique=True))]
    sni, entries = None, 0
    if draw(st.integers(0, 9)):
        body, sni, found, entries = draw(server_name())
        defects += found
        parts.insert(draw(st.integers(0, len(parts))), (0, body))
    alpn = tuple(draw(st.lists(st.binary(min_size=1, max_size=10), max_size=3)))
    if alpn:
        parts.insert(draw(st.integers(0, len(parts))), (16, vec(2, b"".join(vec(1, p) for p in alpn))))
    ech = draw(st.integers(0, 4)) == 0
    if ech:
        parts.insert(draw(st.integers(0, len(parts))), (0xFE0D, draw(st.binary(max_size=40))))
    if parts and draw(st.integers(0, 14)) == 0:
        parts.append(draw(st.sampled_from(parts)))
        defects.append("repeated extension")
    block = b"".join(ext(t, body) for t, body in parts)
    with_block = bool(parts) or draw(st.booleans())
    block_lie = draw(st.sampled_from([0] * 12 + [1, -1])) if with_block else 0
    if block_lie:
        block_lie = 1 if not block else block_lie
        defects.append("extensions block length lies")
    session = draw(st.binary(max_size=32))
    session_len = len(session)
    if draw(st.integers(0, 19)) == 0:
        session, session_len = session + b"\x00" * (33 - len(session)), 33
        defects.append("session_id of 33 bytes")
    ciphers = draw(st.binary(min_size=2, max_size=40).map(lambda b: b[: len(b) // 2 * 2]))
    if draw(st.integers(0, 19)) == 0:
        ciphers += b"\x00"
        defects.append("odd cipher_suites length")
    compression = draw(st.binary(min_size=1, max_size=2))
    if draw(st.integers(0, 19)) == 0:
        compression = b""
        defects.append("no compression method")
    body = (draw(st.sampled_from([b"\x03\x03", b"\x03\x01", b"\x03\x04"])) + draw(st.binary(min_size=32, max_size=32))
            + bytes([session_len]) + session + vec(2, ciphers) + vec(1, compression))
    if with_block:
        body += (len(block) + block_lie).to_bytes(2, "big") + block
    message = b"\x01" + vec(3, body)
    tail = b""
    if draw(st.integers(0, 14)) == 0:
        tail = draw(st.binary(min_size=1, max_size=8))
        defects.append("bytes after the hello inside its record")
    records = _frame(message + tail, draw(st.lists(st.integers(1, len(message) - 1), max_size=6)),
                     draw(st.sampled_from([0x0301, 0x0303, 0x0300])))
    early = draw(st.sampled_from([b"", b"", b"\x17\x03\x03\x00\x05hello", b"GET / HTTP/1.1\r\n"]))
    text_alpn = tuple(p.decode("latin-1") for p in alpn)
    return Built(records + early, sni, text_alpn, ech, tuple(defects), len(records), entries)


def _frame(message: bytes, cuts: list[int], version: int) -> bytes:
    """The handshake message (and any bytes behind it) in records cut at ``cuts``."""
    points = sorted({c for c in cuts if 0 < c < len(message)} | {0, len(message)})
    return b"".join(struct.pack("!BHH", 22, version, b - a) + message[a:b] for a, b in zip(points, points[1:],
                                                                                          strict=False))


def _expected(built: Built) -> ClientHello | None:
    """What a defect-free hello parses to; None for one with defects (it must be MALFORMED)."""
    if built.defects:
        return None
    return ClientHello(OK, built.sni, built.record_end, alpn=built.alpn, ech=built.ech)


# -- properties ----------------------------------------------------------------------------------------------------


@FUZZ
@given(hellos())
def test_a_built_hello_parses_to_what_was_built(built: Built) -> None:
    """A defect-free hello parses OK to its name, ALPN, ECH flag and record length; one with a defect is MALFORMED."""
    result = parse_client_hello(built.data)
    expected = _expected(built)
    if expected is None:
        assert result.status is MALFORMED, f"{built.defects}: {result}"
    else:
        assert result == expected


@FUZZ
@given(hellos())
def test_bytes_one_at_a_time_need_more_then_one_verdict_that_never_changes(built: Built) -> None:
    """Each prefix of a client's bytes is NEED_MORE until one verdict, and every longer prefix keeps that verdict."""
    data = built.data[: built.record_end]
    verdict: ClientHello | None = None
    for n in range(1, len(data) + 1):
        result = parse_client_hello(data[:n])
        if verdict is None:
            if result.status is not NEED_MORE:
                verdict = result
        else:
            assert (result.status, result.sni, result.consumed) == (verdict.status, verdict.sni, verdict.consumed), n
    expected = _expected(built)
    assert verdict is not None and verdict.status is (MALFORMED if expected is None else OK)


_TINY_RECORDS = b"\x16\x03\x01\x00\x01\x01" * (MAX_RECORDS + 1)  # a hello in 1-byte records, more than allowed


@FUZZ
@given(hellos(), st.integers(16, 1024), st.binary(max_size=64))
@example(Built(_TINY_RECORDS, None, (), False, ("too many records",), len(_TINY_RECORDS)), 65536, b"")
def test_more_than_max_size_bytes_are_never_need_more(built: Built, max_size: int, extra: bytes) -> None:
    """With ``max_size`` bytes or more buffered the parser has decided; an OK hello never consumed more."""
    buffered = built.data + extra
    result = parse_client_hello(buffered, max_size=max_size)
    if len(buffered) >= max_size + 5 or built.defects == ("too many records",):
        assert result.status is not NEED_MORE
    if result.status is OK:
        assert result.consumed <= max_size


@FUZZ
@given(hellos())
def test_an_accepted_name_normalises_or_is_refused_cleanly(built: Built) -> None:
    """The SNI of an OK hello is text the proxy normalises or refuses with BadDestination, nothing else."""
    result = parse_client_hello(built.data)
    if result.status is OK and result.sni is not None:
        try:
            host = normalize_host(result.sni)
        except BadDestination:
            return
        assert host == host.lower() and not host.endswith(".")


# -- mitmproxy as oracle -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mitm():
    """mitmproxy's ClientHello parser; skipped where mitmproxy is not installed (Python 3.11)."""
    return pytest.importorskip("mitmproxy.proxy.layers.tls").parse_client_hello


@FUZZ
@given(hellos())
def test_mitmproxy_finds_the_same_hello_and_name(mitm, built: Built) -> None:
    """Whatever hello we accept, mitmproxy parses too, with the same SNI when it deems the name valid, and the same
    ALPN; where we still need bytes it has no hello yet."""
    ours = parse_client_hello(built.data)
    try:
        theirs = mitm(built.data)
    except ValueError:
        theirs = "refused"
    if ours.status is NEED_MORE:
        assert theirs is None or theirs == "refused"
    if ours.status is not OK:
        return
    assert theirs not in (None, "refused"), f"mitmproxy does not take a hello we accept: {built.data!r}"
    if theirs.sni is not None:
        assert theirs.sni == ours.sni
    else:  # mitmproxy names only one valid host_name alone in its list; ours must then be absent or refused
        assert ours.sni is None or _refused(ours.sni) or built.entries > 1
    assert tuple(p.decode("latin-1") for p in theirs.alpn_protocols) == ours.alpn


def _refused(name: str) -> bool:
    try:
        normalize_host(name)
    except BadDestination:
        return True
    return False
