"""Fuzzing the DNS message handling of :mod:`egressd.sniff.dns`, with dnspython as the reader of everything we send.

Queries come from :mod:`dnsgen` (any name, type, class, opcode, question
count, EDNS version and option, then truncated, flipped, made to loop through
compression pointers, given a name over 255 octets or grown to 64 KiB); upstream
answers carry CNAME chains and loops, 500 A records, TTL 0, HTTPS records
with ``ech``. Properties: ``read_query`` never raises and what it answers
parses, with the client's ID; what we keep of an answer has no ``ech`` left, a
lifetime within bounds, and exactly the addresses at the end of the CNAME chain;
every rendered reply fits its limit and parses; a stamped template is the
answer we would have rendered afresh.
"""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from dns.rdtypes.svcbbase import ParamKey
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egressd.hostport import BadDestination, normalize_host
from egressd.sniff.dns import MAX_MESSAGE, Answer, Bad, read_query, refusal, render, reply, stamp, udp_limit
from fuzz.dnsgen import answers, header, query_messages, query_wires

FUZZ = settings.get_profile("egressd-fuzz")
FUZZ_HEAVY = settings.get_profile("egressd-fuzz-heavy")
MAX_TTL = 300


@FUZZ
@given(query_wires())
@example(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01")  # a name pointing at itself
@example(b"\x12\x34" + bytes(65533))
def test_read_query_answers_every_message_in_its_own_terms(wire: bytes) -> None:
    """Any message gives one question to decide, or a Bad whose answer (when there is one) dnspython reads, with the
    message's ID, QR set and the rcode named; nothing is answered to a response or to fewer than two bytes."""
    result = read_query(wire)
    if isinstance(result, Bad):
        if result.wire is None:
            assert len(wire) < 2 or wire[2] & 0x80
            return
        answer = dns.message.from_wire(result.wire)
        assert answer.id == int.from_bytes(wire[:2], "big") and answer.flags & dns.flags.QR
        assert dns.rcode.to_text(answer.rcode()) == result.rcode
        return
    assert len(result.question) == 1 and result.edns <= 0 and not result.flags & dns.flags.QR
    text = result.question[0].name.to_text(omit_final_dot=True)
    try:
        normalize_host(text)
    except BadDestination:
        pass


def _reference_seed(query: dns.message.Message, response: dns.message.Message) -> tuple | None:
    """The addresses a resolver would take for the question: follow CNAMEs (at most 16) to the question's type."""
    question = query.question[0]
    if question.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA) or question.rdclass != 1:
        return None
    records = {(rrset.name, rrset.rdtype): rrset for rrset in reversed(response.answer)}  # the first of each
    name = question.name
    for _ in range(16):
        rrset = records.get((name, question.rdtype))
        if rrset is not None:
            return tuple(sorted(str(ipaddress.ip_address(rd.address)) for rd in rrset))
        alias = records.get((name, dns.rdatatype.CNAME))
        if alias is None:
            return ()
        name = next(iter(alias)).target
    return ()


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[dns.message.Message, dns.message.Message]:
    """A well-formed query with one question, and an upstream response to it."""
    query = draw(query_messages().filter(lambda q: len(q.question) == 1 and q.opcode() == 0 and q.edns <= 0
                                         and not q.flags & dns.flags.QR))
    return query, draw(answers(query))


@FUZZ_HEAVY
@given(exchanges(), st.integers(0, 400))
def test_what_is_kept_of_an_answer_and_replied_from_it(exchange: tuple, elapsed: int) -> None:
    """A kept answer has no ech anywhere, a lifetime from 0 to the cap and the addresses a resolver would find; a
    reply from it fits each limit (TC and no records when it cannot) and parses with TTLs never raised."""
    query, response = exchange
    answer = Answer.of(response, MAX_TTL)
    assert 0 <= answer.lifetime <= MAX_TTL
    kept = [rrset for section in answer.sections for rrset in section]
    assert not any(rrset.rdtype in (dns.rdatatype.HTTPS, dns.rdatatype.SVCB) and ParamKey.ECH in rd.params
                   for rrset in kept for rd in rrset)
    assert answer.authentic <= bool(response.flags & dns.flags.AD) and not (answer.authentic and answer.ech_stripped)
    expected = _reference_seed(query, response) if response.rcode() == dns.rcode.NOERROR else None
    seed = None if answer.seed is None else tuple(sorted(str(ip) for ip in answer.seed[0]))
    assert seed == expected
    out = reply(query, answer, elapsed)
    for limit in (udp_limit(query), MAX_MESSAGE):
        wire = render(out, limit)
        assert len(wire) <= limit
        parsed = dns.message.from_wire(wire)
        assert parsed.id == query.id and parsed.question == query.question
        if parsed.flags & dns.flags.TC:
            assert parsed.answer == parsed.authority == []
        else:
            original = {(r.name, r.rdtype): r.ttl for section in answer.sections for r in section}
            for rrset in parsed.answer:
                assert rrset.ttl <= original[(rrset.name, rrset.rdtype)]


@FUZZ
@given(query_messages(), st.data())
def test_a_stamped_template_is_the_answer_rendered_afresh(first: dns.message.Message, data: st.DataObject) -> None:
    """An NXDOMAIN rendered for one query, stamped with another query's ID and letter case, equals the NXDOMAIN
    rendered for that other query; a query whose question is laid out otherwise gets None."""
    if not isinstance(read_query(first.to_wire()), dns.message.Message):
        return  # (the filter stamps only queries it takes)
    template = render(refusal(first, dns.rcode.NXDOMAIN), MAX_MESSAGE)
    second = dns.message.from_wire(first.to_wire())
    second.id = data.draw(st.integers(0, 0xFFFF))
    name = first.question[0].name
    if data.draw(st.booleans()):
        labels = [bytes(c ^ 0x20 if chr(c).isascii() and chr(c).isalpha() and data.draw(st.booleans()) else c
                        for c in label) for label in name.labels]
        name = dns.name.Name(labels)
    second.question = [dns.rrset.RRset(name, first.question[0].rdclass, first.question[0].rdtype)]
    stamped = stamp(template, second.to_wire())
    assert stamped == render(refusal(second, dns.rcode.NXDOMAIN), MAX_MESSAGE)
    other = data.draw(query_wires())
    result = stamp(template, other)
    if result is not None:
        assert header(result)[0] == header(other)[0]
        assert dns.message.from_wire(result).question[0].name == first.question[0].name


# -- findings, kept as regression cases ----------------------------------------------------------------------------


def _soa_answer() -> tuple[dns.message.Message, dns.message.Message]:
    query = dns.message.make_query("fuzz.test", "SOA")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("fuzz.test.", 300, "IN", "SOA",
                                               "ns.fuzz.test. host.fuzz.test. 1 2 3 4 60"))
    return query, response


def test_an_answer_holding_only_an_soa_is_kept() -> None:
    """The answer to an SOA query (the SOA alone in the answer section) is kept for its TTL and replied (the SOA
    was left out of the TTLs as a negative answer's, and min() of none raised ValueError)."""
    query, response = _soa_answer()
    answer = Answer.of(response, MAX_TTL)
    assert answer.lifetime == 300 and answer.sections[0] == tuple(response.answer)
    assert dns.message.from_wire(render(reply(query, answer), 512)).answer == response.answer
