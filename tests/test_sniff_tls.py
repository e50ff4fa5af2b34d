"""ClientHello parsing: real hellos from the ssl module, a table of hostile cases, hypothesis, mitmproxy as oracle."""

from __future__ import annotations

import functools
import itertools
import os
import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.sniff.tls import MAX_RECORDS, ClientHello, HelloStatus, parse_client_hello

OK, NEED_MORE = HelloStatus.OK, HelloStatus.NEED_MORE
NOT_TLS, MALFORMED = HelloStatus.NOT_TLS, HelloStatus.MALFORMED
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- builders


@functools.cache
def real_hello(server_hostname: str | None, *, tls12: bool = False, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight OpenSSL sends for a client handshake: one record holding the ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("handshake completed without a server")


def vec(width: int, payload: bytes) -> bytes:
    """A TLS vector: big-endian length of ``width`` bytes, then the payload."""
    return len(payload).to_bytes(width, "big") + payload


def ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!H", ext_type) + vec(2, body)


def sni_ext(*entries: tuple[int, bytes]) -> bytes:
    """A server_name extension listing (name_type, name) entries."""
    return ext(0, vec(2, b"".join(bytes([t]) + vec(2, name) for t, name in entries)))


def alpn_ext(*protocols: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, p) for p in protocols)))


def hello_message(
    extensions: bytes | None,
    *,
    ciphers: tuple[int, ...] = (0x1301, 0x1302, 0xC02F),
    session_id: bytes = b"\x11" * 32,
    compression: bytes = b"\x00",
    msg_type: int = 1,
) -> bytes:
    """A handshake message (type, uint24 length, ClientHello body); ``extensions`` None omits the block."""
    body = b"\x03\x03" + b"\x5a" * 32 + vec(1, session_id)
    body += vec(2, b"".join(struct.pack("!H", c) for c in ciphers)) + vec(1, compression)
    if extensions is not None:
        body += vec(2, extensions)
    return bytes([msg_type]) + vec(3, body)


def frame(message: bytes, cuts: tuple[int, ...] = (), version: int = 0x0301) -> bytes:
    """Wrap a handshake message into handshake records, splitting it at the sorted offsets ``cuts``."""
    bounds = [0, *sorted(set(cuts)), len(message)]
    header = b"\x16" + struct.pack("!H", version)
    return b"".join(header + vec(2, message[a:b]) for a, b in itertools.pairwise(bounds))


def message_in(record_bytes: bytes) -> bytes:
    """The handshake message inside one record."""
    return record_bytes[5:]


def chrome_like(name: str, *, post_quantum: bool = False) -> bytes:
    """A Chrome-shaped ClientHello: GREASE, 16 suites, 18 extensions, x25519 (and an ML-KEM-768 hybrid share)."""
    hybrid = b"\x11\xec" + vec(2, os.urandom(1216)) if post_quantum else b""  # X25519MLKEM768
    shares = vec(2, b"\x0a\x0a" + vec(2, b"\x00") + hybrid + b"\x00\x1d" + vec(2, os.urandom(32)))
    extensions = b"".join([
        ext(0x0A0A, b""), sni_ext((0, name.encode())), ext(23, b""), ext(0xFF01, b"\x00"),
        ext(10, vec(2, bytes.fromhex("0a0a11ec001d00170018"))), ext(11, b"\x01\x00"), ext(35, b""),
        alpn_ext(b"h2", b"http/1.1"), ext(5, b"\x01\x00\x00\x00\x00"),
        ext(13, vec(2, bytes.fromhex("040308040401050308050501080606010201"))), ext(18, b""), ext(51, shares),
        ext(45, b"\x01\x01"), ext(43, bytes.fromhex("060a0a03040303")), ext(27, b"\x02\x00\x02"),
        ext(17513, vec(2, vec(1, b"h2"))),
        ext(0xFE0D, b"\x00\x00\x01\x00\x01\x5b" + vec(2, os.urandom(32)) + vec(2, os.urandom(160))),
        ext(0x1A1A, b"\x00"),
    ])
    ciphers = (0x0A0A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014,
               0x009C, 0x009D, 0x002F, 0x0035)
    return frame(hello_message(extensions, ciphers=ciphers, session_id=os.urandom(32)))


