"""The DNS filter's pure parts (egressd.sniff.dns, the answer cache): named cases of message in, bytes out."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest
from dns.rdtypes.svcbbase import ParamKey
from hypothesis import given
from hypothesis import strategies as st

from egressd.dnsfilter import AnswerCache, cache_key
from egressd.sniff.dns import (
    Answer,
    Bad,
    addresses_of,
    header_reply,
    read_query,
    refusal,
    render,
    reply,
    response_form,
    stamp,
    strip_ech,
    udp_limit,
    upstream_query,
)

ECH = "AEn+DQBFKwAgACABWIHUGj4u+PIggYXcR5JF0gYk3dCRioBW8uJq9H4mKAAIAAEAAQABAANAEnB1YmxpYy50bHMtZWNoLmRldgAA"


def query(name: str = "api.example.com", rdtype: str = "A", **kw) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


def wire_of(message: dns.message.Message) -> bytes:
    return message.to_wire()


def rrset(text: str) -> dns.rrset.RRset:
    """One RRset from ``name ttl type rdata`` (class IN)."""
    name, ttl, rdtype, *rdatas = text.split(" ", 3)
    return dns.rrset.from_text(name, int(ttl), "IN", rdtype, *rdatas[0].split(" | "))


def upstream_response(q: dns.message.Message, rcode: int = dns.rcode.NOERROR, answer=(), authority=(),
                      flags: int = 0) -> dns.message.Message:
    response = dns.message.make_response(q)
    response.set_rcode(rcode)
    response.flags |= flags
    response.answer.extend(answer)
    response.authority.extend(authority)
    return response


# -- read_query ---------------------------------------------------------------------------------------------------
def _two_questions() -> bytes:
    q = query()
    q.question.append(query("b.example.com").question[0])
    return wire_of(q)


def _opcode(opcode: int) -> bytes:
    q = query()
    q.set_opcode(opcode)
    return wire_of(q)


READ_CASES = {
    # name: (wire, rcode of the answer or None for no answer)
    "empty": (b"", None),
    "one byte": (b"\x12", None),
    "only an id": (b"\x12\x34", "FORMERR"),
    "header cut short": (b"\x12\x34\x01\x00\x00\x01", "FORMERR"),
    "garbage question": (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07garbage", "FORMERR"),
    "trailing junk": (wire_of(query()) + b"junk", "FORMERR"),
    "a response": (wire_of(dns.message.make_response(query())), None),
    "no question": (wire_of(dns.message.Message()), "FORMERR"),
    "two questions": (_two_questions(), "FORMERR"),
    "notify": (_opcode(dns.opcode.NOTIFY), "NOTIMP"),
    "status": (_opcode(dns.opcode.STATUS), "NOTIMP"),
    "edns version 1": (wire_of(query(use_edns=1)), "BADVERS"),
}


@pytest.mark.parametrize("name", list(READ_CASES))
def test_read_query_refusals(name: str) -> None:
    """Each misfit message gets the answer a resolver gives (with the message's ID), or none at all."""
    wire, rcode = READ_CASES[name]
    bad = read_query(wire)
    assert isinstance(bad, Bad) and bad.rcode == rcode and bad.detail
    if rcode is None:
        assert bad.wire is None
        return
    answer = bad.wire
    assert answer[:2] == wire[:2] and answer[2] & 0x80  # same ID, QR set
    if rcode == "BADVERS":
        parsed = dns.message.from_wire(answer)
        assert parsed.rcode() == dns.rcode.BADVERS and parsed.edns == 0
    else:
        assert answer[3] & 0x0F == dns.rcode.from_text(rcode) and len(answer) == 12


def test_read_query_takes_a_plain_query() -> None:
    """A well-formed query comes back as the parsed message."""
    q = query(use_edns=0, want_dnssec=True)
    parsed = read_query(wire_of(q))
    assert isinstance(parsed, dns.message.Message) and parsed.id == q.id and parsed.question == q.question


def test_header_reply_keeps_id_opcode_and_rd() -> None:
    """The bare header answers with the query's ID, opcode and RD, QR and RA set, and the rcode."""
    q = query()
    q.set_opcode(dns.opcode.NOTIFY)
    answer = dns.message.from_wire(header_reply(wire_of(q), dns.rcode.NOTIMP))
    assert (answer.id, answer.opcode(), answer.rcode()) == (q.id, dns.opcode.NOTIFY, dns.rcode.NOTIMP)
    assert answer.flags & dns.flags.QR and answer.flags & dns.flags.RD and answer.flags & dns.flags.RA


@given(st.binary(max_size=600))
def test_read_query_never_raises(data: bytes) -> None:
    """Any bytes give a query or a Bad; an answer, when there is one, parses and carries the message's ID."""
    result = read_query(data)
    if isinstance(result, Bad) and result.wire is not None:
        assert dns.message.from_wire(result.wire).id == int.from_bytes(data[:2], "big")


# -- our own answers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "edns", "do"),
    [({}, -1, False), ({"use_edns": 0}, 0, False), ({"use_edns": 0, "want_dnssec": True}, 0, True)],
    ids=["no-edns", "edns", "edns-do"],
)
def test_refusal_answers_in_the_clients_terms(kw: dict, edns: int, do: bool) -> None:
    """NXDOMAIN carries the client's ID, question and RD, RA, no records, and EDNS (with DO) only if it sent them."""
    q = query("Evil.Example.COM", **kw)
    answer = dns.message.from_wire(render(refusal(q, dns.rcode.NXDOMAIN), 512))
    assert (answer.id, answer.rcode(), answer.question[0].name.to_text()) == (q.id, dns.rcode.NXDOMAIN,
                                                                              "Evil.Example.COM.")
    assert answer.flags & dns.flags.RA and answer.flags & dns.flags.RD and not answer.flags & dns.flags.AA
    assert answer.answer == answer.authority == answer.additional == []
    assert answer.edns == edns and bool(answer.ednsflags & dns.flags.DO) == do


