"""``python -m bench.leaks``: egressd holding idle tunnels, churning short ones and soaking at a steady rate, with its
RSS, its descriptors and its audit records watched.

::

    unshare --net --mount (root): lo up, run dir on a private tmpfs (runner.isolate)
      core 1: DNS server (LabThread, TTL 300), echo origin (loadc echo), the load generators, this runner
      core 0: egressd run --workers 1, one fresh process per scenario, its audit log on the tmpfs
      idle:  warm-up → RSS, fds → K rounds of: N tunnels opened and held (bench.load idle) → RSS, fds →
             closed → settle → RSS, fds
      churn: warm-up → start values → M short tunnels (bench.leaks_load count) → end values → settle
      soak:  warm-up → start values → R tunnels/s for D s (bench.leaks_load rate), RSS every S s → settle
      each:  the audit records against the connections made (bench.leaks_report)

A short tunnel is connect, ``CONNECT api.svc042.bench-example.com:18443``, a
TLS ClientHello for that name (egressd checks its SNI), its echo, close. An
idle tunnel is ``CONNECT idle.svc142.bench-example.com:18444`` and its 200,
then nothing until it is closed. "Settle" polls, up to ``--settle`` seconds,
until egressd's descriptors are back to the start, every record is written,
no connection is active and the RSS holds still. Exit status: 0 when every
check passed, 1 when one failed or a scenario could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import cli, leaks_report, runner, scenario
from bench.leaks_world import World, check_room
from bench.procs import BenchError

DEFAULT_JSON = runner.HERE / "results" / "leaks-latest.json"
SCENARIOS = ("idle", "churn", "soak")
TLS_TARGET = f"{scenario.TLS_NAME}:{scenario.ECHO_TLS_PORT}"
IDLE_TARGET = f"{scenario.IDLE_NAME}:{scenario.ECHO_PORT}"


@dataclass(frozen=True)
class Params:
    idle_count: int = 10_000
    idle_rounds: int = 3
    churn_count: int = 100_000
    warmup: int = 1_000
    concurrency: int = 32
    duration: float = 600.0
    rate: float = 200.0
    sample_every: float = 10.0
    settle: float = 15.0

    @classmethod
    def quick(cls) -> Params:
        return cls(idle_count=200, idle_rounds=2, churn_count=3_000, warmup=200, concurrency=16, duration=6.0,
                   rate=100.0, sample_every=1.0, settle=10.0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.leaks",
        description="egressd under idle, churning and steady load: RSS, descriptors and audit records "
        "before, during and after (proxy pinned to one core, load on the other, loopback only).",
    )
    parser.add_argument("scenario", choices=(*SCENARIOS, "all"), help="what to run ('all': the three in turn)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers, a few seconds per scenario")
    parser.add_argument("--idle-count", type=int, help="idle: tunnels held at once (10000)")
    parser.add_argument("--idle-rounds", type=int, help="idle: times the tunnels are opened, held and closed (3)")
    parser.add_argument("--churn-count", type=int, help="churn: short tunnels after the warm-up (100000)")
    parser.add_argument("--warmup", type=int, help="tunnels before the start values are taken (1000)")
    parser.add_argument("--concurrency", type=int, help="churn and warm-ups: tunnels in flight (32)")
    parser.add_argument("--duration", type=float, help="soak: seconds (600)")
    parser.add_argument("--rate", type=float, help="soak: tunnels started per second (200)")
    parser.add_argument("--sample-every", type=float, help="soak: seconds between RSS samples (10)")
    parser.add_argument("--settle", type=float, help="longest wait, seconds, for descriptors and records (15)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--keep", action="store_true", help="copy the run directory (logs, records) to "
                        "bench/results/run-<time>/ (done anyway when a check failed)")
    parser.add_argument("--no-netns", action="store_true", help="stay in the caller's namespaces even as root")
    args = parser.parse_args(argv)
    base = Params.quick() if args.quick else Params()
    given = {k: v for k, v in vars(args).items() if k in Params.__dataclass_fields__ and v is not None}
    args.params = replace(base, **given)
    p = args.params
    if min(p.idle_count, p.idle_rounds, p.churn_count, p.concurrency) < 1 or p.warmup < 0:
        parser.error("--idle-count, --idle-rounds, --churn-count and --concurrency must be at least 1, "
                     "--warmup at least 0")
    if not (p.duration > 0 and p.rate > 0 and 0 < p.sample_every <= p.duration and p.settle > 0):
        parser.error("--duration, --rate and --settle must be positive, --sample-every between 0 and --duration")
    args.scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    return args


def idle(world: World, p: Params) -> dict[str, Any]:
    """N tunnels opened and held at once, then closed, ``idle_rounds`` times over; RSS and descriptors before,
    with all open and after closing, each round."""
    started = world.start_egressd("idle", max_connections=p.idle_count + 256)
    try:
        check_room(started, p.idle_count)
        warm = world.batch(started, IDLE_TARGET, p.warmup, p.concurrency)["connected"]
        before = world.quiesce(started, warm)
        rounds = []
        for n in range(1, p.idle_rounds + 1):
            with world.idle_client(started, p.idle_count) as client:
                ready = world.wait_event(client, "ready", 60 + p.idle_count / 100, started)
                held = world.snapshot(started)
                client.send("close\n")
                world.wait_event(client, "result", 60, started)
            after, settle_s, settled = world.settle(started, warm + n * p.idle_count, before.fds, p.settle)
            rounds.append({"opened": ready["open"], "open_errors": ready["errors"], "rss_open_kib": held.rss_kib,
                           "rss_after_kib": after.rss_kib, "fds_open": held.fds, "fds_after": after.fds,
                           "active_after": after.active, "settle_s": settle_s, "settled": settled})
        first = rounds[0]
        return {
            "count": p.idle_count, "warmup": warm, "rounds": rounds, "rss_before_kib": before.rss_kib,
            "fds_before": before.fds,
            "kib_per_tunnel": round((first["rss_open_kib"] - before.rss_kib) / max(first["opened"], 1), 2),
            "fds_per_tunnel": round((first["fds_open"] - before.fds) / max(first["opened"], 1), 3),
            **world.audit_of(started, warm + p.idle_rounds * p.idle_count, frozenset({0, len(world.payload)})),
        }
    finally:
        started.stop()


def churn(world: World, p: Params) -> dict[str, Any]:
    """M short tunnels after a warm-up; descriptors and RSS at the start, at the end and after settling."""
    started = world.start_egressd("churn")
    try:
        warm = world.batch(started, TLS_TARGET, p.warmup, p.concurrency)["connected"]
        start = world.quiesce(started, warm)
        client = world.batch(started, TLS_TARGET, p.churn_count, p.concurrency)
        end = world.snapshot(started)
        expected = warm + client["connected"]
        settled, settle_s, done = world.settle(started, expected, start.fds, p.settle)
        return {
            "count": p.churn_count, "warmup": warm, "concurrency": p.concurrency, "client": client,
            "fds_start": start.fds, "fds_end": end.fds, "fds_settled": settled.fds,
            "rss_start_kib": start.rss_kib, "rss_end_kib": end.rss_kib, "rss_settled_kib": settled.rss_kib,
            "rss_tolerance_kib": leaks_report.rss_tolerance_kib(start.rss_kib),
            "active_after": settled.active, "settle_s": settle_s, "settled": done,
            **world.audit_of(started, expected, frozenset({len(world.payload)})),
        }
    finally:
        started.stop()


def soak(world: World, p: Params) -> dict[str, Any]:
    """A steady rate for D seconds after a warm-up, RSS and descriptors sampled every S seconds."""
    started = world.start_egressd("soak")
    try:
        warm = world.batch(started, TLS_TARGET, p.warmup, p.concurrency)["connected"]
        start = world.quiesce(started, warm)
        client, samples = world.soak(started, TLS_TARGET, p.rate, p.duration, p.sample_every)
        expected = warm + client["connected"]
        settled, settle_s, done = world.settle(started, expected, start.fds, p.settle)
        flat = leaks_report.flatness([(t, kib) for t, kib, _ in samples])
        return {
            "rate": p.rate, "duration_s": p.duration, "sample_every_s": p.sample_every, "warmup": warm,
            "client": client, "samples": samples, "flatness": {**asdict(flat), "flat": flat.flat},
            "fds_start": start.fds, "fds_settled": settled.fds, "rss_start_kib": start.rss_kib,
            "rss_settled_kib": settled.rss_kib, "active_after": settled.active, "settle_s": settle_s, "settled": done,
            **world.audit_of(started, expected, frozenset({len(world.payload)})),
        }
    finally:
        started.stop()


RUNS = {"idle": idle, "churn": churn, "soak": soak}


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, cli._on_sigterm)
    isolated = os.environ.get("BENCH_NETNS") == "1"
    run_dir = runner.make_run_dir(isolated)
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    info: dict[str, Any] = {}
    world = None
    try:
        info["isolation"] = runner.isolate(run_dir) if isolated else {"network_namespace": False}
        runner.write_world(run_dir)
        proxy_core, client_core = runner.cores()
        if client_core is not None:
            os.sched_setaffinity(0, {client_core})  # the runner and its DNS thread belong with the load
        runner.raise_fd_limit()
        world = World(run_dir, proxy_core, client_core)
        info.update(world.start(check_ports=not isolated))
        for name in args.scenarios:
            runner.log(f"{name}: starting")
            try:
                results[name] = RUNS[name](world, args.params)
            except BenchError as exc:
                failures.append(f"{name}: {exc}")
                runner.log(f"{name} failed: {exc}")
    except (KeyboardInterrupt, BenchError) as exc:
        failures.append(f"stopped: {exc}")
        runner.log(f"stopped: {exc}")
    finally:
        if world is not None:
            world.stop()
    try:
        return _report(args, results, failures, info, time.monotonic() - t0, run_dir)
    finally:
        if isolated:  # the tmpfs would vanish with the namespace, but its mount point would stay behind
            subprocess.run(["umount", str(run_dir)], capture_output=True, timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)


def _report(args: argparse.Namespace, results: dict[str, dict[str, Any]], failures: list[str],
            info: dict[str, Any], elapsed: float, run_dir: Path) -> int:
    """The checks, the JSON file (written first), the table on stdout; the exit status."""
    checks = [c for name, r in results.items() for c in leaks_report.CHECKS[name](r)]
    text = leaks_report.table(results, checks)
    ok = not failures and all(c.ok for c in checks)
    document = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": os.environ.get("BENCH_ARGV") or shlex.join(["python", "-m", "bench.leaks", *sys.argv[1:]]),
        "duration_s": round(elapsed, 1), "machine": cli.machine(), "params": asdict(args.params),
        **info, "results": results, "checks": [asdict(c) for c in checks], "failures": failures, "table": text,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    kept = runner.save_run_dir(run_dir) if args.keep or not ok else None
    print(text)
    for failure in failures:
        print(f"FAILED: {failure.splitlines()[0][:300]}")
    print(f"\nJSON: {args.json}  ({elapsed:.0f} s)")
    if kept is not None:
        print(f"logs: {kept}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if cli.wants_namespaces(args.no_netns):
        cli.reexec_in_namespaces(argv, module="bench.leaks")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
