"""``python -m bench.inspect``: requests through an inspected tunnel, next to a plain tunnel, mitmproxy on its own
and no proxy, in one run; and egressd's memory with and without an ``inspect:`` rule.

::

    unshare --net --mount (root): lo up, run dir on a private tmpfs, /etc/hosts with the origin's name
      core 1: the HTTPS/1.1 origin (bench.inspect_load origin, uvloop), the lab DNS server (a thread of this
              runner), the load generator (bench.inspect_load load: P processes of uvloop + ssl)
      core 0: the system under test, started fresh for each run:
        direct     client ─TLS─▶ origin
        plain      client ─CONNECT─▶ egressd (rule without inspect:) ─▶ origin; the client trusts the origin's CA
        inspected  client ─CONNECT─▶ egressd (rule with inspect: GET /bench/**) ─▶ worker (mitmproxy) ─TLS─▶
                   origin; the client trusts egressd's CA; --inspect-upstream-ca is the origin's CA
        mitmproxy  client ─CONNECT─▶ mitmdump (its own CA, EC P-256 like egressd's; the worker's connection
                   options) ─TLS─▶ origin
      each: RSS after start → one request (the first inspected tunnel starts the worker) → RSS → keep-alive req/s
            (C connections) → new-tunnel req/s (C) → latency of one client, keep-alive and new tunnel (and, to
            the interceptors, HTTP/2) → RSS → egressd's records checked

CPU is sampled at the window's edges: the system's process tree (egressd with its worker), both cores' busy
share, and what other programs used (noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import cli, phases, records, runner
from bench import inspect_world as world
from bench.procs import BenchError
from bench.proxies import Started

SYSTEMS = ("direct", "plain", "inspected", "mitmproxy")
DEFAULT_JSON = runner.HERE / "results" / "inspect-latest.json"
LOADS = ("keepalive", "tunnels", "latency", "latency_tunnel", "latency_h2")


@dataclass(frozen=True)
class Params:
    warmup: float = 0.5
    duration: float = 3.0
    latency_warmup: float = 0.3
    latency_duration: float = 1.5
    concurrency: int = 16
    procs: int = 2
    start_margin: float = 0.6  # seconds for the load generator's processes to start before their T0

    @classmethod
    def quick(cls) -> Params:
        return cls(0.15, 0.7, 0.15, 0.4, start_margin=0.4)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inspect",
        description="HTTPS requests through egressd's inspected tunnel next to a plain tunnel, mitmproxy alone and "
        "no proxy (system on core 0, origin and load on core 1, loopback only); egressd's memory with and "
        "without an inspect: rule. Needs Python 3.12+ (mitmproxy).")
    parser.add_argument("--quick", action="store_true", help="short phases (0.7 s), one run, no re-measuring")
    parser.add_argument("--runs", type=int, help="runs; medians are reported (default 3, --quick 1)")
    parser.add_argument("--concurrency", type=int, help="connections of the req/s figures (16)")
    parser.add_argument("--procs", type=int, help="load generator processes sharing them (2)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--keep", action="store_true", help="copy the run directory to bench/results/run-<time>/")
    parser.add_argument("--retry-noisy", type=int, help="measure again, up to N more times, when other programs "
                        "used >=10%% of a core meanwhile (default 2; --quick: 0)")
    parser.add_argument("--no-netns", action="store_true", help="stay in the caller's namespaces even as root "
                        f"(then {world.NAME} must resolve to 127.0.0.1 for mitmdump)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.retry_noisy = args.retry_noisy if args.retry_noisy is not None else (0 if args.quick else 2)
    base = Params.quick() if args.quick else Params()
    args.params = Params(**{**asdict(base), **{k: v for k in ("concurrency", "procs")
                                               if (v := getattr(args, k)) is not None}})
    p = args.params
    if not 1 <= args.runs <= 20 or not 0 <= args.retry_noisy <= 5 or not 1 <= p.procs <= p.concurrency:
        parser.error("--runs must be 1-20, --retry-noisy 0-5, and --procs between 1 and --concurrency")
    return args


def measure(session: runner.Session, w: world.World, system: str, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {"_run": run}
    p = w.params
    try:
        started = w.start(system, f"r{run}")
    except BenchError as exc:
        session.failures.append(f"{system} run {run}: {exc}")
        out["errors"] = {"start": str(exc).splitlines()[0][:300]}
        return out
    try:
        session.phase(out, started, "rss_start", lambda: w.rss(started))
        session.phase(out, started, "first", lambda: w.first_request(system, started))
        session.phase(out, started, "rss_first", lambda: w.rss(started))
        loads = {"keepalive": ("keepalive", p.concurrency, p.procs, p.warmup, p.duration),
                 "tunnels": ("tunnels", p.concurrency, p.procs, p.warmup, p.duration),
                 "latency": ("keepalive", 1, 1, p.latency_warmup, p.latency_duration),
                 "latency_tunnel": ("tunnels", 1, 1, p.latency_warmup, p.latency_duration)}
        if system in ("inspected", "mitmproxy"):  # where a client's HTTP/2 is spoken (the origin has HTTP/1.1)
            loads["latency_h2"] = ("keepalive", 1, 1, p.latency_warmup, p.latency_duration, "--http2")
        for phase, how in loads.items():
            session.phase(out, started, phase, lambda how=how: w.load(system, started, *how), retry=True)
        session.phase(out, started, "rss_end", lambda: w.rss(started))
        sent = 1 + sum(out.get(k, {}).get("total", 0) for k in LOADS)
        tunnels = 1 + sum(out.get(k, {}).get("tunnels", 0) for k in LOADS)
        if started.audit is not None:
            session.phase(out, started, "records", lambda: {**audit_counts(started, system, tunnels, sent),
                                                            **records.log_problems(started)})
        elif started.proc is not None:
            session.phase(out, started, "records", lambda: records.log_problems(started))
    finally:
        started.stop()
    return out

# ---- records, medians, ratios, the table ----

def audit_counts(started: Started, system: str, tunnels: int, sent: int, wait: float = 5.0) -> dict[str, Any]:
    """egressd's records: one allowed ``egress.connection`` per tunnel, marked inspected only on the inspected
    system, and there one ``egress.request`` (allow, 200) per request; polled up to ``wait`` s (they are batched)."""
    want = sent if system == "inspected" else 0
    deadline = time.monotonic() + wait
    while True:
        c: Counter[str] = Counter()
        lines = started.audit.read_bytes().splitlines() if started.audit and started.audit.exists() else []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                c["unparsable"] += 1
                continue
            if rec.get("event") == "egress.connection":
                c["connections"] += 1
                c["connections_allowed"] += rec.get("reason") == "allowed"
                c["connections_inspected"] += "inspected" in (rec.get("detail") or "")
            elif rec.get("event") == "egress.request":
                c["requests"] += 1
                c["requests_allowed_200"] += rec.get("decision") == "allow" and rec.get("status") == 200
        if (c["connections"] >= tunnels and c["requests"] >= want) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ok = (c["connections"] == c["connections_allowed"] == tunnels and not c["unparsable"]
          and c["connections_inspected"] == (tunnels if system == "inspected" else 0)
          and c["requests"] == c["requests_allowed_200"] == want)
    return {"expected_connections": tunnels, "expected_requests": want, **c, "records_ok": ok}


FIGURES = ("per_s", "p50_ms", "p99_ms", "cpu_us_per_request", "main_cpu_us_per_request", "client_core_busy_pct",
           "proxy_core_busy_pct", "load_cpu_pct", "foreign_cpu_pct", "origin_connections_per_request")
RSS = ("rss_start", "rss_first", "rss_end")
RATIOS = {"keepalive_per_s": ("keepalive", "per_s"), "tunnels_per_s": ("tunnels", "per_s"),
          "keepalive_cpu": ("keepalive", "cpu_us_per_request"), "tunnels_cpu": ("tunnels", "cpu_us_per_request"),
          "added_p50": ("latency", "added_p50_ms"), "added_p50_tunnel": ("latency_tunnel", "added_p50_ms"),
          "added_p50_h2": ("latency_h2", "added_p50_ms"),
          **{name: (name, "rss_kib") for name in RSS}}


def summarize(raw: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs per system and figure; added latency against direct in the same run; the ratios
    of the inspected tunnel to the plain tunnel and to mitmproxy alone."""
    out: dict[str, Any] = {}
    for system in SYSTEMS:
        runs = [r[system] for r in raw if system in r]
        cell: dict[str, Any] = {}
        for phase in LOADS:
            if got := [r[phase] for r in runs if phase in r]:
                cell[phase] = {k: statistics.median(g[k] for g in got) for k in FIGURES if all(k in g for g in got)}
                cell[phase]["client_bound_runs"] = sum(bool(g.get("client_bound")) for g in got)
                cell[phase]["noisy_runs"] = sum(bool(g.get("noisy")) for g in got)
            base = "latency" if phase == "latency_h2" else phase  # direct speaks HTTP/1.1 (the origin's)
            pairs = [(r[system][phase], r["direct"][base]) for r in raw
                     if phase in r.get(system, {}) and base in r.get("direct", {})]
            if phase.startswith("latency") and system != "direct" and pairs:
                for q in ("p50", "p99"):
                    cell[phase][f"added_{q}_ms"] = statistics.median(a[f"{q}_ms"] - d[f"{q}_ms"] for a, d in pairs)
        if got := [r["first"]["ms"] for r in runs if "ms" in r.get("first", {})]:
            cell["first"] = {"ms": statistics.median(got)}
        for phase in RSS:
            if got := [r[phase] for r in runs if "rss_kib" in r.get(phase, {})]:
                cell[phase] = {k: statistics.median(g[k] for g in got) for k in ("rss_kib", "main_kib", "children_kib")}
        out[system] = cell
    out["ratios"] = {}
    for other in ("plain", "mitmproxy"):
        for name, (phase, key) in RATIOS.items():
            a, b = out["inspected"].get(phase, {}).get(key), out[other].get(phase, {}).get(key)
            if a is not None and b:
                out["ratios"][f"{name}_vs_{other}"] = a / b
    return out


