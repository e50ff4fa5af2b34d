"""The resolver against a real DNS server on loopback: cache, TTL clamp, shared lookups, failures, pinning."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from egressd.addresses import parse_cidr
from egressd.errors import DnsFailure
from egressd.hostport import parse_authority
from egressd.lab import DnsServer, LabThread, Servfail
from egressd.metrics import Metrics
from egressd.resolve import Resolver
from harness import Clock


@pytest.fixture(scope="module")
def dns():
    with LabThread() as lab:
        yield lab.serve(
            DnsServer(
                {"a.test": ("127.0.0.1", "::1", "127.0.0.2"), "b.test": ("10.1.2.3",), "bad.test": Servfail()},
                ttl=30,
            )
        )


def count(dns, name: str) -> int:
    return sum(1 for qname, rdtype in dns.queries if qname == name and rdtype == "A")


def resolver(dns, clock, **kw) -> Resolver:
    return Resolver([dns.address], timeout=1.0, clock=clock, metrics=Metrics(), **kw)


def test_answers_are_cached_for_their_ttl(dns):
    """A second lookup within the TTL is served from the cache; after it, DNS is asked again."""
    clock = Clock()

    async def go():
        r = resolver(dns, clock)
        before = count(dns, "a.test")
        first = await r.lookup("a.test")
        second = await r.lookup("a.test")
        assert count(dns, "a.test") == before + 1
        clock.now += 31
        await r.lookup("a.test")
        assert count(dns, "a.test") == before + 2
        return first, second

    (addresses, dns_ms), (again, none_ms) = asyncio.run(go())
    assert dns_ms > 0 and none_ms is None and addresses == again
    assert [a.version for a in addresses] == [4, 6, 4]  # families alternate, IPv4 first


@pytest.mark.parametrize(("min_ttl", "max_ttl", "fresh_at", "stale_at"), [(60, 300, 59, 61), (1, 10, 9, 11)])
def test_ttl_is_clamped(dns, min_ttl, max_ttl, fresh_at, stale_at):
    """The 30 s TTL is raised to --dns-min-ttl or lowered to --dns-max-ttl."""
    clock = Clock()

    async def go():
        r = resolver(dns, clock, min_ttl=min_ttl, max_ttl=max_ttl)
        await r.lookup("a.test")
        clock.now += fresh_at
        assert (await r.lookup("a.test"))[1] is None  # from the cache
        clock.now += stale_at - fresh_at
        assert (await r.lookup("a.test"))[1] is not None  # asked again

    asyncio.run(go())


def test_concurrent_lookups_share_one_query(dns):
    """Twenty simultaneous lookups of one name send one query."""

    async def go():
        r = resolver(dns, Clock())
        before = count(dns, "a.test")
        results = await asyncio.gather(*(r.lookup("a.test") for _ in range(20)))
        assert count(dns, "a.test") == before + 1
        return results

    assert len({tuple(res[0]) for res in asyncio.run(go())}) == 1


def test_nxdomain_is_cached_and_servfail_is_not(dns):
    """NXDOMAIN is remembered for min_ttl; SERVFAIL is asked again each time; both raise DnsFailure."""

    async def go():
        r = resolver(dns, Clock())
        for _ in range(2):
            with pytest.raises(DnsFailure, match="NXDOMAIN"):
                await r.lookup("missing.test")
            with pytest.raises(DnsFailure, match="SERVFAIL"):
                await r.lookup("bad.test")

    asyncio.run(go())
    assert count(dns, "missing.test") == 1
    assert count(dns, "bad.test") == 2


def test_pin_keeps_only_allowed_addresses(dns):
    """pin() classifies each answer: the private one is refused, the allow_cidrs ones are candidates."""

    async def go():
        r = resolver(dns, Clock())
        loopback = (parse_cidr("127.0.0.0/8"), parse_cidr("::1/128"))
        a = await r.pin(parse_authority("a.test:443"), loopback)
        b = await r.pin(parse_authority("b.test:443"), loopback)
        literal = await r.pin(parse_authority("[::1]:443"), ())
        return a, b, literal

    a, b, literal = asyncio.run(go())
    assert len(a.candidates) == 3 and not a.refused
    assert b.candidates == () and b.refused[0].category == "private"
    assert literal.candidates == () and literal.resolved == (ipaddress.ip_address("::1"),) and literal.dns_ms is None


def test_no_servers_is_a_clear_error():
    """A resolver with no DNS server refuses to be built, saying how to give one."""
    with pytest.raises(ValueError, match="--resolver"):
        Resolver([])