NAMES = ("example.com", "api.github.com", "a-b.c_d.example.co.uk", "X.Example.ORG", "xn--bcher-kva.example")
SIMPLE = frame(hello_message(sni_ext((0, b"simple.example")) + alpn_ext(b"h2")))


# ---------------------------------------------------------------- real hellos


@pytest.mark.parametrize("alpn", [(), ("h2", "http/1.1")], ids=["no-alpn", "alpn"])
@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
@pytest.mark.parametrize("name", NAMES)
def test_real_hello_yields_its_sni(name: str, tls12: bool, alpn: tuple[str, ...]) -> None:
    """A ClientHello made by the ssl module parses OK to its server_hostname, ALPN list and full length."""
    data = real_hello(name, tls12=tls12, alpn=alpn)
    assert parse_client_hello(data) == ClientHello(OK, sni=name, consumed=len(data), alpn=alpn)


def test_real_hello_without_server_hostname_has_no_sni() -> None:
    """A ClientHello made with server_hostname=None parses OK with sni None."""
    data = real_hello(None)
    assert parse_client_hello(data) == ClientHello(OK, sni=None, consumed=len(data))


@pytest.mark.parametrize(
    "data",
    [real_hello("split.example.com"), frame(message_in(real_hello("x.example")), (3, 9))],
    ids=["one-record", "three-records"],
)
def test_every_proper_prefix_needs_more(data: bytes) -> None:
    """Each proper prefix of a hello (split at every byte) is NEED_MORE and the whole is OK."""
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]).status is NEED_MORE, cut
    assert parse_client_hello(data).status is OK


@pytest.mark.parametrize("cuts", [(1,), (2,), (4,), (100,), (1, 2), (3, 50, 51), tuple(range(8, 512, 8))],
                         ids=lambda c: "cuts-" + "-".join(map(str, c[:4])))
def test_refragmented_hello_parses_to_same_sni(cuts: tuple[int, ...]) -> None:
    """The same handshake message re-framed into several records parses OK to the same SNI, consuming them all."""
    message = message_in(real_hello("frag.example.com", alpn=("h2",)))
    data = frame(message, tuple(c for c in cuts if c < len(message)))
    assert parse_client_hello(data) == ClientHello(OK, sni="frag.example.com", consumed=len(data), alpn=("h2",))


def test_bytes_after_the_hello_records_are_not_consumed() -> None:
    """Bytes after the last record of the hello (early data, a pipelined record) are left out of consumed."""
    data = real_hello("early.example")
    result = parse_client_hello(data + b"\x17\x03\x03\x00\x05hello")
    assert (result.status, result.sni, result.consumed) == (OK, "early.example", len(data))


def strided(data: bytes) -> memoryview:
    """A non-contiguous memoryview over ``data`` (every other byte of a twice-as-long buffer)."""
    return memoryview(bytes(x for c in data for x in (c, 0)))[::2]


@pytest.mark.parametrize("kind", [bytearray, memoryview, strided], ids=["bytearray", "memoryview", "strided"])
def test_accepts_bytearray_and_memoryview(kind) -> None:
    """bytearray, memoryview and strided memoryview inputs give the same result as bytes."""
    data = real_hello("view.example")
    assert parse_client_hello(kind(data)) == parse_client_hello(data)


def test_ech_outer_hello_reports_public_name() -> None:
    """With an ECH extension the SNI reported is the outer (public) name, and the result says ech."""
    data = frame(hello_message(sni_ext((0, b"public.ech-provider.net")) + ext(0xFE0D, b"\x00" + os.urandom(80))))
    assert parse_client_hello(data) == ClientHello(OK, "public.ech-provider.net", len(data), ech=True)


