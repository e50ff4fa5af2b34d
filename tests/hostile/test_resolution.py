"""Hostile DNS answers to egressd's own lookups: CNAME loops, hundreds of records, TTL 0, forbidden mixes, rebinding.

A name the policy allows is looked up by egressd; whoever controls that name's
zone controls the answer. Here a DNS server of this module answers what a zone
file cannot say (:class:`Answers`): CNAMEs that loop or chain too far, 500 A
records, an answer for another name, embedded and mapped forms of forbidden
addresses, TTL 0, and an answer that changes between two lookups (rebinding).
Each row is one CONNECT to the name on the lab's echo port: the answer, one
record, and never a dial to a refused address. Rows that name addresses which
must never be dialled are ``isolated``: they run in the private network
namespace of ``tests/run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from conftest import service_yaml
from egressd.lab import DnsServer
from harness import ProxyProcess
from hostile.table import Case, Ledger, check_answer, check_record, params
from hostile.wire import Target, raw, tunnel

Build = Callable[[dns.message.Message, int], list[dns.rrset.RRset]]  # (query, times asked) -> answer section


def rrset(owner: str, rdtype: str, *values: str, ttl: int = 30) -> dns.rrset.RRset:
    return dns.rrset.from_text(owner + ".", ttl, "IN", rdtype, *values)


def addresses(*values: str, ttl: int = 30) -> Build:
    """The question's name answers these IPv4 (A) and IPv6 (AAAA) addresses."""
    def build(query: dns.message.Message, asked: int) -> list[dns.rrset.RRset]:
        q = query.question[0]
        family = {1: ".", 28: ":"}.get(q.rdtype)
        matching = [v for v in values if family is not None and (":" in v) == (family == ":")]
        return [dns.rrset.from_text(q.name, ttl, "IN", q.rdtype, *matching)] if matching else []
    return build


def cname_loop(query: dns.message.Message, asked: int) -> list[dns.rrset.RRset]:
    return [rrset("loop.res.test", "CNAME", "loop2.res.test."), rrset("loop2.res.test", "CNAME", "loop.res.test.")]


def cname_chain(query: dns.message.Message, asked: int) -> list[dns.rrset.RRset]:
    """Twenty CNAME hops, then an address: longer than any resolver follows."""
    hops = [rrset("chain.res.test", "CNAME", "c1.res.test.")]
    hops += [rrset(f"c{i}.res.test", "CNAME", f"c{i + 1}.res.test.") for i in range(1, 20)]
    return [*hops, rrset("c20.res.test", "A", "127.0.0.1")] if query.question[0].rdtype == 1 else hops


def other_name(query: dns.message.Message, asked: int) -> list[dns.rrset.RRset]:
    """An answer section holding only a record for a name that was not asked."""
    return [rrset("victim.res.test", "A", "127.0.0.1")]


def cname_to_metadata(query: dns.message.Message, asked: int) -> list[dns.rrset.RRset]:
    alias = rrset("alias.res.test", "CNAME", "metadata.google.internal.")
    return [alias, rrset("metadata.google.internal", "A", "169.254.169.254")] if query.question[0].rdtype == 1 else []


MANY = ("127.0.0.1", *(f"10.{i // 256}.{i % 256}.1" for i in range(499)))
SPECIAL: dict[str, Build] = {
    "loop.res.test": cname_loop,
    "chain.res.test": cname_chain,
    "other.res.test": other_name,
    "alias.res.test": cname_to_metadata,
    "many.res.test": addresses(*MANY),
    "mixed.res.test": addresses("169.254.169.254", "8.8.8.8", "127.0.0.1", "fd00:ec2::254"),
    "zero.res.test": addresses("0.0.0.0"),
    "mapped.res.test": addresses("::ffff:169.254.169.254"),
    "nat64.res.test": addresses("64:ff9b::a9fe:a9fe"),
    "ttl0.res.test": addresses("127.0.0.1", ttl=0),
}


