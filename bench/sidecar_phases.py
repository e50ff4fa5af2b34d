"""The sidecar benchmark's measurements: one function per figure, and the records check after each system.

Every load generator runs in the pod namespace, pinned to the client core,
as the app's UID (or as root for the direct baseline, which the pod's rules
let through untouched), and is sampled at its ``measure_start`` /
``measure_end`` lines by :func:`bench.phases._run_load`, exactly as the
main benchmark samples its own.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import scenario
from bench.phases import Bench, _run_load
from bench.procs import BenchError
from bench.proxies import Started, lines_of
from bench.records import SETTLE_TIMEOUT, log_problems
from bench.sidecar_world import APP_UID, KUBE_DNS, ORIGIN, PROXY_UID, World

MODES = ("direct", "explicit", "transparent")


@dataclass(frozen=True)
class Params:
    warmup: float  # seconds of load before the measured window
    duration: float  # the measured window (tunnels/s and DNS)
    latency_duration: float  # one sequential client
    concurrency: int = 16  # tunnels in flight; DNS queries outstanding
    dns_rate: float = 5000.0  # queries/s offered in the paced DNS phases

    @classmethod
    def full(cls) -> Params:
        return cls(0.5, 5.0, 3.0)

    @classmethod
    def quick(cls) -> Params:
        return cls(0.2, 1.0, 0.5)


def tunnels(bench: Bench, world: World, started: Started, mode: str, concurrency: int, p: Params,
            duration: float, tag: str) -> dict[str, Any]:
    """loadc tunnels: connect, (CONNECT and its 200,) the ClientHello for TLS_NAME, its echo, close.

    ``direct``: as root, straight to the origin (the rules leave the proxy UID alone); ``explicit``: as the
    app, CONNECT through 127.0.0.1:13128; ``transparent``: as the app, straight to the origin's address,
    which the pod's rules redirect to egressd's transparent listener.
    """
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r}")
    route = (["--proxy", f"127.0.0.1:{scenario.EGRESSD_PORT}"] if mode == "explicit"
             else ["--proxy", "direct", "--origin-host", ORIGIN])
    assert bench.loadc is not None
    cmd = world.in_pod([
        str(bench.loadc), "tunnels", *route, "--target", f"{scenario.TLS_NAME}:{scenario.ECHO_TLS_PORT}",
        "--hello", str(bench.hello), "--concurrency", str(concurrency), "--warmup", str(p.warmup),
        "--duration", str(duration), "--timeout", "10",
    ], PROXY_UID if mode == "direct" else APP_UID)
    result, use = _run_load(bench, started, cmd, f"{tag}-{mode}", p.warmup + duration + 10)
    if not result.get("completed"):
        raise BenchError(f"no tunnel completed: errors {result.get('errors')}")
    out = {**result, **use}
    if started.proc is not None:
        out["cpu_us_per_tunnel"] = 1e6 * use["proxy_cpu_s"] / result["completed"]
    return out


def dns(bench: Bench, world: World, started: Started, dnsload: Path, name: str, expect: str, p: Params,
        tag: str, *, rate: float | None = None, duration: float | None = None) -> dict[str, Any]:
    """dnsload as the app, asking the cluster DNS address (redirected to the filter's port by the pod's rules):
    ``p.concurrency`` queries outstanding, or ``rate`` queries/s offered."""
    load = ["--rate", f"{rate:g}"] if rate else ["--outstanding", str(p.concurrency)]
    duration = p.duration if duration is None else duration
    cmd = world.in_pod([
        str(dnsload), "--server", KUBE_DNS, "--port", "53", "--name", name, "--expect", expect, *load,
        "--warmup", str(p.warmup), "--duration", str(duration), "--timeout", "1",
    ], APP_UID)
    result, use = _run_load(bench, started, cmd, tag, p.warmup + duration + 5)
    if not result.get("completed"):
        raise BenchError(f"no query answered as expected ({expect}): rcodes {result.get('rcodes')}, "
                         f"lost {result.get('lost')}")
    if result.get("wrong", 0) > 0.001 * result.get("sent", 0):
        raise BenchError(f"{result['wrong']} of {result['sent']} answers were not {expect}: rcodes "
                         f"{result.get('rcodes')}")
    out = {**result, **use}
    if started.proc is not None:
        out["cpu_us_per_query"] = 1e6 * use["proxy_cpu_s"] / result["completed"]
    return out


def _records(path: Path | None) -> list[dict[str, Any]]:
    out = []
    for line in lines_of(path) if path is not None else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"unparsable": line[:200]})
    return out


def tunnel_records(started: Started, expected: dict[str, int]) -> dict[str, Any]:
    """egressd's connection records by listener against the tunnels the load generators opened."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        records = [r for r in _records(started.audit) if r.get("event") == "egress.connection"]
        by_listener = Counter(str(r.get("listener")) for r in records if r.get("event") == "egress.connection")
        if all(by_listener[k] >= n for k, n in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    kinds = Counter(f"{r.get('listener')} {r.get('protocol')} {r.get('reason')}" for r in records)
    odd = [r for r in records if r.get("reason") != "allowed"]
    return {
        "records": len(records), "by_listener": dict(by_listener), "expected_at_least": expected,
        "missing": {k: max(0, n - by_listener[k]) for k, n in expected.items()},
        "kinds": dict(kinds), "not_allowed_samples": [
            {k: r.get(k) for k in ("listener", "protocol", "host", "reason", "detail")} for r in odd[:5]],
        **log_problems(started),
    }


def dns_records(started: Started, expected: int, upstream_queries: int) -> dict[str, Any]:
    """egressd's egress.dns records (one per query with --dns-audit all) against the queries sent."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        records = _records(started.audit)
        count = sum(1 for r in records if r.get("event") == "egress.dns")
        if count >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    reasons = Counter(f"{r.get('reason')} {r.get('rcode')}" for r in records)
    return {"records": count, "expected_at_least": expected, "missing": max(0, expected - count),
            "reasons": dict(reasons), "upstream_queries": upstream_queries, **log_problems(started)}
