"""Fuzzing the DNS filter's steps (:class:`egressd.dnsfilter.Filter`) with hostile queries and upstream answers.

The filter runs in this process over a real engine (the loader's policy, the
resolver whose cache it seeds, the audit log with a sink); only the upstream
exchange, which the filter takes as a function, answers from the generated
plan. The policy allows ``api.fuzz.test`` and ``*.wild.fuzz.test``, denies
``bad.wild.fuzz.test`` globally and passes ``cluster.local`` through.
Properties, for every message: at most one answer, which dnspython reads, with
the query's ID and question and within the UDP limit; exactly one record; a
name the policy denies is answered NXDOMAIN and never asked upstream (decided
here by an independent reading of the policy); an allowed name gets the
upstream's addresses, or SERVFAIL when upstream failed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from egressd.audit import AuditLog
from egressd.config import Config
from egressd.connection import Engine, PolicyHolder
from egressd.dnsfilter import Filter
from egressd.identity.sources import Sources
from egressd.metrics import Metrics
from egressd.policy.loader import load_policy
from egressd.resolve import Resolver
from egressd.sniff.dns import read_query, udp_limit
from fuzz.dnsgen import answers, header, plain_queries, query_wires

FUZZ_HEAVY = settings.get_profile("egressd-fuzz-heavy")
SERVICE = "svc.yaml", "version: v1\nservice: svc\nallow:\n  - host: api.fuzz.test\n  - host: '*.wild.fuzz.test'\n"
GLOBAL = "_global.yaml", "version: v1\nglobal: true\ndeny:\n  - host: bad.wild.fuzz.test\n"
PEER = ("127.0.0.1", 40000)


def policy_allows(name: str) -> bool:
    """The fuzz policy read by hand: the global deny, then the pass-through suffix, then the service's two rules."""
    if name == "bad.wild.fuzz.test":
        return False
    if name == "cluster.local" or name.endswith(".cluster.local"):
        return True
    labels = name.split(".")
    return name == "api.fuzz.test" or (len(labels) == 4 and labels[1:] == ["wild", "fuzz", "test"])


def canonical(text: str) -> str | None:
    """The name a query asks for, as the policy reads it, when it is a plain host name (else None: refused)."""
    if not text or any(c in text for c in "\\@ *") or text.replace(".", "").isdigit():
        return None
    name = text.lower()
    labels = name.split(".")
    if any(not label or label.startswith("-") or label.endswith("-") for label in labels):
        return None
    return name


@dataclass
class Plan:
    """How the stand-in upstream answers (drawn from ``data``; ``up`` False: every resolver failed), and the names
    it was asked."""

    up: bool
    data: st.DataObject
    asked: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, list[dict], asyncio.AbstractEventLoop]]:
    """An engine with the fuzz policy and an audit sink, and an event loop to run the filter's tasks on."""
    directory: Path = tmp_path_factory.mktemp("allowlists")
    for name, text in (SERVICE, GLOBAL):
        (directory / name).write_text(text)
    config = Config(allowlists=directory, service="svc", listen=None, admin_listen=None,
                    dns_listen=(("127.0.0.1", 0),), resolvers=(("127.0.0.1", 9),), dns_passthrough=("cluster.local",))
    metrics = Metrics()
    holder = PolicyHolder(load_policy(directory))
    records: list[dict] = []
    audit = AuditLog(os.devnull, sink=records.append)
    engine = Engine(config, holder, Resolver(config.resolvers, metrics=metrics), audit, metrics,
                    Sources(config, lambda: holder.current, metrics).identifier)
    loop = asyncio.new_event_loop()
    try:
        yield engine, records, loop
    finally:
        loop.close()
        audit.close()


def _ask(plan: Plan):
    async def ask(query: dns.message.Message, upstreams: tuple, timeout: float):
        plan.asked.append(query.question[0].name.to_text(omit_final_dot=True).lower())
        if not plan.up:
            return None, ["127.0.0.1:9: timed out"]
        return plan.data.draw(answers(query)), []
    return ask


@FUZZ_HEAVY
@given(st.lists(st.one_of(plain_queries(), query_wires()), min_size=1, max_size=3), st.booleans(), st.booleans(),
       st.data())
def test_every_message_gets_at_most_one_answer_one_record_and_the_policy(rig, wires: list[bytes], udp: bool,
                                                                         upstream_up: bool,
                                                                         data: st.DataObject) -> None:
    """Each message gets at most one answer (readable, its ID and question, within the UDP limit) and one record;
    denied names get NXDOMAIN without an upstream query, allowed ones the upstream's answer or SERVFAIL."""
    engine, records, loop = rig
    plan = Plan(upstream_up, data)
    dns_filter = Filter(engine, _ask(plan))
    wires = wires + [wires[0]]  # the first again: now answered from the cache or the kept denial
    for wire in wires:
        sent: list[bytes] = []
        before, asked = len(records), len(plan.asked)
        task = loop.run_until_complete(_receive(dns_filter, wire, sent.append, udp))
        if task is not None:
            loop.run_until_complete(task)
        assert len(records) == before + 1, "one record per message"
        assert len(sent) <= 1
        query = read_query(wire)
        if not isinstance(query, dns.message.Message):
            continue
        assert len(sent) == 1
        answer = dns.message.from_wire(sent[0])
        assert answer.id == query.id and answer.question == query.question
        assert len(sent[0]) <= (udp_limit(query) if udp else 65535)
        name = canonical(query.question[0].name.to_text(omit_final_dot=True))
        record = records[-1]
        event(f"{record['decision']} {record['rcode']}")
        if name is None or not policy_allows(name):
            assert answer.rcode() == dns.rcode.NXDOMAIN and len(plan.asked) == asked, record
            assert record["decision"] == "deny"
            continue
        assert record["decision"] == "allow" and record["qname"] == name
        if len(plan.asked) > asked:
            assert plan.asked[-1] == name
        if not upstream_up:
            assert answer.rcode() == dns.rcode.SERVFAIL
        elif not answer.flags & dns.flags.TC and answer.rcode() == dns.rcode.NOERROR:
            listed = sorted(a["address"] for a in record["answers"])
            assert listed == sorted(rd.address for rrset in answer.answer if rrset.rdtype in (1, 28) for rd in rrset)
        assert header(sent[0])[0] == query.id


async def _receive(dns_filter: Filter, wire: bytes, send, udp: bool):
    return dns_filter.receive(wire, PEER, send, udp)


def test_an_allowed_soa_query_gets_the_upstream_soa(rig) -> None:
    """An SOA query for an allowed name is answered with the SOA upstream gave, as any other type is (it was
    SERVFAIL: keeping the answer raised, see test_fuzz_dns)."""
    engine, records, loop = rig

    async def ask(query: dns.message.Message, upstreams: tuple, timeout: float):
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "SOA",
                                                   "ns.fuzz.test. host.fuzz.test. 1 2 3 4 60"))
        return response, []

    sent: list[bytes] = []
    query = dns.message.make_query("api.fuzz.test", "SOA")
    task = loop.run_until_complete(_receive(Filter(engine, ask), query.to_wire(), sent.append, True))
    loop.run_until_complete(task)
    answer = dns.message.from_wire(sent[0])
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer[0].rdtype == dns.rdatatype.SOA
