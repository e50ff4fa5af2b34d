"""Every metric egressd exports, declared in this one module.

The hot path only adds to plain ints in dicts keyed by label tuples (no locks,
no prometheus-client objects per connection); :class:`Collector` turns them into
metric families when Prometheus scrapes. Label values come only from closed
sets: the service name (from the identity step, not the client's bytes), the
listener name, the decision and the reason enums; and ``egressd_policy_info``'s
version, one value at a time. Never a raw host.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

PREFIX = "egressd_"

# name, help, label names
CONNECTIONS = (
    "connections_total", "Connections (and forwarded HTTP requests) by outcome.",
    ("service", "listener", "decision", "reason"),
)
DENIALS = ("denials_total", "Denied connections by reason.", ("service", "reason"))
ACTIVE = ("active_connections", "Client connections open now.", ("service",))
BYTES = ("bytes_total", "Bytes relayed, up (client to upstream) and down.", ("service", "direction"))
DNS_SECONDS = ("dns_lookup_seconds", "Time to resolve a name (cache misses only).", ())
CONNECT_SECONDS = ("upstream_connect_seconds", "Time to open the upstream TCP connection.", ())
RELOADS = ("policy_reloads_total", "Policy loads by result.", ("result",))
LOADED_AT = ("policy_loaded_timestamp_seconds", "Unix time the policy in force was loaded.", ())
# One series at a time: the version label is the hash of the allowlist files in force (Policy.version).
POLICY_INFO = ("policy_info", "The version of the policy in force, as its label; always 1.", ("version",))
RELOAD_OK = (
    "policy_last_reload_success",
    "1 when the last load of the allowlists succeeded; 0 when it failed (the last good policy stays in force) "
    "or before any load.", (),
)
DNS_QUERIES = ("dns_queries_total", "Queries to the DNS filter by outcome.", ("service", "decision", "reason"))
DNS_UPSTREAM_SECONDS = ("dns_upstream_seconds", "Time the DNS filter waited for its upstream resolvers.", ())
IDENTITY = ("identity_total", "Identify steps by source and result.", ("source", "result"))
JWKS_REFRESH = ("jwks_refresh_total", "Loads of the JWKS that verifies tokens, by result.", ("result",))
DNS_CACHE = ("dns_cache_lookups_total", "Resolver cache lookups by result.", ("result",))
# limit: the flag that set it, without dashes (egressd.limits.LIMITS): max_connections, max_pending_heads, ...
LIMIT_HITS = (
    "limit_hits_total", "Times a limit refused a client, dropped addresses or closed a connection.", ("limit",)
)
INSPECTED = (
    "inspected_requests_total", "Requests decided inside inspected TLS tunnels, by outcome.",
    ("service", "decision", "reason"),
)
AUDIT_ERRORS = ("audit_write_errors_total", "Failed writes of audit records (every retry counts).", ())
AUDIT_PENDING = ("audit_pending_records", "Audit records emitted and not written yet.", ())
AUDIT_AVAILABLE = (
    "audit_available", "1 while audit records can be written; 0 while they cannot and new connections are refused.", ()
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Bucket counts kept as a plain list; cumulated at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Metrics:
    """The process's counters. Each method is a dict add on the event loop thread."""

    def __init__(self) -> None:
        self.connections: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        self.denials: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.active: defaultdict[str, int] = defaultdict(int)
        self.bytes: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.dns_seconds = Histogram()
        self.connect_seconds = Histogram()
        self.dns_upstream_seconds = Histogram()
        self.dns_queries: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.identity: defaultdict[tuple[str, str], int] = defaultdict(int)  # (source, result)
        self.jwks_refresh: defaultdict[str, int] = defaultdict(int)  # result: success, error
        self.reloads: defaultdict[str, int] = defaultdict(int, success=0, error=0)
        self.dns_cache: defaultdict[str, int] = defaultdict(int)
        self.limit_hits: defaultdict[str, int] = defaultdict(int)  # limit name -> times it acted
        self.inspected: defaultdict[tuple[str, str, str], int] = defaultdict(int)  # (service, decision, reason)
        self.loaded_at = 0.0
        self.version: str | None = None  # of the policy in force
        self.last_reload_ok = 0
        # (failed writes, records waiting, available 0/1): read from the audit log at scrape time when
        # audit_source is set (see egressd.app), else the sum over the workers (available: all of them)
        self.audit_source: Callable[[], tuple[int, int, int]] | None = None
        self.audit_summed = (0, 0, 1)

    def audit(self) -> tuple[int, int, int]:
        return self.audit_source() if self.audit_source is not None else self.audit_summed

    def connection_done(self, service: str, listener: str, decision: str, reason: str, up: int, down: int) -> None:
        self.connections[(service, listener, decision, reason)] += 1
        if decision == "deny":
            self.denials[(service, reason)] += 1
        if up:
            self.bytes[(service, "up")] += up
        if down:
            self.bytes[(service, "down")] += down

    _SUMMED = (
        "connections", "denials", "active", "bytes", "dns_cache", "dns_queries", "identity", "jwks_refresh",
        "limit_hits", "inspected",
    )
    _HISTOGRAMS = ("dns_seconds", "connect_seconds", "dns_upstream_seconds")

    def snapshot(self) -> dict:
        """Plain data of every counter (and of the audit log's state), for a worker to send to its supervisor."""
        data: dict = {name: dict(getattr(self, name)) for name in self._SUMMED}
        data["reloads"] = dict(self.reloads)
        data["loaded_at"] = self.loaded_at
        data["version"] = self.version
        data["last_reload_ok"] = self.last_reload_ok
        data["audit"] = self.audit()
        for name in self._HISTOGRAMS:
            hist = getattr(self, name)
            data[name] = (list(hist.counts), hist.total)
        return data

    def load_sum(self, snapshots: list[dict]) -> None:
        """Replace every value by the sum over the workers' snapshots (reloads and load time: the maximum,
        since every worker loads the same files; the version: the most recently loaded worker's; the last
        reload's success: the minimum, so that one worker that failed shows 0)."""
        for name in self._SUMMED:
            merged: defaultdict = defaultdict(int)
            for snap in snapshots:
                for key, value in snap[name].items():
                    merged[key] += value
            setattr(self, name, merged)
        self.reloads = defaultdict(int, success=0, error=0)
        for snap in snapshots:
            for key, value in snap["reloads"].items():
                self.reloads[key] = max(self.reloads[key], value)
        self.loaded_at = max((snap["loaded_at"] for snap in snapshots), default=0.0)
        newest = max(snapshots, key=lambda snap: snap["loaded_at"], default=None)
        self.version = newest["version"] if newest is not None else None
        self.last_reload_ok = min((snap["last_reload_ok"] for snap in snapshots), default=0)
        audits = [snap["audit"] for snap in snapshots]
        errors, pending = sum(a[0] for a in audits), sum(a[1] for a in audits)
        self.audit_summed = (errors, pending, min((a[2] for a in audits), default=1))
        for name in self._HISTOGRAMS:
            hist = Histogram()
            for snap in snapshots:
                counts, total = snap[name]
                hist.counts = [a + b for a, b in zip(hist.counts, counts, strict=True)]
                hist.total += total
            setattr(self, name, hist)

    def policy_loaded(self, ok: bool, version: str | None = None) -> None:
        """Count a load of the allowlists; a successful one puts its ``version`` in force, a failed one (no
        version) keeps the version in force."""
        self.reloads["success" if ok else "error"] += 1
        self.last_reload_ok = int(ok)
        if ok:
            self.loaded_at = time.time()
            self.version = version