def test_chrome_like_hellos_parse() -> None:
    """Chrome-shaped hellos of about 520 and 1,800 bytes (with a post-quantum key share and GREASE ECH) parse OK."""
    small, big = chrome_like("www.google.com"), chrome_like("www.google.com", post_quantum=True)
    assert 500 <= len(small) <= 560 and 1700 <= len(big) <= 1900
    for data in (small, big):
        expected = ClientHello(OK, "www.google.com", len(data), alpn=("h2", "http/1.1"), ech=True)
        assert parse_client_hello(data) == expected


# ---------------------------------------------------------------- table of named cases


def _with_ext_block_length(delta: int) -> bytes:
    message = bytearray(hello_message(sni_ext((0, b"a.example"))))
    at = 4 + 2 + 32 + 1 + 32 + 2 + 6 + 2  # handshake header, version, random, session_id, ciphers, compression
    message[at : at + 2] = (int.from_bytes(message[at : at + 2], "big") + delta).to_bytes(2, "big")
    return frame(bytes(message))


def case(case_id: str, data: bytes, status: HelloStatus, detail: str = "", sni: str | None = None, max_size=65536):
    """One row of the table: input bytes (and max_size) -> status, a fragment of detail, sni."""
    return pytest.param(data, max_size, status, detail, sni, id=case_id)


def hello(extensions: bytes | None, **fields) -> bytes:
    """A ClientHello in one record."""
    return frame(hello_message(extensions, **fields))


def body_only(body: bytes) -> bytes:
    """One record holding a ClientHello handshake header around a hand-written body."""
    return frame(b"\x01" + vec(3, body))


_A = sni_ext((0, b"a.example"))
_SSLV2 = bytes.fromhex("8046010301002d0000001000") + b"\x00" * 61
_PADDED = hello_message(sni_ext((0, b"m.example")) + ext(21, bytes(300)))
_TWO_RECORDS_HEAD = frame(hello_message(None), (20,))[:25]

