"""Resolve a name ourselves, classify every answer, and pin the addresses we will dial.

The client's idea of an address never matters: a name the policy allowed is
looked up here (A and AAAA in parallel, dnspython's async resolver against the
configured servers), every answer is classified by :mod:`egressd.addresses`, and
the connection dials only the allowed answers, by IP. The socket layer never
resolves anything again, so the address checked is the address dialled.

Answers are cached per name and address family (A, AAAA) for their TTL,
clamped to [min_ttl, max_ttl]; concurrent lookups of one name share one query.
Timeouts, SERVFAIL, NXDOMAIN and empty answers become
:class:`~egressd.errors.DnsFailure` (502, ``dns_failure``) and are not cached,
except NXDOMAIN, which is cached for min_ttl.

:meth:`Resolver.seed` is how the sidecar's DNS filter tells the cache what it
answered the app, so that the connection which follows dials an address the app
was told (round-robin names answer differently from one query to the next).
The app asks A and AAAA in separate queries, often only one of them, so a seed
fills one family and leaves the other as it was: still cached, or unknown. A
lookup uses the cached families and queries only the missing ones; it never
takes a family's absence from the other's seed (no family disappears) and never
fills a family that was neither seeded nor answered (none is invented). A seed
replaces its family's entry, with the seed's TTL under the same clamp; a lookup
in flight when a seed lands keeps the seed.

Limits (:mod:`egressd.limits`): at most ``max_pending`` names are looked up at
once; a lookup of one more name (neither cached nor in flight) raises
LimitExceeded at once, while lookups that join one in flight or hit the cache
go on. A name keeps at most ``max_addresses`` addresses: the first of its
answers, IPv4 and IPv6 alternately (a seed keeps the first of its family); the
rest are never dialled, and every connection to the name is told how many were
dropped (:attr:`Pinned.dropped`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from egressd.addresses import AddressCheck, check
from egressd.errors import DnsFailure
from egressd.hostport import Destination, IPAddress
from egressd.limits import MAX_PENDING_LOOKUPS, LimitExceeded
from egressd.metrics import Metrics
from egressd.policy.model import IPNetwork

MAX_CACHE_ENTRIES = 20_000  # (name, family) entries: two per name

_FAMILIES = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}
_RDTYPES = {4: "A", 6: "AAAA"}

# The same few answers are classified again and again: remember the verdicts.
_check = functools.lru_cache(maxsize=8192)(check)


@dataclass(frozen=True, slots=True)
class Pinned:
    """The addresses a connection may dial, in the order to try them, and what was refused."""

    resolved: tuple[IPAddress, ...]
    candidates: tuple[IPAddress, ...]
    refused: tuple[AddressCheck, ...]
    dns_ms: float | None
    dropped: int = 0  # answers past --max-addresses-per-name, never dialled


@dataclass(frozen=True, slots=True)
class _Entry:
    """One family of one name: its addresses (maybe none) until ``expires``, or the error that the name had."""

    expires: float
    addresses: tuple[IPAddress, ...]
    error: str | None = None
    dropped: int = 0  # addresses of the answer past the limit, not kept


_Pair = tuple[_Entry, _Entry]  # (A, AAAA)


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
        max_pending: int = 1024,
        max_addresses: int = 50,
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
        self._cache: dict[tuple[str, int], _Entry] = {}  # (name, 4 or 6) -> entry
        self._inflight: dict[str, asyncio.Task[_Pair]] = {}
        self.max_pending = max_pending
        self.max_addresses = max_addresses

    async def lookup(self, name: str) -> tuple[tuple[IPAddress, ...], float | None]:
        """Return (addresses, milliseconds waited for DNS, None when answered from the cache) or raise DnsFailure
        (or LimitExceeded past ``max_pending``)."""
        addresses, dns_ms, _ = await self._lookup(name)
        return addresses, dns_ms

    async def _lookup(self, name: str) -> tuple[tuple[IPAddress, ...], float | None, int]:
        """:meth:`lookup`, and how many addresses past the limit were dropped."""
        now = self._clock()
        v4 = self._fresh(name, 4, now)
        v6 = self._fresh(name, 6, now)
        if v4 is not None and v6 is not None:
            self._metrics.dns_cache["hit"] += 1
            return self._answer(name, v4, v6), None, v4.dropped + v6.dropped
        self._metrics.dns_cache["miss"] += 1
        started = time.perf_counter()
        task = self._inflight.get(name)
        if task is None:
            if len(self._inflight) >= self.max_pending:
                raise LimitExceeded(MAX_PENDING_LOOKUPS, f"{len(self._inflight)} names are being looked up")
            task = asyncio.get_running_loop().create_task(self._query(name, started))
            self._inflight[name] = task
            task.add_done_callback(functools.partial(self._finished, name))
        v4, v6 = await asyncio.shield(task)
        return self._answer(name, v4, v6), (time.perf_counter() - started) * 1000, v4.dropped + v6.dropped

    def seed(self, name: str, rdtype: int, addresses: Iterable[IPAddress | str], ttl: float) -> None:
        """Cache what the DNS filter answered for one type of ``name`` (canonical), for ``ttl`` under the clamp.

        ``rdtype`` is ``dns.rdatatype.A`` or ``AAAA``; ``addresses`` may be
        empty (the name has none of that family). Only this family's entry
        changes (addresses of the other family are ignored), except that a
        cached NXDOMAIN of the other family is dropped: the name exists now.
        """
        family = _FAMILIES.get(rdtype)  # type: ignore[call-overload]
        if family is None:
            raise ValueError(f"only A and AAAA answers seed the resolver, not {dns.rdatatype.to_text(rdtype)}")
        ips = tuple(a if not isinstance(a, str) else ipaddress.ip_address(a) for a in addresses)
        ttl = min(max(ttl, self._min_ttl), self._max_ttl)
        other = self._cache.get((name, 10 - family))
        if other is not None and other.error is not None:
            del self._cache[(name, 10 - family)]
        kept = tuple(ip for ip in ips if ip.version == family)
        limit = self.max_addresses
        self._store((name, family), _Entry(self._clock() + ttl, kept[:limit], dropped=max(len(kept) - limit, 0)))

    def _fresh(self, name: str, family: int, now: float) -> _Entry | None:
        entry = self._cache.get((name, family))
        return entry if entry is not None and entry.expires > now else None

    def _finished(self, name: str, task: asyncio.Task[_Pair]) -> None:
        self._inflight.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved here: waiters that went away must not leave it "never retrieved"

    def close(self) -> None:
        """Cancel lookups still in flight (on shutdown)."""
        for task in list(self._inflight.values()):
            task.cancel()

    @staticmethod
    def _answer(name: str, v4: _Entry, v6: _Entry) -> tuple[IPAddress, ...]:
        error = v4.error or v6.error
        if error is not None:
            raise DnsFailure(f"{name}: {error}")
        if not v6.addresses:
            if not v4.addresses:
                raise DnsFailure(f"{name}: no A or AAAA records")
            return v4.addresses
        return tuple(_interleave([*v4.addresses, *v6.addresses])) if v4.addresses else v6.addresses

    async def _query(self, name: str, started: float) -> _Pair:
        """One lookup on its own task, so a client that goes away does not cancel it for the others waiting."""
        try:
            return await self._query_records(name)
        finally:
            self._metrics.dns_seconds.observe(time.perf_counter() - started)

    async def _query_records(self, name: str) -> _Pair:
        """Query the families not cached now; store what was learnt unless a seed landed meanwhile."""
        qname = name + "."
        now = self._clock()
        known = {family: self._fresh(name, family, now) for family in (4, 6)}
        missing = [family for family, entry in known.items() if entry is None]
        results = await asyncio.gather(
            *(self._resolver.resolve(qname, _RDTYPES[f], raise_on_no_answer=False, search=False) for f in missing),
            return_exceptions=True,
        )
        found: dict[int, list[IPAddress]] = {}
        ttls: list[float] = []
        errors: list[BaseException] = []
        for family, result in zip(missing, results, strict=True):
            if isinstance(result, dns.resolver.NXDOMAIN):
                entry = _Entry(self._clock() + self._min_ttl, (), "the name does not exist (NXDOMAIN)")
                return self._keep(name, {f: entry for f in missing}, known)
            if isinstance(result, BaseException):
                if not isinstance(result, dns.exception.DNSException):
                    raise result
                errors.append(result)
                continue
            found[family] = []
            if result.rrset is not None:
                ttls.append(result.rrset.ttl)
                found[family].extend(ipaddress.ip_address(r.address) for r in result.rrset)
        if not any(found.values()) and not any(e is not None and e.addresses for e in known.values()):
            raise DnsFailure(f"{name}: {_describe(errors) if errors else 'no A or AAAA records'}")
        expires = self._clock() + min(max(min(ttls, default=self._min_ttl), self._min_ttl), self._max_ttl)
        kept = self._trim(found, known)
        return self._keep(name, {f: _Entry(expires, kept[f][0], dropped=kept[f][1]) for f in missing}, known)

    def _trim(self, found: dict[int, list[IPAddress]], known: dict[int, _Entry | None]) -> dict[int, tuple]:
        """Per family (addresses kept, how many dropped): the first ``max_addresses`` of the name's answers, IPv4
        and IPv6 alternately (:func:`_interleave`); a family still cached counts with what it keeps."""
        room = self.max_addresses - sum(len(e.addresses) for e in known.values() if e is not None)
        kept = set(_interleave([*found.get(4, ()), *found.get(6, ())])[:max(room, 0)])
        out = {}
        for family in (4, 6):
            answers = found.get(family, ())
            ips = tuple(ip for ip in answers if ip in kept)
            out[family] = (ips, len(answers) - len(ips))
        return out

    def _keep(self, name: str, learnt: dict[int, _Entry], known: dict[int, _Entry | None]) -> _Pair:
        """Store the learnt entries, except where a seed arrived while the query was out; return (A, AAAA)."""
        now = self._clock()
        pair = []
        for family in (4, 6):
            entry = known[family]
            if entry is None:
                entry = self._fresh(name, family, now) or learnt[family]
                if entry is learnt[family]:
                    self._store((name, family), entry)
            pair.append(entry)
        return pair[0], pair[1]

    def _store(self, key: tuple[str, int], entry: _Entry) -> None:
        if key not in self._cache and len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = entry

    async def pin(self, dest: Destination, allow_cidrs: tuple[IPNetwork, ...]) -> Pinned:
        """Resolve (unless dest is an IP literal) and classify every answer; candidates may come out empty."""
        if dest.ip is not None:
            resolved, dns_ms, dropped = (dest.ip,), None, 0
        else:
            resolved, dns_ms, dropped = await self._lookup(dest.host)
        checks = [_check(ip, allow_cidrs) for ip in resolved]
        candidates = tuple(c.ip for c in checks if c.allowed)
        refused = tuple(c for c in checks if not c.allowed)
        return Pinned(resolved, candidates, refused, dns_ms, dropped)


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
