"""DNS messages for the sidecar's DNS filter, without touching a socket: dnspython messages in, messages or bytes out.

::

    wire ──read_query──▶ Message | Bad(FORMERR, NOTIMP, BADVERS, or nothing to send)
    Message ──refusal──▶ NXDOMAIN / SERVFAIL of our own      Message ──upstream_query──▶ what we ask upstream
    RRsets ──strip_ech──▶ the same without ech               Message ──render(limit)──▶ wire, or TC and no records
    template + client's wire ──stamp──▶ a rendered answer with the client's ID and letter case
    upstream Message ──Answer.of──▶ what the filter keeps (ECH removed, lifetime, seed) ──reply──▶ Message

Hard cases, and what is done about them:

* A message that does not parse is answered FORMERR when its ID can be read (two
  bytes), with a bare header; a response (QR set) sent to us is dropped, as BIND
  and Unbound do, so that two servers cannot be made to answer each other
  forever; a non-QUERY opcode is NOTIMP, read from the header before the rest
  is parsed (an UPDATE's sections do not parse as a query's); more or fewer
  than one question is FORMERR; EDNS version above 0 is BADVERS (RFC 6891).
* Our answers set RA, copy RD and CD, and carry EDNS only when the query did,
  with its DO bit (RFC 3225) and our payload size (1232, DNS flag day 2020).
* HTTPS/SVCB records (types 65/64) lose their ``ech`` SvcParam, and ``ech``
  in ``mandatory``, so the app never gets an ECH configuration that would hide
  the real name from the proxy; RRSIGs over a changed RRset no longer hold and
  are dropped (the caller also drops AD).
* Over UDP an answer larger than the client's EDNS payload size (512 without
  EDNS) goes out with TC and no records, so the client asks again over TCP.
* An answer is kept for its smallest TTL; a negative one (NXDOMAIN, or no
  record of the type) for its SOA's negative TTL, and not at all without an
  SOA (RFC 2308); never longer than ``max_ttl``. A reply from a kept answer
  has every TTL lowered by the whole seconds it was held.
* The addresses an A/AAAA answer gives (``Answer.seed``) are those at the end
  of its CNAME chain, with the smallest TTL along the chain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
from dns.rdtypes.svcbbase import MandatoryParam, ParamKey

from egressd.hostport import IPAddress

__all__ = [
    "MAX_MESSAGE", "OUR_PAYLOAD", "Answer", "Bad", "addresses_of", "header_reply", "read_query", "refusal", "render",
    "reply", "response_form", "response_to", "stamp", "strip_ech", "udp_limit", "upstream_query",
]

OUR_PAYLOAD = 1232  # the EDNS payload size we advertise
NO_EDNS_LIMIT = 512  # a UDP answer to a query without EDNS (RFC 1035)
MAX_MESSAGE = 65535  # over TCP, a two-byte length

_SVCB_TYPES = frozenset({dns.rdatatype.SVCB, dns.rdatatype.HTTPS})
_ADDRESS_TYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA})
_CNAME_HOPS = 16

Sections = tuple[tuple[dns.rrset.RRset, ...], tuple[dns.rrset.RRset, ...], tuple[dns.rrset.RRset, ...]]


@dataclass(frozen=True, slots=True)
class Bad:
    """A message that is not a query we answer: ``wire`` to send back (None: nothing), its ``rcode``, and why."""

    wire: bytes | None
    rcode: str | None
    detail: str


def header_reply(wire: bytes, rcode: int) -> bytes:
    """A bare response header (no sections) to the message ``wire``, of which it needs only the two-byte ID."""
    flags = wire[2] if len(wire) > 2 else 0
    return wire[:2] + bytes((0x80 | (flags & 0x79), 0x80 | (rcode & 0x0F))) + bytes(8)  # QR, opcode, RD; RA


def read_query(wire: bytes) -> dns.message.Message | Bad:
    """The query in ``wire``, or what to answer a message that is not one we take."""
    if len(wire) < 2:
        return Bad(None, None, f"a message of {len(wire)} byte(s) has no ID to answer; dropped")
    if len(wire) > 2 and wire[2] & 0x80:
        return Bad(None, None, "a response (QR set) was sent as a query; dropped, as resolvers do")
    opcode = wire[2] >> 3 & 0x0F if len(wire) > 2 else dns.opcode.QUERY
    if opcode != dns.opcode.QUERY:  # before parsing: an UPDATE's sections do not parse as a query's would
        text = dns.opcode.to_text(opcode)
        return Bad(header_reply(wire, dns.rcode.NOTIMP), "NOTIMP", f"opcode {text} is not implemented")
    try:
        query = dns.message.from_wire(wire)
    except Exception as exc:  # hostile bytes: any parse failure is a FORMERR, never a dead listener
        return Bad(header_reply(wire, dns.rcode.FORMERR), "FORMERR", f"malformed message: {exc or type(exc).__name__}")
    if len(query.question) != 1:
        return Bad(header_reply(wire, dns.rcode.FORMERR), "FORMERR", f"{len(query.question)} questions; one expected")
    if query.edns > 0:
        response = dns.message.make_response(query, True, OUR_PAYLOAD)
        response.set_rcode(dns.rcode.BADVERS)
        return Bad(response.to_wire(), "BADVERS", f"EDNS version {query.edns}; only version 0 is supported")
    return query


def udp_limit(query: dns.message.Message) -> int:
    """The largest UDP answer the client takes: its EDNS payload size (at least 512), else 512."""
    return min(max(query.payload, NO_EDNS_LIMIT), MAX_MESSAGE) if query.edns >= 0 else NO_EDNS_LIMIT


def response_form(query: dns.message.Message) -> tuple[bool, int, bool]:
    """What of the query, besides its question and flags, shapes our answer's bytes: EDNS, DO and AD asked for
    (AD is answered to AD or DO), and padding (RFC 8467)."""
    padded = any(o.otype == dns.edns.OptionType.PADDING for o in query.options)
    return query.edns >= 0, query.flags & dns.flags.AD | query.ednsflags & dns.flags.DO, padded


def response_to(query: dns.message.Message) -> dns.message.Message:
    """Our answer's skeleton: the client's ID and question, RD and CD copied, RA set, EDNS with its DO if it used it."""
    response = dns.message.make_response(query, True, OUR_PAYLOAD)
    response.flags |= query.flags & dns.flags.CD
    if query.ednsflags & dns.flags.DO:
        response.ednsflags |= dns.flags.DO
    return response


def refusal(query: dns.message.Message, rcode: int) -> dns.message.Message:
    """Our own answer with no records: NXDOMAIN for a name the filter denies, SERVFAIL when upstream failed."""
    response = response_to(query)
    response.set_rcode(rcode)
    return response


def upstream_query(query: dns.message.Message) -> dns.message.Message:
    """The client's question as we ask it upstream: same name, type, class, RD/CD/AD bits, and EDNS (with our
    payload size) carrying the client's DO bit and options except client subnet; a fresh ID."""
    question = query.question[0]
    out = dns.message.make_query(question.name, question.rdtype, question.rdclass, use_edns=False)
    out.flags = query.flags & (dns.flags.RD | dns.flags.CD | dns.flags.AD)
    if query.edns >= 0:
        options = [o for o in query.options if o.otype != dns.edns.OptionType.ECS]
        out.use_edns(0, query.ednsflags & dns.flags.DO, OUR_PAYLOAD, options=options)
    return out