def table(summary: dict[str, Any], p: Params) -> str:
    def fig(system: str, phase: str, key: str, form: str, extra: str = "") -> str:
        c = summary.get(system, {}).get(phase, {})
        if key not in c:
            return "–"
        marks = (" CB" if c.get("client_bound_runs") else "") + (" N" if c.get("noisy_runs") else "")
        return format(c[key], form) + (extra.format(**c) if extra else "") + marks

    def row(label: str, cells: list[str], ratio: str | None = None) -> str:
        r = summary.get("ratios", {})
        ratios = [f"{r[f'{ratio}_vs_{o}']:.2f}×" if ratio and f"{ratio}_vs_{o}" in r else "" for o in SYSTEMS[1::2]]
        return "| " + " | ".join([label, *cells, *ratios]) + " |"

    def each(phase: str, key: str, form: str, extra: str = "", direct: str | None = None) -> list[str]:
        return [direct if direct is not None and s == "direct" else fig(s, phase, key, form, extra) for s in SYSTEMS]

    def mib(phase: str) -> list[str]:
        def one(s: str) -> str:
            c = summary.get(s, {}).get(phase)
            if not c:
                return "–"
            worker = c["children_kib"]
            split = f" ({c['main_kib'] / 1024:.1f} + worker {worker / 1024:.1f})" if worker else ""
            return f"{c['rss_kib'] / 1024:.1f}{split}"
        return [one(s) for s in SYSTEMS]

    both = " ({p50_ms:.2f}/{p99_ms:.2f})"
    rows = [
        "| figure | direct | plain tunnel | inspected tunnel | mitmproxy alone | inspected / plain | "
        "inspected / mitmproxy |", "|---|---|---|---|---|---|---|",
        row(f"keep-alive req/s, {p.concurrency} connections (p50/p99 ms)", each("keepalive", "per_s", ",.0f", both),
            "keepalive_per_s"),
        row(f"new-tunnel req/s, {p.concurrency} connections (p50/p99 ms)", each("tunnels", "per_s", ",.0f", both),
            "tunnels_per_s"),
        row("system CPU per request, keep-alive, µs", each("keepalive", "cpu_us_per_request", ",.0f"),
            "keepalive_cpu"),
        row("system CPU per new-tunnel request, µs", each("tunnels", "cpu_us_per_request", ",.0f"), "tunnels_cpu"),
        row("… of which egressd's own process, keep-alive / new tunnel, µs", [
            f"{fig(s, 'keepalive', 'main_cpu_us_per_request', ',.0f')} / "
            f"{fig(s, 'tunnels', 'main_cpu_us_per_request', ',.0f')}" if s in ("plain", "inspected") else "–"
            for s in SYSTEMS]),
        row("client core busy %, keep-alive / new tunnel", [
            f"{fig(s, 'keepalive', 'client_core_busy_pct', '.0f')} / {fig(s, 'tunnels', 'client_core_busy_pct', '.0f')}"
            for s in SYSTEMS]),
        row("one client, keep-alive: p50 (p99) ms", each("latency", "p50_ms", ".3f", " ({p99_ms:.3f})")),
        row("… added p50 (p99) vs direct, ms", each("latency", "added_p50_ms", ".3f", " ({added_p99_ms:.3f})",
                                                    "base"), "added_p50"),
        row("one client, new tunnel per request: p50 (p99) ms", each("latency_tunnel", "p50_ms", ".2f",
                                                                     " ({p99_ms:.2f})")),
        row("… added p50 (p99) vs direct, ms", each("latency_tunnel", "added_p50_ms", ".2f", " ({added_p99_ms:.2f})",
                                                    "base"), "added_p50_tunnel"),
        row("one client, HTTP/2 to the interceptor, keep-alive: p50 (p99) ms",
            each("latency_h2", "p50_ms", ".3f", " ({p99_ms:.3f})")),
        row("… added p50 (p99) vs direct (HTTP/1.1), ms", each("latency_h2", "added_p50_ms", ".3f",
                                                               " ({added_p99_ms:.3f})", "base"), "added_p50_h2"),
        row("origin connections per request: keep-alive, 16 / 1 client / 1 client HTTP/2", [
            " / ".join(fig(s, ph, "origin_connections_per_request", ".3f") for ph in ("keepalive", "latency",
                                                                                     "latency_h2"))
            for s in SYSTEMS]),
        row("first request after start (new tunnel), ms", each("first", "ms", ",.0f")),
        row("RSS after start, MiB", mib("rss_start"), "rss_start"),
        row("RSS after the first request, MiB", mib("rss_first"), "rss_first"),
        row("RSS after the load, MiB", mib("rss_end"), "rss_end"),
    ]
    return "\n".join(rows)