CASES = [
    case("empty", b"", NEED_MORE),
    case("http-get", b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", NOT_TLS, "record type 0x47 is not handshake (22)"),
    case("http-get-one-byte", b"G", NOT_TLS, "0x47"),
    case("sslv2", _SSLV2, NOT_TLS, "SSLv2"),
    case("application-data-first", b"\x17\x03\x03\x00\x10" + bytes(16), NOT_TLS, "0x17"),
    case("version-major-2", b"\x16\x02\x00\x00\x10", NOT_TLS, "major 2"),
    case("duplicate-server-name-ext", hello(_A + sni_ext((0, b"b.example"))), MALFORMED, "0x0000 appears twice"),
    case("duplicate-other-ext", hello(ext(23, b"") + _A + ext(23, b"")), MALFORMED, "0x0017 appears twice"),
    case("two-host-names", hello(sni_ext((0, b"a.example"), (0, b"b.example"))), MALFORMED, "two host_name"),
    case("empty-host-name", hello(sni_ext((0, b""))), MALFORMED, "empty"),
    case("nul-in-host-name", hello(sni_ext((0, b"a.example\x00.evil.net"))), MALFORMED, "visible ASCII"),
    case("space-in-host-name", hello(sni_ext((0, b"a example"))), MALFORMED, "visible ASCII"),
    case("utf8-host-name", hello(sni_ext((0, "bücher.de".encode()))), MALFORMED, "visible ASCII"),
    case("empty-server-name-list", hello(ext(0, b"\x00\x00")), MALFORMED, "server_name list"),
    case("empty-server-name-ext", hello(ext(0, b"")), MALFORMED, "server_name list"),
    case("server-name-entry-overruns", hello(ext(0, vec(2, b"\x00\x00\x09abc"))), MALFORMED, "runs past"),
    case("unknown-name-type-skipped", hello(sni_ext((7, b"\xff\x00"), (0, b"k.example"))), OK, sni="k.example"),
    case("only-unknown-name-type", hello(sni_ext((7, b"x"))), OK),
    case("ext-block-one-too-long", _with_ext_block_length(+1), MALFORMED, "extensions block says"),
    case("ext-block-one-too-short", _with_ext_block_length(-1), MALFORMED, "extensions block says"),
    case("ext-overruns-block", hello(b"\x00\x17\x00\x09abc"), MALFORMED, "runs past"),
    case("ext-header-truncated", hello(b"\x00\x17\x00"), MALFORMED, "truncated"),
    case("no-extensions-old-hello", hello(None), OK),
    case("empty-extension-block", hello(b""), OK),
    case("handshake-type-2", hello(_A, msg_type=2), MALFORMED, "handshake type 2 is not ClientHello (1)"),
    case("handshake-type-2-early", b"\x16\x03\x01\x01\x00\x02", MALFORMED, "handshake type 2"),
    case("zero-length-record", b"\x16\x03\x01\x00\x00", MALFORMED, "length 0"),
    case("zero-length-second-record", frame(hello_message(None), (10,))[:15] + b"\x16\x03\x01\x00\x00",
         MALFORMED, "length 0"),
    case("oversize-record", b"\x16\x03\x01\x48\x01", MALFORMED, "outside 1..18432"),
    case("over-max-size", SIMPLE, MALFORMED, f"max_size={len(SIMPLE) - 1}", max_size=len(SIMPLE) - 1),
    case("exactly-max-size", SIMPLE, OK, sni="simple.example", max_size=len(SIMPLE)),
    case("huge-declared-length", b"\x16\x03\x01\x40\x00\x01\xff\xff\xff", MALFORMED, "max_size=65536"),
    case("session-id-33", hello(None, session_id=b"s" * 33), MALFORMED, "session_id length 33"),
    case("odd-cipher-suites", body_only(b"\x03\x03" + bytes(32) + b"\x00" + vec(2, b"\x13\x01\x13") + b"\x01\x00"),
         MALFORMED, "cipher_suites length 3"),
    case("no-cipher-suites", hello(None, ciphers=()), MALFORMED, "cipher_suites length 0"),
    case("no-compression", hello(None, compression=b""), MALFORMED, "compression_methods is empty"),
    case("legacy-version-2", body_only(b"\x02\x00" + hello_message(None)[6:]), MALFORMED, "0x0200"),
    case("body-too-short", body_only(b"\x03\x03" + bytes(20)), MALFORMED, "too short"),
    case("garbage-after-hello-in-record", frame(hello_message(None) + b"\x00\x00"), MALFORMED, "2 bytes follow"),
    case("ccs-between-fragments", _TWO_RECORDS_HEAD + b"\x14\x03\x03\x00\x01\x01", MALFORMED, "0x14 interrupts"),
    case("second-record-major-2", _TWO_RECORDS_HEAD + b"\x16\x02", MALFORMED, "major 2"),
    case("most-records", frame(_PADDED, tuple(range(1, MAX_RECORDS))), OK, sni="m.example"),
    case("too-many-records", frame(_PADDED, tuple(range(1, MAX_RECORDS + 1))), MALFORMED, f"more than {MAX_RECORDS}"),
    case("empty-alpn-name", hello(_A + alpn_ext(b"h2", b"")), MALFORMED, "ALPN"),
    case("empty-alpn-list", hello(ext(16, b"\x00\x00")), MALFORMED, "ALPN"),
]


@pytest.mark.parametrize(("data", "max_size", "status", "detail", "sni"), CASES)
def test_named_case(data: bytes, max_size: int, status: HelloStatus, detail: str, sni: str | None) -> None:
    """Each named input gets its expected status, a detail naming the fault, and (when OK) its SNI."""
    result = parse_client_hello(data, max_size=max_size)
    assert result.status is status, result.detail
    assert detail in result.detail
    assert result.sni == sni
    assert (result.consumed > 0) == (status is OK)


def test_result_is_valid_by_construction() -> None:
    """A ClientHello value whose consumed or sni contradicts its status cannot be built."""
    with pytest.raises(ValueError):
        ClientHello(OK)
    with pytest.raises(ValueError):
        ClientHello(MALFORMED, sni="a.example")


# ---------------------------------------------------------------- ECH

_ECH_OUTER = b"\x00\x00\x01\x00\x01\x5b" + vec(2, bytes(32)) + vec(2, bytes(160))  # outer ECHClientHello, GREASE-like
ECH_CASES = [
    pytest.param(hello(_A), "a.example", False, id="no-ech"),
    pytest.param(hello(_A + ext(0xFE0D, _ECH_OUTER)), "a.example", True, id="ech-after-sni"),
    pytest.param(hello(ext(0xFE0D, _ECH_OUTER) + _A), "a.example", True, id="ech-before-sni"),
    pytest.param(hello(ext(0xFE0D, b"")), None, True, id="ech-empty-body-no-sni"),
    pytest.param(hello(ext(0xFE0D, b"\x01")), None, True, id="ech-inner-marker"),
    pytest.param(frame(hello_message(_A + ext(0xFE0D, _ECH_OUTER)), (7, 60, 200)), "a.example", True,
                 id="ech-fragmented"),
    pytest.param(hello(_A + ext(0xFE02, b"\x00")), "a.example", False, id="older-draft-type-0xfe02"),
    pytest.param(hello(_A + ext(0xFF0D, b"\x00")), "a.example", False, id="near-miss-0xff0d"),
    pytest.param(hello(_A + ext(0xFD00, b"\x00")), "a.example", False, id="ech_outer_extensions-0xfd00"),
]


@pytest.mark.parametrize(("data", "sni", "ech"), ECH_CASES)
def test_ech_flag(data: bytes, sni: str | None, ech: bool) -> None:
    """The ech flag is set exactly when extension 0xfe0d is present, wherever it sits, whatever its body."""
    result = parse_client_hello(data)
    assert (result.status, result.sni, result.ech) == (OK, sni, ech)


@pytest.mark.parametrize(
    "data",
    [hello(_A + ext(0xFE0D, b"") + ext(0xFE0D, b"")), hello(_A + b"\xfe\x0d\x00")],
    ids=["ech-twice", "ech-truncated"],
)
def test_malformed_hello_with_ech_carries_no_flag(data: bytes) -> None:
    """A malformed hello is MALFORMED with ech False, even when it names the ECH extension."""
    result = parse_client_hello(data)
    assert (result.status, result.ech) == (MALFORMED, False)


def test_ech_needs_a_complete_hello() -> None:
    """A prefix of a hello with ECH is NEED_MORE with no flag; a NEED_MORE result carrying ech cannot be built."""
    data = hello(_A + ext(0xFE0D, _ECH_OUTER))
    assert parse_client_hello(data[:-1]) == ClientHello(NEED_MORE)
    with pytest.raises(ValueError):
        ClientHello(NEED_MORE, ech=True)


# ---------------------------------------------------------------- hypothesis

LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True).filter(
    lambda s: not s.lower().startswith("xn--"))
NAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join)
OTHER_EXT = st.tuples(st.integers(1, 0xFFFF).filter(lambda t: t not in (16, 0xFE0D)), st.binary(max_size=40))


@st.composite
def built_hellos(draw, *, fragment: bool = True) -> tuple[bytes, str, tuple[bytes, ...]]:
    """A (records, name, alpn) triple: a ClientHello with random fields, extra extensions and record splits."""
    name = draw(NAME)
    others = draw(st.lists(OTHER_EXT, max_size=8, unique_by=lambda e: e[0]))
    alpn = tuple(draw(st.lists(st.binary(min_size=1, max_size=12), max_size=3)))
    parts = [ext(t, body) for t, body in others]
    parts.insert(draw(st.integers(0, len(parts))), sni_ext((0, name.encode())))
    if alpn:
        parts.insert(draw(st.integers(0, len(parts))), alpn_ext(*alpn))
    message = hello_message(
        b"".join(parts),
        ciphers=tuple(draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40))),
        session_id=draw(st.binary(max_size=32)),
        compression=draw(st.binary(min_size=1, max_size=3)),
    )
    cuts = tuple(draw(st.lists(st.integers(1, len(message) - 1), max_size=10))) if fragment else ()
    return frame(message, cuts, version=draw(st.sampled_from([0x0300, 0x0301, 0x0303]))), name, alpn


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Arbitrary bytes never raise and always give one of the four statuses."""
    assert parse_client_hello(data).status in set(HelloStatus)


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(1, 400), max_size=4))
def test_random_body_in_valid_records_never_raises(body: bytes, cuts: list[int]) -> None:
    """A random ClientHello body in well-formed (possibly fragmented) records never raises and is never NEED_MORE."""
    message = b"\x01" + vec(3, body)
    result = parse_client_hello(frame(message, tuple(c for c in cuts if c < len(message))))
    assert result.status in (OK, MALFORMED)


@FUZZ
@given(st.data())
def test_mutated_real_hello_never_raises(data: st.DataObject) -> None:
    """A real hello with random bytes overwritten never raises."""
    hello = bytearray(real_hello("mutate.example.com", alpn=("h2",)))
    for _ in range(data.draw(st.integers(1, 4))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    assert parse_client_hello(bytes(hello)).status in set(HelloStatus)


@FUZZ
@given(built_hellos(), st.integers(min_value=0))
def test_built_hello_parses_to_its_name(built: tuple[bytes, str, tuple[bytes, ...]], cut: int) -> None:
    """A generated hello in random records parses OK to the name and ALPN it was built with; a prefix needs more."""
    data, name, alpn = built
    expected = ClientHello(OK, name, len(data), alpn=tuple(p.decode("latin-1") for p in alpn))
    assert parse_client_hello(data) == expected
    assert parse_client_hello(data[: cut % len(data)]).status is NEED_MORE


# ---------------------------------------------------------------- mitmproxy as oracle


@pytest.fixture(scope="module")
def mitm_parse():
    """mitmproxy's own ClientHello parser (skips where mitmproxy is not installed, e.g. Python 3.11)."""
    tls_layer = pytest.importorskip("mitmproxy.proxy.layers.tls")
    from mitmproxy.tls import ClientHello as MClientHello

    def parse(data: bytes) -> MClientHello:
        parsed = tls_layer.parse_client_hello(data)
        assert isinstance(parsed, MClientHello)
        return parsed

    return parse