@pytest.mark.parametrize(
    ("kw", "limit"),
    [({}, 512), ({"use_edns": 0, "payload": 4096}, 4096), ({"use_edns": 0, "payload": 100}, 512),
     ({"use_edns": 0, "payload": 1232}, 1232)],
    ids=["no-edns", "edns-4096", "edns-below-512", "edns-1232"],
)
def test_udp_limit(kw: dict, limit: int) -> None:
    """The UDP answer limit is the client's EDNS payload size, never below 512; 512 without EDNS."""
    assert udp_limit(query(**kw)) == limit


def test_render_truncates_what_does_not_fit() -> None:
    """An answer over the limit goes out with TC, the question and EDNS only; one that fits goes out whole."""
    q = query("big.example.com", use_edns=0, payload=512)
    big = rrset("big.example.com. 30 A " + " | ".join(f"192.0.2.{i}" for i in range(1, 101)))
    answer = Answer.of(upstream_response(q, answer=[big]), 300)
    short = dns.message.from_wire(render(reply(q, answer), 512))
    assert short.flags & dns.flags.TC and short.answer == [] and short.question == q.question and short.edns == 0
    whole = dns.message.from_wire(render(reply(q, answer), 65535))
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 100


def test_upstream_query_keeps_the_question_and_options_but_not_client_subnet() -> None:
    """The upstream query asks the same question with the client's DO, RD, CD and options, minus ECS, a new ID."""
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")
    q = query("API.example.com", "HTTPS", use_edns=0, want_dnssec=True, payload=512,
              options=[dns.edns.ECSOption("192.0.2.0", 24), cookie])
    q.flags |= dns.flags.CD
    out = upstream_query(q)
    assert out.question == q.question and out.question[0].name.to_text() == "API.example.com."
    assert out.flags & dns.flags.RD and out.flags & dns.flags.CD and out.ednsflags & dns.flags.DO
    assert [o.otype for o in out.options] == [dns.edns.OptionType.COOKIE] and out.payload == 1232
    assert upstream_query(query()).edns == -1


# -- ECH ----------------------------------------------------------------------------------------------------------
def https(params: str, rdtype: str = "HTTPS", name: str = "a.example.com.") -> dns.rrset.RRset:
    return dns.rrset.from_text(name, 300, "IN", rdtype, f"1 . {params}")


STRIP_CASES = {
    # name: (params in, params out, records changed)
    "no ech": ('alpn="h2"', 'alpn="h2"', 0),
    "ech only": (f'ech="{ECH}"', "", 1),
    "ech among others": (f'alpn="h2,h3" ech="{ECH}" port=8443', 'alpn="h2,h3" port=8443', 1),
    "ech mandatory": (f'mandatory=alpn,ech alpn="h2" ech="{ECH}"', 'mandatory=alpn alpn="h2"', 1),
    "only ech mandatory": (f'mandatory=ech ech="{ECH}"', "", 1),
}


@pytest.mark.parametrize("name", list(STRIP_CASES))
@pytest.mark.parametrize("rdtype", ["HTTPS", "SVCB"])
def test_strip_ech(name: str, rdtype: str) -> None:
    """ech leaves every HTTPS/SVCB record, and mandatory when it names it; nothing else changes."""
    params_in, params_out, changed = STRIP_CASES[name]
    out, stripped = strip_ech([https(params_in, rdtype)])
    assert stripped == changed and out == [https(params_out, rdtype)] and out[0].ttl == 300
    assert all(ParamKey.ECH not in rd.params for rd in out[0])