def notes_of(raw: list[dict[str, Any]]) -> list[str]:
    """Failed phases, request errors, records that do not add up, warnings in the systems' logs."""
    out = []
    for i, results in enumerate(raw, 1):
        for system, res in results.items():
            for phase, error in res.get("errors", {}).items():
                out.append(f"run {i}: {system}: {phase} failed: {error}")
            for phase in LOADS:
                if errors := res.get(phase, {}).get("errors"):
                    out.append(f"run {i}: {system}: {phase}: request errors {errors}")
            found = res.get("records", {})
            if found and found.get("records_ok") is False:
                shown = {k: v for k, v in found.items() if k.startswith(("expected", "connections", "requests"))}
                out.append(f"run {i}: {system}: records do not add up: {shown}")
            if found.get("log_problem_lines"):
                out.append(f"run {i}: {system}: {found['log_problem_lines']} warning/error lines in its log, e.g. "
                           f"{found['log_problem_samples'][:1]}")
    return out


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, cli._on_sigterm)
    isolated = os.environ.get("BENCH_NETNS") == "1"
    run_dir = runner.make_run_dir(isolated)
    session = runner.Session(args, run_dir)
    raw: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    w: world.World | None = None
    try:
        if isolated:
            info["isolation"] = runner.isolate(run_dir)
            with open(run_dir / "hosts", "a") as hosts:  # bind-mounted on /etc/hosts: mitmdump resolves the name
                hosts.write(f"127.0.0.1 {world.NAME}\n")
        elif _resolves(world.NAME) != "127.0.0.1":
            raise BenchError(f"{world.NAME} does not resolve to 127.0.0.1 here: run as root (private namespaces) "
                             "or add it to /etc/hosts")
        proxy_core, client_core = runner.cores()
        if client_core is not None:
            os.sched_setaffinity(0, {client_core})  # the runner and its DNS thread belong with the load
        runner.raise_fd_limit()
        bench = phases.Bench(run_dir, phases.Params.quick(), proxy_core, client_core, None, run_dir, run_dir)
        info["pinning"] = {"system_core": proxy_core, "client_core": client_core}
        w = world.World(run_dir, args.params, bench)
        for run_no in range(1, args.runs + 1):
            rest = SYSTEMS[1:] if run_no % 2 else tuple(reversed(SYSTEMS[1:]))
            raw.append({s: measure(session, w, s, run_no) for s in ("direct", *rest)})
    except (KeyboardInterrupt, BenchError) as exc:
        runner.stopped_by(session, exc)
    finally:
        if w is not None:
            w.stop()
    summary = summarize(raw)
    text = table(summary, args.params)
    notes = notes_of(raw) + [f"FAILED: {f.splitlines()[0][:300]}" for f in session.failures]
    print(text)
    for note in notes:
        print(f"- {note}")
    elapsed = time.monotonic() - t0
    machine = cli.machine()
    machine["versions"]["mitmproxy"] = _version("mitmproxy")
    document = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": os.environ.get("BENCH_ARGV") or shlex.join(["python", "-m", "bench.inspect", *sys.argv[1:]]),
        "duration_s": round(elapsed, 1), "machine": machine, "params": asdict(args.params), **info,
        "figures": summary, "table": text, "notes": notes, "failures": session.failures, "runs": raw,
    }
    return runner.finish(args.json, document, elapsed, run_dir, args.keep, session.failures, isolated)


def _resolves(name: str) -> str | None:
    try:
        return socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if sys.version_info < (3, 12):
        print("bench.inspect: mitmproxy (inspect mode) needs Python 3.12+; run it with such a venv, e.g. "
              ".venv/bin/python -m bench.inspect", file=sys.stderr)
        return 2
    if cli.wants_namespaces(args.no_netns):
        cli.reexec_in_namespaces(argv, "bench.inspect")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