def strip_ech(rrsets: Iterable[dns.rrset.RRset]) -> tuple[list[dns.rrset.RRset], int]:
    """The RRsets with the ``ech`` SvcParam removed from every HTTPS/SVCB record, and how many records lost one.

    ``ech`` named in ``mandatory`` goes from there too (``mandatory`` itself when
    nothing else is left in it). The RRSIGs over an RRset that changed are dropped.
    """
    out: list[dns.rrset.RRset] = []
    changed: set[tuple[dns.name.Name, int]] = set()
    stripped = 0
    for rrset in rrsets:
        if rrset.rdtype not in _SVCB_TYPES or not any(ParamKey.ECH in rd.params for rd in rrset):
            out.append(rrset)
            continue
        clean = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype)
        clean.update_ttl(rrset.ttl)
        for rd in rrset:
            if ParamKey.ECH in rd.params:
                stripped += 1
                rd = rd.replace(params=_without_ech(rd.params))
            clean.add(rd)
        out.append(clean)
        changed.add((rrset.name, rrset.rdtype))
    if changed:
        out = [r for r in out if not (r.rdtype == dns.rdatatype.RRSIG and (r.name, r.covers) in changed)]
    return out, stripped


def _without_ech(params: Any) -> dict:
    params = {key: value for key, value in params.items() if key != ParamKey.ECH}
    mandatory = params.get(ParamKey.MANDATORY)
    if mandatory is not None:
        keys = [key for key in mandatory.keys if key != ParamKey.ECH]
        if keys:
            params[ParamKey.MANDATORY] = MandatoryParam(keys)
        else:
            del params[ParamKey.MANDATORY]
    return params


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream answer as the filter keeps it: rcode, AD, sections (ECH removed), how long it may be
    kept (0: not at all), and for an A/AAAA question the addresses the name was given and their TTL."""

    rcode: int
    authentic: bool
    sections: Sections
    lifetime: int
    ech_stripped: int
    seed: tuple[tuple[IPAddress, ...], int] | None

    @classmethod
    def of(cls, response: dns.message.Message, max_ttl: float) -> Answer:
        answer, n1 = strip_ech(response.answer)
        authority, n2 = strip_ech(response.authority)
        additional, n3 = strip_ech(response.additional)
        stripped = n1 + n2 + n3
        lifetime = min(_lifetime(answer, authority, additional), int(max_ttl))
        seed = _seed(response.question, answer, authority) if response.rcode() == dns.rcode.NOERROR else None
        authentic = bool(response.flags & dns.flags.AD) and not stripped
        return cls(response.rcode(), authentic, (tuple(answer), tuple(authority), tuple(additional)),
                   max(lifetime, 0), stripped, seed)


def _negative_ttl(authority: list[dns.rrset.RRset]) -> int | None:
    """RFC 2308: the lower of the SOA's TTL and MINIMUM field; None without an SOA."""
    for rrset in authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, next(iter(rrset)).minimum)
    return None


