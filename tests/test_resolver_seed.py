"""Resolver.seed: what the DNS filter answered the app fills the resolver's cache, one address family at a time."""

from __future__ import annotations

import asyncio
import ipaddress

import dns.rdatatype
import pytest

from egressd.errors import DnsFailure
from egressd.lab import DnsServer, LabThread, Slow
from egressd.metrics import Metrics
from egressd.resolve import Resolver
from harness import Clock

A, AAAA = dns.rdatatype.A, dns.rdatatype.AAAA




@pytest.fixture(scope="module")
def dns_server():
    with LabThread() as lab:
        yield lab.serve(
            DnsServer(
                {"both.test": ("127.0.0.1", "::1"), "v4.test": ("127.0.0.1",), "slow.test": Slow(0.3, ("127.0.0.9",))},
                ttl=30,
            )
        )


def asked(server, name: str) -> list[str]:
    return [rdtype for qname, rdtype in list(server.queries) if qname == name]


def ips(*texts: str) -> tuple:
    return tuple(ipaddress.ip_address(t) for t in texts)


SEED_CASES = {
    # name: (seeds as (rdtype, addresses), lookup's addresses, types then asked upstream)
    "A and AAAA seeded": ([(A, ("127.0.0.7",)), (AAAA, ("::7",))], ("127.0.0.7", "::7"), []),
    "A seeded, AAAA asked": ([(A, ("127.0.0.7",))], ("127.0.0.7", "::1"), ["AAAA"]),
    "AAAA seeded, A asked": ([(AAAA, ("::7",))], ("127.0.0.1", "::7"), ["A"]),
    "empty AAAA seeded": ([(A, ("127.0.0.7",)), (AAAA, ())], ("127.0.0.7",), []),
    "reseeded": ([(A, ("127.0.0.7",)), (A, ("127.0.0.8",)), (AAAA, ())], ("127.0.0.8",), []),
    "wrong family ignored": ([(A, ("127.0.0.7", "::9")), (AAAA, ("127.0.0.9",))], ("127.0.0.7",), []),
}


@pytest.mark.parametrize("case", list(SEED_CASES))
def test_lookup_after_seeds(dns_server, case: str) -> None:
    """A lookup uses each seeded family as seeded and asks upstream only for the families not seeded."""
    seeds, expected, then_asked = SEED_CASES[case]
    before = len(dns_server.queries)

    async def go():
        r = Resolver([dns_server.address], timeout=1.0, metrics=Metrics(), clock=Clock())
        for rdtype, addresses in seeds:
            r.seed("both.test", rdtype, addresses, 30)
        return await r.lookup("both.test")

    addresses, _ = asyncio.run(go())
    assert addresses == ips(*expected)
    assert [t for q, t in dns_server.queries[before:] if q == "both.test"] == then_asked


def test_fully_seeded_lookup_is_a_cache_hit(dns_server) -> None:
    """With both families seeded the lookup is answered from the cache (dns_ms None) and counted as a hit."""
    metrics = Metrics()

    async def go():
        r = Resolver([dns_server.address], timeout=1.0, metrics=metrics, clock=Clock())
        r.seed("v4.test", A, ["127.0.0.1"], 30)
        r.seed("v4.test", AAAA, [], 30)
        return await r.lookup("v4.test")

    assert asyncio.run(go()) == (ips("127.0.0.1"), None)
    assert metrics.dns_cache == {"hit": 1}


@pytest.mark.parametrize(("ttl", "fresh_at", "stale_at"), [(1, 4.9, 5.1), (30, 29, 31), (9999, 299, 301)])
def test_seed_ttl_is_clamped_like_lookups(dns_server, ttl: float, fresh_at: float, stale_at: float) -> None:
    """A seed lasts its TTL raised to min_ttl (5 s) or lowered to max_ttl (300 s); then the name is asked again."""
    clock = Clock()

    async def go():
        r = Resolver([dns_server.address], timeout=1.0, metrics=Metrics(), clock=clock)
        r.seed("v4.test", A, ["127.0.0.7"], ttl)
        r.seed("v4.test", AAAA, [], ttl)
        clock.now += fresh_at
        fresh = await r.lookup("v4.test")
        clock.now += stale_at - fresh_at
        stale = await r.lookup("v4.test")
        return fresh, stale

    (fresh, fresh_ms), (stale, stale_ms) = asyncio.run(go())
    assert (fresh, fresh_ms) == (ips("127.0.0.7"), None)
    assert stale == ips("127.0.0.1") and stale_ms is not None


def test_seed_during_a_lookup_wins(dns_server) -> None:
    """A seed that lands while a lookup of the same name is out is what that lookup, and the next, return."""

    async def go():
        r = Resolver([dns_server.address], timeout=2.0, metrics=Metrics(), clock=Clock())
        lookup = asyncio.ensure_future(r.lookup("slow.test"))
        await asyncio.sleep(0.05)  # the query is out (the server answers after 0.3 s)
        r.seed("slow.test", A, ["127.0.0.7"], 30)
        first = await lookup
        return first, await r.lookup("slow.test")

    (first, _), (second, second_ms) = asyncio.run(go())
    assert first == second == ips("127.0.0.7") and second_ms is None


def test_seed_clears_a_cached_nxdomain_of_the_other_family() -> None:
    """A name cached as NXDOMAIN that is then seeded with A no longer fails: its AAAA is asked again."""
    with LabThread() as lab:
        server = lab.serve(DnsServer({}, ttl=30))

        async def go():
            r = Resolver([server.address], timeout=1.0, metrics=Metrics(), clock=Clock())
            with pytest.raises(DnsFailure, match="NXDOMAIN"):
                await r.lookup("new.test")
            server.zone["new.test"] = ("127.0.0.1", "::1")
            r.seed("new.test", A, ["127.0.0.7"], 30)
            return await r.lookup("new.test")

        addresses, _ = asyncio.run(go())
        assert addresses == ips("127.0.0.7", "::1") and asked(server, "new.test") == ["A", "AAAA", "AAAA"]


def test_only_address_types_seed() -> None:
    """Seeding any type but A or AAAA is a programming error, said plainly."""
    r = Resolver([("127.0.0.1", 53)], metrics=Metrics())
    with pytest.raises(ValueError, match="only A and AAAA answers seed the resolver, not HTTPS"):
        r.seed("a.test", dns.rdatatype.HTTPS, [], 30)
