"""The limits that hold under attack: each a flag with a default, a counter, and its name in the record.

::

    limit (label, record)       flag                           default  past it
    max_connections             --max-connections              4096     503 overloaded at accept
    max_connections_per_client  --max-connections-per-client   256      503 overloaded at accept, that client only
    max_pending_heads           --max-pending-heads            1024     the oldest unfinished head of the client
                                                                        with the most is reset; the new one served
    max_pending_lookups         --max-pending-lookups          1024     a name neither cached nor being looked up:
                                                                        503 (the DNS filter: SERVFAIL) at once
    max_addresses_per_name      --max-addresses-per-name       50       the first 50 answers kept, the rest dropped
    dns_max_qps_per_client      --dns-max-qps-per-client       2000     REFUSED past a burst of 2 s of queries
    dns_max_tcp_connections     --dns-max-tcp-connections      256      the idlest TCP connection of the client
                                                                        with the most is closed; the new one served

A refusal is :class:`LimitExceeded` (reason ``overloaded``, status 503, the
limit's name): its record carries ``limit`` and egressd_limit_hits_total{limit}
counts it, once, when the record is written. A trimmed answer is not a
refusal: the connection's record carries ``limit`` and a note of what was
dropped.

Two limits do not refuse the newcomer but the one holding most: a client that
opens thousands of connections and never finishes a head (slowloris), or
holds TCP connections to the DNS filter, pushes out its own oldest first,
while everyone else's new connection is served (:class:`HeadSlots`,
:func:`heaviest`). Refusing the newcomer instead would let the attacker hold
the limit and starve the others.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sized
from typing import TypeVar

from egressd.errors import ProxyError
from egressd.policy.model import Reason
from egressd.relay import Side

MAX_CONNECTIONS = "max_connections"
MAX_CONNECTIONS_PER_CLIENT = "max_connections_per_client"
MAX_PENDING_HEADS = "max_pending_heads"
MAX_PENDING_LOOKUPS = "max_pending_lookups"
MAX_ADDRESSES_PER_NAME = "max_addresses_per_name"
DNS_MAX_QPS_PER_CLIENT = "dns_max_qps_per_client"
DNS_MAX_TCP_CONNECTIONS = "dns_max_tcp_connections"
LIMITS = (
    MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT, MAX_PENDING_HEADS, MAX_PENDING_LOOKUPS, MAX_ADDRESSES_PER_NAME,
    DNS_MAX_QPS_PER_CLIENT, DNS_MAX_TCP_CONNECTIONS,
)
BURST_SECONDS = 2.0  # the DNS rate limit lets a client send this many seconds' worth of queries at once

_T = TypeVar("_T")
_K = TypeVar("_K", bound=Hashable)


def flag(limit: str) -> str:
    """The command-line flag of a limit: ``max_pending_heads`` -> ``--max-pending-heads``."""
    return "--" + limit.replace("_", "-")


class LimitExceeded(ProxyError):
    """A client over a limit: 503 ``overloaded``; ``limit`` names which (the record's field, the metric's label)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(Reason.OVERLOADED, f"{message}, the {flag(limit)} limit", 503)
        self.limit = limit


def heaviest(groups: Mapping[_K, Sized]) -> _K:
    """The key whose group is largest (the first such key when several tie)."""
    return max(groups, key=lambda key: len(groups[key]))


class HeadSlots:
    """Client connections whose head (request head, ClientHello, first bytes) is still arriving.

    At most ``limit`` at once. A new one past that resets the oldest unfinished
    head of the client with the most, whose reader then raises LimitExceeded
    (see :meth:`reading`), and takes its place.
    """

    __slots__ = ("limit", "_clients", "_evicted", "_count", "_clock")

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clients: dict[str, dict[Side, float]] = {}  # client IP -> its heads in progress, oldest first
        self._evicted: dict[Side, LimitExceeded] = {}
        self._count = 0
        self._clock = clock

    def __len__(self) -> int:
        return self._count

    async def reading(self, side: Side, ip: str, read: Awaitable[_T]) -> _T:
        """Await ``read`` (a head being read from ``side``, a client at ``ip``) holding a slot; raise
        LimitExceeded instead of whatever it ended with when the slot was taken from it."""
        self._begin(side, ip)
        try:
            return await read
        finally:
            evicted = self._end(side, ip)
            if evicted is not None:
                raise evicted  # the eviction is why the read ended, whatever it raised

    def _begin(self, side: Side, ip: str) -> None:
        while self._count >= self.limit:
            self._evict()
        self._clients.setdefault(ip, {})[side] = self._clock()
        self._count += 1

    def _end(self, side: Side, ip: str) -> LimitExceeded | None:
        self._remove(side, ip)
        return self._evicted.pop(side, None)

    def _remove(self, side: Side, ip: str) -> None:
        heads = self._clients.get(ip)
        if heads is not None and heads.pop(side, None) is not None:
            self._count -= 1
            if not heads:
                del self._clients[ip]

    def _evict(self) -> None:
        ip = heaviest(self._clients)
        heads = self._clients[ip]
        from_ip = len(heads)
        side, since = next(iter(heads.items()))
        self._remove(side, ip)
        self._evicted[side] = LimitExceeded(
            MAX_PENDING_HEADS,
            f"the head was still incomplete after {self._clock() - since:.1f}s while {self.limit} heads were "
            f"arriving, {from_ip} of them from {ip}, the client with the most; its oldest was reset",
        )
        side.abort()


class RateLimiter:
    """A token bucket per key: ``rate`` a second, up to ``rate * BURST_SECONDS`` at once.

    Buckets that have filled up again are forgotten (they hold nothing a new
    one would not), swept when the table passes ``max_keys``; past that, the
    oldest go first, so a flood of new source addresses costs memory only up to
    ``max_keys``.
    """

    __slots__ = ("rate", "burst", "max_keys", "_buckets", "_clock")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 65_536) -> None:
        self.rate = rate
        self.burst = rate * BURST_SECONDS
        self.max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, when)
        self._clock = clock

    def allow(self, key: Hashable) -> bool:
        """Take one token of key's bucket; False when it is empty."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._sweep(now)
            tokens = self.burst
        else:
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _sweep(self, now: float) -> None:
        rate, burst = self.rate, self.burst
        for key in [k for k, (tokens, when) in self._buckets.items() if tokens + (now - when) * rate >= burst]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)
