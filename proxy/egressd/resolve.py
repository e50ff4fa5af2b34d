"""Resolve a name ourselves, classify every answer, and pin the addresses we will dial.

The client's idea of an address never matters: a name the policy allowed is
looked up here (A and AAAA in parallel, dnspython's async resolver against the
configured servers), every answer is classified by :mod:`egressd.addresses`, and
the connection dials only the allowed answers, by IP. The socket layer never
resolves anything again, so the address checked is the address dialled.

Answers are cached per name for their TTL, clamped to [min_ttl, max_ttl];
concurrent lookups of one name share one query. Timeouts, SERVFAIL, NXDOMAIN and
empty answers become :class:`~egressd.errors.DnsFailure` (502, ``dns_failure``)
and are not cached, except NXDOMAIN, which is cached for min_ttl.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from egressd.addresses import AddressCheck, check
from egressd.errors import DnsFailure
from egressd.hostport import Destination, IPAddress
from egressd.metrics import Metrics
from egressd.policy.model import IPNetwork

MAX_CACHE_ENTRIES = 10_000

# The same few answers are classified again and again: remember the verdicts.
_check = functools.lru_cache(maxsize=8192)(check)


@dataclass(frozen=True, slots=True)
class Pinned:
    """The addresses a connection may dial, in the order to try them, and what was refused."""

    resolved: tuple[IPAddress, ...]
    candidates: tuple[IPAddress, ...]
    refused: tuple[AddressCheck, ...]
    dns_ms: float | None


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    addresses: tuple[IPAddress, ...]
    error: str | None = None


class Resolver:
    """Looks names up against fixed upstream servers, with a TTL-clamped cache."""

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        timeout: float = 2.0,
        min_ttl: float = 5.0,
        max_ttl: float = 300.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not servers:
            raise ValueError("no DNS servers: pass --resolver IP[:PORT] or list nameservers in /etc/resolv.conf")
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}

    async def lookup(self, name: str) -> tuple[tuple[IPAddress, ...], float | None]:
        """Return (addresses, milliseconds waited for DNS, None when answered from the cache) or raise DnsFailure."""
        entry = self._cache.get(name)
        now = self._clock()
        if entry is not None and entry.expires > now:
            self._metrics.dns_cache["hit"] += 1
            return self._answer(name, entry), None
        self._metrics.dns_cache["miss"] += 1
        started = time.perf_counter()
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name, started))
            self._inflight[name] = task
            task.add_done_callback(functools.partial(self._finished, name))
        entry = await asyncio.shield(task)
        return self._answer(name, entry), (time.perf_counter() - started) * 1000

    def _finished(self, name: str, task: asyncio.Task[_Entry]) -> None:
        self._inflight.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved here: waiters that went away must not leave it "never retrieved"

    def close(self) -> None:
        """Cancel lookups still in flight (on shutdown)."""
        for task in list(self._inflight.values()):
            task.cancel()

    @staticmethod
    def _answer(name: str, entry: _Entry) -> tuple[IPAddress, ...]:
        if entry.error is not None:
            raise DnsFailure(f"{name}: {entry.error}")
        return entry.addresses

    async def _query(self, name: str, started: float) -> _Entry:
        """One lookup on its own task, so a client that goes away does not cancel it for the others waiting."""
        try:
            return await self._query_records(name)
        finally:
            self._metrics.dns_seconds.observe(time.perf_counter() - started)

    async def _query_records(self, name: str) -> _Entry:
        qname = name + "."
        results = await asyncio.gather(
            self._resolver.resolve(qname, "A", raise_on_no_answer=False, search=False),
            self._resolver.resolve(qname, "AAAA", raise_on_no_answer=False, search=False),
            return_exceptions=True,
        )
        addresses: list[IPAddress] = []
        ttls: list[float] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, dns.resolver.NXDOMAIN):
                entry = _Entry(self._clock() + self._min_ttl, (), "the name does not exist (NXDOMAIN)")
                self._store(name, entry)
                return entry
            if isinstance(result, BaseException):
                if not isinstance(result, dns.exception.DNSException):
                    raise result
                errors.append(result)
                continue
            if result.rrset is not None:
                ttls.append(result.rrset.ttl)
                addresses.extend(ipaddress.ip_address(r.address) for r in result.rrset)
        if not addresses:
            raise DnsFailure(f"{name}: {_describe(errors) if errors else 'no A or AAAA records'}")
        ttl = min(max(min(ttls), self._min_ttl), self._max_ttl)
        entry = _Entry(self._clock() + ttl, tuple(_interleave(addresses)))
        self._store(name, entry)
        return entry

    def _store(self, name: str, entry: _Entry) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[name] = entry

    async def pin(self, dest: Destination, allow_cidrs: tuple[IPNetwork, ...]) -> Pinned:
        """Resolve (unless dest is an IP literal) and classify every answer; candidates may come out empty."""
        if dest.ip is not None:
            resolved, dns_ms = (dest.ip,), None
        else:
            resolved, dns_ms = await self.lookup(dest.host)
        checks = [_check(ip, allow_cidrs) for ip in resolved]
        candidates = tuple(c.ip for c in checks if c.allowed)
        refused = tuple(c for c in checks if not c.allowed)
        return Pinned(resolved, candidates, refused, dns_ms)


def _interleave(addresses: list[IPAddress]) -> list[IPAddress]:
    """IPv4 and IPv6 answers alternately, IPv4 first, each family in answer order."""
    v4 = [a for a in addresses if a.version == 4]
    v6 = [a for a in addresses if a.version == 6]
    out: list[IPAddress] = []
    for i in range(max(len(v4), len(v6))):
        out.extend(family[i] for family in (v4, v6) if i < len(family))
    return out


def _describe(errors: list[BaseException]) -> str:
    for exc in errors:
        if isinstance(exc, dns.exception.Timeout):
            return "DNS lookup timed out; check --resolver and that the DNS server answers"
    for exc in errors:
        if isinstance(exc, dns.resolver.NoNameservers):
            return "the DNS servers answered SERVFAIL or refused"
    return f"DNS lookup failed: {errors[0]}"