def test_strip_ech_drops_the_signatures_it_breaks_and_nothing_else() -> None:
    """RRSIGs over a changed HTTPS RRset go; other records and their RRSIGs stay."""
    sig = "HTTPS 13 3 300 20300101000000 20200101000000 12345 example.com. AAAA"
    a_sig = sig.replace("HTTPS", "A", 1)
    rrsets = [
        https(f'ech="{ECH}"'),
        dns.rrset.from_text("a.example.com.", 300, "IN", "RRSIG", sig),
        dns.rrset.from_text("a.example.com.", 300, "IN", "A", "192.0.2.1"),
        dns.rrset.from_text("a.example.com.", 300, "IN", "RRSIG", a_sig),
    ]
    out, stripped = strip_ech(rrsets)
    assert stripped == 1 and [(r.rdtype, r.covers) for r in out] == [
        (dns.rdatatype.HTTPS, 0), (dns.rdatatype.A, 0), (dns.rdatatype.RRSIG, dns.rdatatype.A)
    ]


def test_answer_with_ech_removed_is_not_authentic() -> None:
    """An answer whose records were changed loses AD; an unchanged one keeps it for a client that asked for it."""
    q = query("a.example.com", "HTTPS", use_edns=0, want_dnssec=True)
    changed = Answer.of(upstream_response(q, answer=[https(f'ech="{ECH}"')], flags=dns.flags.AD), 300)
    same = Answer.of(upstream_response(q, answer=[https('alpn="h2"')], flags=dns.flags.AD), 300)
    assert (changed.ech_stripped, changed.authentic, same.authentic) == (1, False, True)
    assert reply(q, same).flags & dns.flags.AD and not reply(q, changed).flags & dns.flags.AD
    assert not reply(query("a.example.com", "HTTPS"), same).flags & dns.flags.AD  # neither AD nor DO asked


# -- answers kept -------------------------------------------------------------------------------------------------
SOA = "example.com. 600 SOA ns.example.com. host.example.com. 1 7200 900 1209600 60"

LIFETIME_CASES = {
    # name: (question, rcode, answer rrsets, authority rrsets, max_ttl, lifetime, seed)
    "positive, smallest ttl": ("a.example.com A", "NOERROR", ["a.example.com. 30 A 192.0.2.1 | 192.0.2.2"], [], 300,
                               30, (("192.0.2.1", "192.0.2.2"), 30)),
    "capped by max_ttl": ("a.example.com A", "NOERROR", ["a.example.com. 86400 A 192.0.2.1"], [], 300, 300,
                          (("192.0.2.1",), 86400)),
    "cname chain": ("www.example.com AAAA", "NOERROR",
                    ["www.example.com. 20 CNAME cdn.example.net.", "cdn.example.net. 60 AAAA 2001:db8::1"], [], 300,
                    20, (("2001:db8::1",), 20)),
    "nxdomain with soa": ("x.example.com A", "NXDOMAIN", [], [SOA], 300, 60, None),
    "nodata with soa": ("a.example.com AAAA", "NOERROR", [], [SOA], 300, 60, ((), 60)),
    "nodata without soa": ("a.example.com AAAA", "NOERROR", [], [], 300, 0, ((), 0)),
    "zero ttl": ("a.example.com A", "NOERROR", ["a.example.com. 0 A 192.0.2.1"], [], 300, 0, (("192.0.2.1",), 0)),
    "other type": ("a.example.com TXT", "NOERROR", ['a.example.com. 30 TXT "x"'], [], 300, 30, None),
}


@pytest.mark.parametrize("name", list(LIFETIME_CASES))
def test_answer_lifetime_and_seed(name: str) -> None:
    """An answer is kept for its smallest TTL (negative: the SOA's, none without one), at most max_ttl; an A/AAAA
    answer seeds the addresses at the end of its CNAME chain with the chain's smallest TTL."""
    question, rcode, answer, authority, max_ttl, lifetime, seed = LIFETIME_CASES[name]
    q = query(*question.split())
    response = upstream_response(q, dns.rcode.from_text(rcode), [rrset(t) for t in answer],
                                 [rrset(t) for t in authority])
    kept = Answer.of(response, max_ttl)
    assert kept.lifetime == lifetime
    got = None if kept.seed is None else (tuple(str(ip) for ip in kept.seed[0]), kept.seed[1])
    assert got == seed