def _lifetime(answer: list, authority: list, additional: list) -> int:
    """The smallest TTL of the answer's records; an SOA in the authority section gives the negative TTL instead
    (one in the answer section, the answer to an SOA query, counts as any record)."""
    ttls = [r.ttl for r in (*answer, *additional)] + [r.ttl for r in authority if r.rdtype != dns.rdatatype.SOA]
    negative = _negative_ttl(authority)
    if negative is not None or not answer:
        ttls.append(negative or 0)  # a negative answer without an SOA is not kept
    return min(ttls)


def _seed(question: list, answer: list, authority: list) -> tuple[tuple[IPAddress, ...], int] | None:
    """For an A or AAAA question: the addresses at the end of its CNAME chain and the chain's smallest TTL
    (none and the negative TTL, 0 without an SOA, when the chain ends without them)."""
    if len(question) != 1 or question[0].rdtype not in _ADDRESS_TYPES or question[0].rdclass != 1:
        return None
    name, rdtype = question[0].name, question[0].rdtype
    ttl: int | None = None
    for _ in range(_CNAME_HOPS):
        found = next((r for r in answer if r.name == name and r.rdtype == rdtype), None)
        if found is not None:
            ips = tuple(ipaddress.ip_address(rd.address) for rd in found)
            return ips, found.ttl if ttl is None else min(ttl, found.ttl)
        alias = next((r for r in answer if r.name == name and r.rdtype == dns.rdatatype.CNAME), None)
        if alias is None:
            break
        ttl = alias.ttl if ttl is None else min(ttl, alias.ttl)
        name = next(iter(alias)).target
    negative = _negative_ttl(authority) or 0
    return (), negative if ttl is None else min(ttl, negative)


def reply(query: dns.message.Message, answer: Answer, elapsed: int = 0) -> dns.message.Message:
    """The client's answer from ``answer``, its TTLs lowered by ``elapsed`` seconds spent in the cache."""
    response = response_to(query)
    response.set_rcode(answer.rcode)
    if answer.authentic and (query.flags & dns.flags.AD or query.ednsflags & dns.flags.DO):
        response.flags |= dns.flags.AD
    for section, rrsets in zip((response.answer, response.authority, response.additional), answer.sections,
                               strict=True):
        if not elapsed:
            section.extend(rrsets)
            continue
        for rrset in rrsets:
            aged = rrset.copy()
            aged.ttl = max(rrset.ttl - elapsed, 0)
            section.append(aged)
    return response


def render(response: dns.message.Message, limit: int) -> bytes:
    """The response's wire form; if it is longer than ``limit``, TC set and nothing but the question and EDNS."""
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        short = dns.message.QueryMessage(id=response.id)
        short.flags = response.flags | dns.flags.TC
        short.question = list(response.question)
        if response.edns >= 0:
            short.use_edns(0, response.ednsflags & 0xFFFF, response.payload, options=response.options)
        short.set_rcode(response.rcode())
        return short.to_wire(max_size=limit)


def stamp(template: bytes, wire: bytes) -> bytes | None:
    """``template``, an answer we rendered to the same question, with the ID and question bytes (the letter case
    of the name) of the client's query ``wire``; None when its question is not laid out as the template's."""
    end = 12
    while template[end]:  # our question name is the first name of its message: labels, never a pointer
        end += template[end] + 1
    end += 5  # the root label, type and class
    if wire[end - 4 : end] != template[end - 4 : end] or wire[12 : end - 4].lower() != template[12 : end - 4].lower():
        return None
    return wire[:2] + template[2:12] + wire[12:end] + template[end:]


def addresses_of(response: dns.message.Message) -> list[dict[str, Any]]:
    """The A/AAAA records of the answer section as the audit record lists them: address and TTL."""
    return [
        {"address": rd.address, "ttl": rrset.ttl}
        for rrset in response.answer if rrset.rdtype in _ADDRESS_TYPES
        for rd in rrset
    ]