class Answers(DnsServer):
    """The lab's DNS server, answering the names of ``special`` with what their builders say (and counting the
    A queries for each), everything else from its zone."""

    def __init__(self, special: dict[str, Build]) -> None:
        super().__init__({})
        self.special = special
        self.asked: dict[str, int] = {}

    def answer(self, wire: bytes, transport: str = "udp"):
        query = dns.message.from_wire(wire)
        qname = query.question[0].name.to_text(omit_final_dot=True).lower() if query.question else ""
        build = self.special.get(qname)
        if build is None:
            return super().answer(wire, transport)
        self.queries.append((qname, dns.rdatatype.to_text(query.question[0].rdtype)))
        if query.question[0].rdtype == 1:
            self.asked[qname] = self.asked.get(qname, 0) + 1
        response = dns.message.make_response(query)
        response.answer.extend(build(query, self.asked.get(qname, 0)))
        return query, response, 0.0


isolated = (pytest.mark.isolated,)
ROWS = [
    Case("cname-loop", raw(b"CONNECT loop.res.test:{echo} HTTP/1.1\r\n\r\n"), "502", "dns_failure"),
    Case("cname-chain-of-20", raw(b"CONNECT chain.res.test:{echo} HTTP/1.1\r\n\r\n"), "502", "dns_failure"),
    Case("answer-for-another-name", raw(b"CONNECT other.res.test:{echo} HTTP/1.1\r\n\r\n"), "502", "dns_failure"),
    Case("cname-to-metadata", raw(b"CONNECT alias.res.test:{echo} HTTP/1.1\r\n\r\n"), "403", "forbidden_address",
         {"resolved": ["169.254.169.254"], "upstream": None}, marks=isolated),
    Case("500-a-records", tunnel("many.res.test:{echo}", b"ping"), "tunnel+echo", "allowed",
         {"upstream": "127.0.0.1:{echo}"}, marks=isolated),
    Case("public-and-forbidden-mix", tunnel("mixed.res.test:{echo}", b"ping"), "tunnel+echo", "allowed",
         {"upstream": "127.0.0.1:{echo}"}, marks=isolated),
    Case("answer-0.0.0.0", raw(b"CONNECT zero.res.test:{echo} HTTP/1.1\r\n\r\n"), "403", "forbidden_address",
         {"upstream": None}, marks=isolated),
    Case("answer-mapped-metadata", raw(b"CONNECT mapped.res.test:{echo} HTTP/1.1\r\n\r\n"), "403",
         "forbidden_address", {"upstream": None}, marks=isolated),
    Case("answer-nat64-metadata", raw(b"CONNECT nat64.res.test:{echo} HTTP/1.1\r\n\r\n"), "403",
         "forbidden_address", {"upstream": None}, marks=isolated),
]


@dataclass
class Resolving:
    proxy: ProxyProcess
    ledger: Ledger
    target: Target
    dns: Answers


def start(lab, module_proxy, *extra: str) -> Resolving:
    server = lab.thread.serve(Answers(SPECIAL))
    rules = f"  - host: '*.res.test'\n    ports: [{lab.echo.port}]\n"
    proxy = module_proxy({"svc.yaml": service_yaml(rules)}, *extra, resolver=server.address)
    return Resolving(proxy, Ledger(proxy), Target(proxy.address, {"echo": lab.echo.port}), server)


@pytest.fixture(scope="module")
def resolving(lab, module_proxy) -> Resolving:
    """egressd resolving through this module's DNS server (``*.res.test`` allowed on the echo port), keeping
    every address of the 500-record answer so that each one is classified (the limit has its own test)."""
    return start(lab, module_proxy, "--max-addresses-per-name", "500")


@pytest.mark.parametrize("case", params(ROWS))
def test_row(lab, resolving: Resolving, case: Case) -> None:
    """Each hostile answer ends in its answer and one record, and no refused address is ever dialled."""
    resolving.ledger.begin()
    outcome = case.send(resolving.target)
    [rec] = resolving.ledger.take(1, case.name)
    filled = {k: resolving.target.fill(v.encode()).decode() if isinstance(v, str) else v
              for k, v in case.record.items()}
    case = Case(case.name, case.send, case.answer, case.reason, filled)
    check_answer(outcome, case)
    check_record(rec, case)
    if rec["upstream"] is not None:
        assert rec["upstream"].startswith("127.0.0.1:"), rec