@FUZZ
@given(built=built_hellos(fragment=False))
def test_oracle_agrees_on_built_hellos(mitm_parse, built: tuple[bytes, str, tuple[bytes, ...]]) -> None:
    """For generated single-record hellos our SNI and ALPN equal mitmproxy's."""
    data = built[0]
    ours, theirs = parse_client_hello(data), mitm_parse(data)
    assert ours.sni == theirs.sni
    assert ours.alpn == tuple(p.decode("latin-1") for p in theirs.alpn_protocols)
    assert ours.ech == any(ext_type == 0xFE0D for ext_type, _ in theirs.extensions)


@pytest.mark.parametrize("alpn", [(), ("h2", "http/1.1")], ids=["no-alpn", "alpn"])
@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
@pytest.mark.parametrize("name", [*NAMES, None])
def test_oracle_agrees_on_real_hellos(mitm_parse, name: str | None, tls12: bool, alpn: tuple[str, ...]) -> None:
    """For ssl-made hellos our SNI and ALPN equal mitmproxy's."""
    data = real_hello(name, tls12=tls12, alpn=alpn)
    ours, theirs = parse_client_hello(data), mitm_parse(data)
    assert ours.sni == theirs.sni
    assert ours.alpn == tuple(p.decode() for p in theirs.alpn_protocols)


def test_oracle_agrees_on_chrome_like_hellos(mitm_parse) -> None:
    """For Chrome-shaped hellos, with and without a post-quantum key share, our SNI and ECH flag equal mitmproxy's."""
    for data in (chrome_like("www.google.com"), chrome_like("www.google.com", post_quantum=True)):
        ours, theirs = parse_client_hello(data), mitm_parse(data)
        assert ours.sni == theirs.sni == "www.google.com"
        assert ours.ech is any(ext_type == 0xFE0D for ext_type, _ in theirs.extensions) is True