def test_reply_lowers_ttls_by_the_time_held_and_uses_the_clients_id_and_question() -> None:
    """A cached answer replayed after 7 s has TTLs 7 lower, the new client's ID and its letter case."""
    first = query("a.example.com")
    kept = Answer.of(upstream_response(first, answer=[rrset("a.example.com. 30 A 192.0.2.1")],
                                       authority=[rrset(SOA)]), 300)
    later = query("A.Example.Com", use_edns=0)
    answer = dns.message.from_wire(render(reply(later, kept, 7), 1232))
    assert answer.id == later.id and answer.question[0].name.to_text() == "A.Example.Com."
    assert answer.answer[0].ttl == 23 and answer.authority[0].ttl == 593 and answer.edns == 0
    assert addresses_of(answer) == [{"address": "192.0.2.1", "ttl": 23}]
    assert kept.sections[0][0].ttl == 30  # the kept answer is not changed


def test_answer_cache_holds_until_the_lifetime_and_evicts_the_oldest() -> None:
    """get() gives the whole seconds held until the lifetime is up; past its size the oldest entry goes."""
    q = query()
    kept = Answer.of(upstream_response(q, answer=[rrset("api.example.com. 10 A 192.0.2.1")]), 300)
    cache = AnswerCache(size=2)
    key = cache_key("api.example.com", q)
    renders = cache.put(key, kept, 100.0)
    assert cache.get(key, 100.0) == (kept, 0, renders) and cache.get(key, 109.9) == (kept, 9, renders)
    assert cache.get(key, 110.0) is None and len(cache) == 0
    keys = [cache_key(n, q) for n in ("a.example.com", "b.example.com", "c.example.com")]
    for k in keys:
        cache.put(k, kept, 200.0)
    assert [cache.get(k, 200.0) is not None for k in keys] == [False, True, True]
    assert cache.put(key, Answer.of(upstream_response(q), 300), 200.0) is None  # no SOA: lifetime 0, not kept
    assert cache.get(key, 200.0) is None


def test_cache_key_separates_what_changes_the_answer() -> None:
    """Type, class and the RD, CD and DO bits each make a different key; the ID and letter case do not."""
    base = cache_key("a.example.com", query("A.example.com"))
    assert base == cache_key("a.example.com", query("a.EXAMPLE.com"))
    assert base != cache_key("a.example.com", query("a.example.com", "AAAA"))
    assert base != cache_key("a.example.com", query("a.example.com", want_dnssec=True))
    no_rd = query("a.example.com")
    no_rd.flags &= ~dns.flags.RD
    assert base != cache_key("a.example.com", no_rd)


# -- stamp: a rendered answer replayed to another client ------------------------------------------------------------
def test_stamp_puts_in_the_clients_id_and_letter_case() -> None:
    """A template answer replayed for a query of the same question carries that query's ID and name bytes."""
    first = query("api.example.com", use_edns=0)
    kept = Answer.of(upstream_response(first, answer=[rrset("api.example.com. 30 A 192.0.2.1")]), 300)
    template = render(reply(first, kept), 65535)
    later = query("API.Example.Com", use_edns=0)
    stamped = stamp(template, later.to_wire())
    assert stamped == render(reply(later, kept), 65535)
    answer = dns.message.from_wire(stamped)
    assert answer.id == later.id and answer.answer[0].name.to_text() == "API.Example.Com."


@pytest.mark.parametrize(
    "other",
    [query("api.example.net"), query("api.example.com", "AAAA"), query("api.example.co")],
    ids=["other-name-same-length", "other-type", "shorter-name"],
)
def test_stamp_refuses_a_different_question(other: dns.message.Message) -> None:
    """A query whose question bytes differ from the template's (other than letter case) gets None."""
    first = query("api.example.com")
    template = render(refusal(first, dns.rcode.NXDOMAIN), 512)
    assert stamp(template, other.to_wire()) is None


def test_stamp_refuses_a_compressed_question() -> None:
    """A question name written as a pointer is not laid out as ours: None, and the slow path answers it."""
    wire = bytearray(query("a.example.com").to_wire())
    pointer = bytes(wire[:12]) + b"\xc0\x0c" + bytes(wire[-4:])  # a (nonsensical) pointer into the header
    template = render(refusal(query("a.example.com"), dns.rcode.NXDOMAIN), 512)
    assert stamp(template, pointer) is None


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ({}, {"use_edns": False}, True),
        ({}, {"use_edns": 0}, False),
        ({"use_edns": 0}, {"use_edns": 0, "want_dnssec": True}, False),
        ({"use_edns": 0}, {"use_edns": 0, "options": [dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"1" * 8)]},
         True),
        ({"use_edns": 0}, {"use_edns": 0, "options": [dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"")]},
         False),
    ],
    ids=["both-plain", "edns", "do", "cookie-ignored", "padding"],
)
def test_response_form(a: dict, b: dict, same: bool) -> None:
    """Queries whose answers would differ in bytes (EDNS, DO, padding) have different forms; a cookie does not."""
    assert (response_form(query(**a)) == response_form(query(**b))) is same