class Collector:
    """Exposes a Metrics object in the Prometheus data model."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield _counter(CONNECTIONS, m.connections)
        yield _counter(DENIALS, m.denials)
        gauge = GaugeMetricFamily(PREFIX + ACTIVE[0], ACTIVE[1], labels=ACTIVE[2])
        for service, value in list(m.active.items()):
            gauge.add_metric((service,), value)
        yield gauge
        yield _counter(BYTES, m.bytes)
        for (name, help_text, _), hist in (
            (DNS_SECONDS, m.dns_seconds), (CONNECT_SECONDS, m.connect_seconds),
            (DNS_UPSTREAM_SECONDS, m.dns_upstream_seconds),
        ):
            yield HistogramMetricFamily(PREFIX + name, help_text, buckets=hist.buckets(), sum_value=hist.total)
        yield _counter(RELOADS, {(k,): v for k, v in m.reloads.items()})
        yield _counter(DNS_CACHE, {(k,): v for k, v in m.dns_cache.items()})
        yield _counter(DNS_QUERIES, m.dns_queries)
        yield _counter(IDENTITY, m.identity)
        yield _counter(JWKS_REFRESH, {(k,): v for k, v in m.jwks_refresh.items()})
        yield _counter(LIMIT_HITS, {(k,): v for k, v in m.limit_hits.items()})
        yield _counter(INSPECTED, m.inspected)
        yield GaugeMetricFamily(PREFIX + LOADED_AT[0], LOADED_AT[1], value=m.loaded_at)
        info = GaugeMetricFamily(PREFIX + POLICY_INFO[0], POLICY_INFO[1], labels=POLICY_INFO[2])
        if m.version is not None:
            info.add_metric((m.version,), 1)
        yield info
        yield GaugeMetricFamily(PREFIX + RELOAD_OK[0], RELOAD_OK[1], value=m.last_reload_ok)
        errors, pending, available = m.audit()
        yield CounterMetricFamily(PREFIX + AUDIT_ERRORS[0].removesuffix("_total"), AUDIT_ERRORS[1], value=errors)
        yield GaugeMetricFamily(PREFIX + AUDIT_PENDING[0], AUDIT_PENDING[1], value=pending)
        yield GaugeMetricFamily(PREFIX + AUDIT_AVAILABLE[0], AUDIT_AVAILABLE[1], value=available)


def _counter(spec: tuple[str, str, tuple[str, ...]], values: dict) -> CounterMetricFamily:
    name, help_text, labels = spec
    family = CounterMetricFamily(PREFIX + name.removesuffix("_total"), help_text, labels=labels)
    for key, value in list(values.items()):
        family.add_metric(key, value)
    return family


def registry_for(metrics: Metrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(metrics))
    registry.register(ProcessCollector(namespace="egressd", registry=None))
    return registry


# -- the allowlist sync (egressd allowlist-sync, its own process: its own registry) ------------------

SYNC_ACTIONS = (
    "allowlist_sync_actions_total", "Writes of the allowlist sync to the copies, by action and result.",
    ("action", "result"),
)
SYNC_ACTION_NAMES = ("create", "update", "delete")
SYNC_RESULTS = ("success", "conflict", "not_found", "error")  # conflict: 409; not_found: 404 (a delete: done)
SYNC_COPIES = ("allowlist_copies", "Copies of the allowlist ConfigMap the sync manages, after its last reconcile.", ())
SYNC_ERRORS = (
    "allowlist_sync_errors_total",
    "Problems the allowlist sync met, by reason (each reconcile that meets one counts it).", ("reason",),
)
# list, watch: a request to the API server failed; write: a create, update or delete failed (not a conflict);
# unmanaged: a ConfigMap of the copies' name without the owner label; other_source: a copy of another source;
# source_missing: the source ConfigMap does not exist
SYNC_ERROR_REASONS = ("list", "watch", "write", "unmanaged", "other_source", "source_missing")
SYNC_LAST_SUCCESS = (
    "allowlist_sync_last_success_timestamp_seconds",
    "Unix time the last reconcile completed with every copy right (0: never).", (),
)


class SyncMetrics:
    """The allowlist sync's counters, on its event loop thread."""

    def __init__(self) -> None:
        self.actions: defaultdict[tuple[str, str], int] = defaultdict(  # (action, result), every pair from 0
            int, {(action, result): 0 for action in SYNC_ACTION_NAMES for result in SYNC_RESULTS})
        self.errors: defaultdict[str, int] = defaultdict(int, dict.fromkeys(SYNC_ERROR_REASONS, 0))
        self.copies = 0
        self.last_success = 0.0


class SyncCollector:
    """Exposes a SyncMetrics object in the Prometheus data model."""

    def __init__(self, metrics: SyncMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield _counter(SYNC_ACTIONS, m.actions)
        yield _counter(SYNC_ERRORS, {(k,): v for k, v in m.errors.items()})
        yield GaugeMetricFamily(PREFIX + SYNC_COPIES[0], SYNC_COPIES[1], value=m.copies)
        yield GaugeMetricFamily(PREFIX + SYNC_LAST_SUCCESS[0], SYNC_LAST_SUCCESS[1], value=m.last_success)


def sync_registry_for(metrics: SyncMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SyncCollector(metrics))
    registry.register(ProcessCollector(namespace="egressd", registry=None))
    return registry
