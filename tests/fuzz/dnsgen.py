"""Hypothesis strategies for DNS messages: hostile queries (as wire bytes) and upstream answers (as dnspython
messages), shared by the DNS fuzz tests."""

from __future__ import annotations

import struct
from collections.abc import Callable

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import strategies as st

_WORDS = [b"api", b"API", b"fuzz", b"test", b"TEST", b"wild", b"bad", b"x", b"cluster", b"local", b"evilcluster",
          b"ns", b"svc", b"xn--bcher-kva", b"1", b"2"]
_ODD_LABELS = [b"a\x00b", b"a.b", b"\xff", b"*", b"-a", b"a b", b"a" * 63, b"\\", b"@"]
NAMES = [  # canonical text -> what the fuzz policy says of it (see test_fuzz_dnsfilter)
    "api.fuzz.test", "API.FUZZ.TEST", "x.wild.fuzz.test", "a.b.wild.fuzz.test", "wild.fuzz.test",
    "bad.wild.fuzz.test", "db.ns.svc.cluster.local", "cluster.local", "evilcluster.local", "api.fuzz.test.evil.test",
    "1.2.3.4", "xn--bcher-kva.fuzz.test",
]


@st.composite
def names(draw: st.DrawFn) -> dns.name.Name:
    """A query name: one the policy knows, or labels from a small vocabulary with now and then an odd one."""
    if draw(st.booleans()):
        return dns.name.from_text(draw(st.sampled_from(NAMES)))
    labels = draw(st.lists(st.one_of(st.sampled_from(_WORDS), st.sampled_from(_WORDS), st.sampled_from(_ODD_LABELS)),
                           min_size=0, max_size=5))
    try:
        return dns.name.Name([*labels, b""])
    except dns.name.NameTooLong:
        return dns.name.from_text("long.fuzz.test")


_OPTIONS = st.lists(st.sampled_from([
    dns.edns.ECSOption("192.0.2.0", 24),
    dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * 8),
    dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678"),
    dns.edns.GenericOption(65001, b"unknown"),
]), max_size=3)


@st.composite
def query_messages(draw: st.DrawFn) -> dns.message.Message:
    """A query as dnspython builds it: any name, type and class, flags, opcode, questions, EDNS and options."""
    query = dns.message.Message(id=draw(st.integers(0, 0xFFFF)))
    query.flags = draw(st.sampled_from([dns.flags.RD, dns.flags.RD, 0, dns.flags.RD | dns.flags.CD,
                                        dns.flags.RD | dns.flags.AD, dns.flags.QR]))
    query.set_opcode(draw(st.sampled_from([dns.opcode.QUERY] * 8 + [dns.opcode.NOTIFY, dns.opcode.UPDATE, 3])))
    rdtype = st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.HTTPS, dns.rdatatype.SOA,
                              dns.rdatatype.TXT, dns.rdatatype.ANY, 65280, 0])
    rdclass = st.sampled_from([dns.rdataclass.IN] * 6 + [dns.rdataclass.CH, 254, 65535])
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2, 3]))):
        query.find_rrset(query.question, draw(names()), draw(rdclass), draw(rdtype), create=True, force_unique=True)
    edns = draw(st.sampled_from([-1, -1, 0, 0, 1]))
    if edns >= 0:
        dnssec = dns.flags.DO if draw(st.booleans()) else 0
        query.use_edns(edns, dnssec, draw(st.sampled_from([512, 1232, 4096, 100, 65535])), options=draw(_OPTIONS))
    return query


@st.composite
def plain_queries(draw: st.DrawFn) -> bytes:
    """A well-formed query (one question, opcode QUERY, EDNS 0 or none) for any name, type and class, as wire."""
    query = dns.message.make_query(draw(names()), draw(st.sampled_from(["A", "AAAA", "HTTPS", "TXT", "MX"])),
                                   use_edns=draw(st.sampled_from([False, 0])), want_dnssec=draw(st.booleans()),
                                   id=draw(st.integers(0, 0xFFFF)))
    return query.to_wire()


def _self_pointer(wire: bytes) -> bytes:
    return wire[:12] + b"\xc0\x0c" + wire[12:]  # the question name points at itself


def _pointer_loop(wire: bytes) -> bytes:
    return wire[:12] + b"\x01a\xc0\x0c" + wire[12:]  # a label, then back to its own start


def _long_name(wire: bytes) -> bytes:
    name = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"  # 321 octets: over the 255 allowed
    return wire[:4] + b"\x00\x01" + wire[6:12] + name + b"\x00\x01\x00\x01"