def test_500_records_are_all_classified_and_named(lab, resolving: Resolving) -> None:
    """Of 500 answers, the private ones kept are refused and named in the record, and only the allowed one is
    dialled."""
    resolving.ledger.begin()
    tunnel("many.res.test:{echo}", b"x")(resolving.target)
    [rec] = resolving.ledger.take(1)
    assert 2 <= len(rec["resolved"]) <= 500 and rec["upstream"] == f"127.0.0.1:{lab.echo.port}"
    assert "10.0.0.1 is private" in rec["detail"]


@pytest.mark.isolated
def test_500_records_keep_the_first_50_and_the_record_says_so(lab, module_proxy) -> None:
    """By default a name keeps 50 addresses (--max-addresses-per-name): the record lists those 50, names the
    limit and how many were dropped, and only a kept address is ever dialled."""
    defaults = start(lab, module_proxy)
    proxy, ledger = defaults.proxy, defaults.ledger
    ledger.begin()
    outcome = tunnel("many.res.test:{echo}", b"x")(defaults.target)
    [rec] = ledger.take(1)
    assert len(rec["resolved"]) == 50 and set(rec["resolved"]) <= set(MANY)
    assert rec["limit"] == "max_addresses_per_name"
    assert "many.res.test has 500 addresses; the first 50 were kept (--max-addresses-per-name)" in rec["detail"]
    kept_loopback = "127.0.0.1" in rec["resolved"]  # the server shuffles its answer: kept or not, it is consistent
    assert rec["reason"] == ("allowed" if kept_loopback else "forbidden_address")
    assert outcome.after_head == b"x" if kept_loopback else outcome.head.startswith(b"HTTP/1.1 403 ")
    assert rec["upstream"] == (f"127.0.0.1:{lab.echo.port}" if kept_loopback else None)
    assert 'egressd_limit_hits_total{limit="max_addresses_per_name"} 1.0' in proxy.metrics()


def test_ttl_0_is_held_for_the_minimum_ttl(lab, resolving: Resolving) -> None:
    """An answer with TTL 0 is kept for --dns-min-ttl: a second connection right after asks no query."""
    resolving.ledger.begin()
    for _ in range(2):
        outcome = tunnel("ttl0.res.test:{echo}", b"x")(resolving.target)
        assert outcome.after_head == b"x"
    first, second = resolving.ledger.take(2)
    assert (first["reason"], second["reason"]) == ("allowed", "allowed")
    assert resolving.dns.asked["ttl0.res.test"] == 1 and second["dns_ms"] is None


REBIND = {"rebind.res.test": lambda query, asked: addresses("127.0.0.1" if asked == 1 else "169.254.169.254",
                                                            ttl=0)(query, asked)}


@pytest.mark.isolated
def test_rebinding_answer_is_checked_again_at_every_lookup(lab, module_proxy) -> None:
    """A name whose answer turns from an allowed address to the metadata address between two lookups (TTL 0,
    --dns-min-ttl 0) is dialled the first time and refused the second: each connection dials what it checked."""
    server = lab.thread.serve(Answers(REBIND))
    rules = f"  - host: rebind.res.test\n    ports: [{lab.echo.port}]\n"
    proxy = module_proxy({"svc.yaml": service_yaml(rules)}, "--dns-min-ttl", "0", resolver=server.address)
    ledger, target = Ledger(proxy), Target(proxy.address, {"echo": lab.echo.port})
    ledger.begin()
    first = tunnel("rebind.res.test:{echo}", b"x")(target)
    second = raw(b"CONNECT rebind.res.test:{echo} HTTP/1.1\r\n\r\n")(target)
    assert first.after_head == b"x" and second.data.startswith(b"HTTP/1.1 403 ")
    allowed, refused = ledger.take(2)
    assert (allowed["reason"], allowed["upstream"]) == ("allowed", f"127.0.0.1:{lab.echo.port}")
    assert (refused["reason"], refused["resolved"], refused["upstream"]) == (
        "forbidden_address", ["169.254.169.254"], None)
    assert server.asked["rebind.res.test"] == 2