_MUTATIONS: dict[str, Callable[[bytes, int, int], bytes]] = {
    "none": lambda w, i, b: w,
    "truncate": lambda w, i, b: w[: i % (len(w) + 1)],
    "flip": lambda w, i, b: w[: i % len(w)] + bytes([b]) + w[i % len(w) + 1 :] if w else w,
    "append": lambda w, i, b: w + bytes([b]) * (1 + i % 7),
    "self pointer": lambda w, i, b: _self_pointer(w),
    "pointer loop": lambda w, i, b: _pointer_loop(w),
    "name over 255": lambda w, i, b: _long_name(w),
    "qdcount 65535": lambda w, i, b: w[:4] + b"\xff\xff" + w[6:],
    "header only": lambda w, i, b: w[:12],
    "two bytes": lambda w, i, b: w[:2],
    "64 KiB": lambda w, i, b: w + bytes(65535 - len(w)),
}


@st.composite
def query_wires(draw: st.DrawFn) -> bytes:
    """A query's wire form, intact most of the time, else broken in one of the ways a hostile client breaks it."""
    wire = draw(query_messages()).to_wire()
    kind = draw(st.sampled_from(["none"] * 12 + list(_MUTATIONS)))
    return _MUTATIONS[kind](wire, draw(st.integers(0, 1 << 16)), draw(st.integers(0, 255)))


# -- upstream answers ----------------------------------------------------------------------------------------------

_TTLS = st.sampled_from([0, 1, 30, 300, 86400, 2**31 - 1])
ECH = "AEn+DQBFKwAgACABWIHUGj4u+PIggYXcR5JF0gYk3dCRioBW8uJq9H4mKAAIAAEAAQABAANAEnB1YmxpYy50bHMtZWNoLmRldgAA"
_HTTPS = [f'1 . alpn="h2" ech="{ECH}"', f'1 . alpn="h2" ech="{ECH}" mandatory=alpn,ech', '1 . alpn="h2"',
          f'2 . ech="{ECH}" mandatory=ech']


def _rrset(name: dns.name.Name, ttl: int, rdtype: str, texts: list[str]) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(name, ttl, "IN", rdtype, texts)


@st.composite
def answers(draw: st.DrawFn, query: dns.message.Message) -> dns.message.Message:
    """An upstream response to ``query``: A/AAAA (up to 500), CNAME chains and loops, HTTPS with ech, an SOA in the
    authority section (or the answer's), any rcode and TTLs from 0 up."""
    response = dns.message.make_response(query)
    response.set_rcode(draw(st.sampled_from([dns.rcode.NOERROR] * 6 + [dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL])))
    if draw(st.booleans()):
        response.flags |= dns.flags.AD
    owner = query.question[0].name if query.question else dns.name.from_text("fuzz.test")
    name = owner
    for hop in range(draw(st.integers(0, 3))):  # a chain of aliases, sometimes back to the start
        target = owner if draw(st.integers(0, 4)) == 0 else dns.name.from_text(f"alias{hop}.cdn.test")
        response.answer.append(_rrset(name, draw(_TTLS), "CNAME", [target.to_text()]))
        name = target
    count = draw(st.sampled_from([0, 1, 1, 2, 5, 40, 500]))
    v4 = [f"198.51.{n // 250}.{n % 250 + 1}" for n in range(count)]
    if count and draw(st.booleans()):
        response.answer.append(_rrset(name, draw(_TTLS), "A", v4))
    if draw(st.integers(0, 2)) == 0:
        response.answer.append(_rrset(name, draw(_TTLS), "AAAA", ["2001:db8::1", "::ffff:10.0.0.1"]))
    if draw(st.integers(0, 3)) == 0:
        response.answer.append(_rrset(name, draw(_TTLS), "HTTPS", draw(st.lists(st.sampled_from(_HTTPS), min_size=1,
                                                                                   max_size=3, unique=True))))
        if draw(st.booleans()):
            response.answer.append(_rrset(name, draw(_TTLS), "RRSIG",
                                          ["HTTPS 13 3 300 20300101000000 20200101000000 1 fuzz.test. AAAA"]))
    if draw(st.integers(0, 2)) == 0:  # the negative TTL's SOA in the authority section, or an SOA query's answer
        soa = f"ns.fuzz.test. host.fuzz.test. 1 2 3 4 {draw(_TTLS)}"
        section = response.answer if draw(st.integers(0, 3)) == 0 else response.authority
        section.append(_rrset(owner if section is response.answer else dns.name.from_text("fuzz.test"),
                              draw(_TTLS), "SOA", [soa]))
    return response


def header(wire: bytes) -> tuple[int, int, int]:
    """The ID, flags and rcode bits of a message's header."""
    ident, flags = struct.unpack_from("!HH", wire)
    return ident, flags, flags & 0x0F
