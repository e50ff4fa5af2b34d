"""``python -m bench.sidecar``: egressd in sidecar mode, in a simulated pod with its own iptables rules.

::

    pod + net namespaces, veth, egressd init-iptables --proxy-uid 0 (bench.sidecar_world)
    for each run:
        tunnels: egressd (explicit 127.0.0.1:13128 + transparent 127.0.0.1:15001), core 0
            warm-up ─▶ direct tunnels/s, latency ─▶ explicit and transparent (order alternating by run):
            tunnels/s (16 clients) ─▶ latency (one client) ─▶ records
        dns: egressd (--listen off --dns-listen 127.0.0.1:15053), then dnsmasq on the same port, core 0
            warm-up ─▶ allowed (cached) and denied: 16 outstanding ─▶ 5,000 queries/s paced ─▶ records
    ─▶ medians, ratios, targets, two tables, JSON

See bench/README.md ("Sidecar mode"). Every process is started by PID and
stopped in ``finally``; the namespaces (and with them the rules) are removed
in ``finally``; a phase that fails is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import cli, runner, sidecar_phases, sidecar_report
from bench.phases import Bench
from bench.phases import Params as MainParams
from bench.procs import BenchError, run_bounded
from bench.proxies import Started
from bench.sidecar_phases import Params
from bench.sidecar_report import DNS_FIGURES, DNS_SYSTEMS, TUNNEL_FIGURES, TUNNEL_SYSTEMS
from bench.sidecar_world import (
    ALLOWED_NAME,
    APP_UID,
    DENIED_NAME,
    PROXY_UID,
    World,
    start_dnsmasq,
    start_egressd,
)

DEFAULT_JSON = runner.HERE / "results" / "sidecar-latest.json"
PARTS = ("tunnels", "dns")
NEEDS = ("ip", "iptables-restore", "setpriv", "taskset", "sysctl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sidecar",
        description="egressd's transparent listener next to its explicit one, and its DNS filter next to "
        "dnsmasq, in a simulated pod with the rules of egressd init-iptables (root).")
    parser.add_argument("--quick", action="store_true", help="short phases, one run, no re-measuring")
    parser.add_argument("--runs", type=int, default=None, help="runs; medians are reported (default 3, --quick 1)")
    parser.add_argument("--only", default=",".join(PARTS), help="comma list of parts: tunnels,dns (default both)")
    parser.add_argument("--no-dnsmasq", action="store_true", help="measure egressd's DNS filter alone")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write the results here ({DEFAULT_JSON})")
    parser.add_argument("--keep", action="store_true", help="copy the run directory to bench/results/run-<time>/ "
                        "(done anyway when something failed)")
    parser.add_argument("--retry-noisy", type=int, default=None, help="measure again, up to N more times, when "
                        "other programs used >=10%% of a core meanwhile (default 2; --quick: 0)")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if not only or any(s not in PARTS for s in only):
        parser.error(f"--only takes a comma list of {', '.join(PARTS)}, not {args.only!r}")
    args.only = tuple(s for s in PARTS if s in only)
    args.runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    args.retry_noisy = args.retry_noisy if args.retry_noisy is not None else (0 if args.quick else 2)
    if not 1 <= args.runs <= 20 or not 0 <= args.retry_noisy <= 5:
        parser.error("--runs must be 1-20 and --retry-noisy 0-5")
    return args


def build(run_dir: Path, source: str, name: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise BenchError(f"no C compiler: {source} is needed (apt-get install -y gcc)")
    out = run_dir / name
    done = run_bounded([cc, "-O2", "-o", str(out), str(runner.HERE / source), "-lm"], 120)
    if done.returncode != 0:
        raise BenchError(f"building {source} failed: {done.stderr.strip()[-400:]}")
    return out


def measure_tunnels(session: runner.Session, bench: Bench, world: World, p: Params, run: int) -> dict[str, Any]:
    """One egressd with both listeners; direct, then explicit and transparent in an order that alternates."""
    results: dict[str, Any] = {mode: {"_run": run} for mode in TUNNEL_SYSTEMS}
    direct = Started("direct", None, None)
    try:
        egressd = start_egressd(world, f"r{run}-tunnels", bench.proxy_cpus, tunnels=True)
    except BenchError as exc:
        session.failures.append(f"tunnels run {run}: egressd did not start: {exc}")
        for mode in ("explicit", "transparent"):
            results[mode]["errors"] = {"tunnels": "start failed", "latency": "start failed"}
        return results
    listeners = {mode: Started(mode, egressd.proc, egressd.address, egressd.logs, egressd.audit)
                 for mode in ("explicit", "transparent")}
    order = ("explicit", "transparent") if run % 2 else ("transparent", "explicit")
    try:
        for mode in order:  # lazy start-up work, and the name's address in egressd's cache
            session.phase(results[mode], listeners[mode], "warmup", lambda m=mode: sidecar_phases.tunnels(
                bench, world, listeners[m], m, 1, p, 0.3, f"r{run}-warmup"))
        for name, conc, seconds in (("tunnels", p.concurrency, p.duration), ("latency", 1, p.latency_duration)):
            session.phase(results["direct"], direct, name, lambda c=conc, s=seconds, n=name: sidecar_phases.tunnels(
                bench, world, direct, "direct", c, p, s, f"r{run}-{n}"), retry=True)
            for mode in order:
                session.phase(results[mode], listeners[mode], name,
                              lambda m=mode, c=conc, s=seconds, n=name: sidecar_phases.tunnels(
                                  bench, world, listeners[m], m, c, p, s, f"r{run}-{n}"), retry=True)
        expected = {mode: sum(results[mode].get(ph, {}).get("opened", 0) for ph in ("warmup", "tunnels", "latency"))
                    for mode in ("explicit", "transparent")}
        session.phase(results["explicit"], egressd, "records", lambda: sidecar_phases.tunnel_records(egressd, expected))
    finally:
        egressd.stop()
    return results


def measure_dns(session: runner.Session, bench: Bench, world: World, p: Params, run: int, dnsload: Path,
                systems: tuple[str, ...]) -> dict[str, Any]:
    """The DNS filter, then dnsmasq in its place (order alternating by run), each started fresh."""
    return {system: _dns_system(session, bench, world, p, run, dnsload, system)
            for system in (systems if run % 2 else tuple(reversed(systems)))}


def _dns_system(session: runner.Session, bench: Bench, world: World, p: Params, run: int, dnsload: Path,
                system: str) -> dict[str, Any]:
    """One DNS server: warm-up (the allowed name's answer cached), then allowed and denied names, each with
    ``p.concurrency`` queries outstanding and paced at ``p.dns_rate``; egressd's records after."""
    out: dict[str, Any] = {"_run": run}
    mark = world.dns_queries()
    try:
        started = (start_egressd(world, f"r{run}-dns", bench.proxy_cpus, tunnels=False) if system == "egressd"
                   else start_dnsmasq(world, f"r{run}", bench.proxy_cpus))
    except BenchError as exc:
        session.failures.append(f"dns run {run}: {system} did not start: {exc}")
        out["errors"] = dict.fromkeys(("allowed", "denied", "allowed_paced", "denied_paced"), "start failed")
        return out

    def load(name: str, expect: str, tag: str, params: Params = p, rate: float | None = None) -> Any:
        return lambda: sidecar_phases.dns(bench, world, started, dnsload, name, expect, params,
                                          f"r{run}-dns-{tag}-{system}", rate=rate)

    try:
        session.phase(out, started, "warmup", load(ALLOWED_NAME, "noerror", "warmup", Params(0, 0.3, 0, 1)))
        for name, expect, key in ((ALLOWED_NAME, "noerror", "allowed"), (DENIED_NAME, "nxdomain", "denied")):
            session.phase(out, started, key, load(name, expect, key), retry=True)
            session.phase(out, started, f"{key}_paced", load(name, expect, f"{key}-paced", rate=p.dns_rate),
                          retry=True)
        if system == "egressd":  # every query egressd received has its record (a lost one may never have arrived)
            sent = sum(v.get("sent", 0) - v.get("lost", 0) for v in out.values() if isinstance(v, dict))
            session.phase(out, started, "records",
                          lambda: sidecar_phases.dns_records(started, sent, world.dns_queries() - mark))
        else:
            out["upstream_queries"] = world.dns_queries() - mark
    finally:
        started.stop()
    return out


def machine() -> dict[str, Any]:
    info = cli.machine()
    info["versions"] = {k: v for k, v in info["versions"].items() if k in ("egressd", "uvloop", "cc")}
    info["versions"]["dnsmasq"] = cli._first_line(["dnsmasq", "--version"])
    info["versions"]["iptables"] = cli._first_line(["iptables", "--version"])
    return info


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, cli._on_sigterm)
    p = Params.quick() if args.quick else Params.full()
    run_dir = runner.make_run_dir(False)
    session = runner.Session(args, run_dir)
    per_run: dict[str, list[dict[str, Any]]] = {"tunnels": [], "dns": []}
    raw: list[dict[str, Any]] = []
    world: World | None = None
    dns_systems = ("egressd",) if args.no_dnsmasq else DNS_SYSTEMS
    info: dict[str, Any] = {}
    try:
        proxy_core, client_core = runner.cores()
        if client_core is not None:
            os.sched_setaffinity(0, {client_core})  # the runner and its DNS thread belong with the client
        runner.raise_fd_limit()
        runner.write_world(run_dir)
        loadc = build(run_dir, "loadc.c", "loadc")
        dnsload = build(run_dir, "dnsload.c", "dnsload")
        bench = Bench(run_dir, MainParams.quick(), proxy_core, client_core, loadc, run_dir / "hello.bin",
                      run_dir / "wrk.lua")
        world = World(run_dir, bench.client_cpus, loadc)  # assigned first: closed in finally even if open fails
        world.open()
        info = {"pinning": {"proxy_core": proxy_core, "client_core": client_core}, "pod_rules": world.rules,
                "sysctls": world.sysctls,
                "uids": {"egressd": PROXY_UID, "app": APP_UID, "direct": PROXY_UID}}
        for run_no in range(1, args.runs + 1):
            results: dict[str, Any] = {}
            if "tunnels" in args.only:
                tunnels = measure_tunnels(session, bench, world, p, run_no)
                base = tunnels["direct"].get("latency")
                per_run["tunnels"].append({mode: sidecar_report.figures_of(tunnels[mode], TUNNEL_FIGURES, base,
                                                                           mode == "direct") for mode in tunnels})
                results["tunnels"] = tunnels
            if "dns" in args.only:
                dns = measure_dns(session, bench, world, p, run_no, dnsload, dns_systems)
                per_run["dns"].append({s: sidecar_report.figures_of(dns[s], DNS_FIGURES) for s in dns})
                results["dns"] = dns
            raw.append(results)
    except (KeyboardInterrupt, BenchError) as exc:
        runner.stopped_by(session, exc)
    finally:
        if world is not None:
            world.close()
    tunnels_summary = sidecar_report.summarize(per_run["tunnels"], TUNNEL_FIGURES, TUNNEL_SYSTEMS)
    dns_summary = sidecar_report.summarize(per_run["dns"], DNS_FIGURES, dns_systems)
    tables = {"tunnels": sidecar_report.table(tunnels_summary, TUNNEL_FIGURES, TUNNEL_SYSTEMS),
              "dns": sidecar_report.table(dns_summary, DNS_FIGURES, dns_systems)}
    notes = _notes(raw) + [f"FAILED: {failure.splitlines()[0][:300]}" for failure in session.failures]
    for part in args.only:
        print(tables[part] + "\n")
    print(sidecar_report.LEGEND)
    for note in notes:
        print(f"- {note}")
    elapsed = time.monotonic() - t0
    document = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["python", "-m", "bench.sidecar", *sys.argv[1:]]),
        "duration_s": round(elapsed, 1), "machine": machine(), "params": vars(p), "parts": list(args.only),
        "dns_systems": list(dns_systems), **info,
        "figures": {"tunnels": tunnels_summary, "dns": dns_summary}, "tables": tables, "notes": notes,
        "failures": session.failures, "runs": raw,
    }
    return runner.finish(args.json, document, elapsed, run_dir, args.keep, session.failures)


def _notes(raw: list[dict[str, Any]]) -> list[str]:
    """Records missing or odd, load generator errors, DNS losses, repeated upstream questions."""
    notes = []
    for i, results in enumerate(raw, 1):
        for mode, phases in results.get("tunnels", {}).items():
            for name in ("tunnels", "latency"):
                errors = phases.get(name, {}).get("errors")
                if errors:
                    notes.append(f"run {i}: {mode} {name}: tunnel errors {errors}")
        found = results.get("tunnels", {}).get("explicit", {}).get("records", {})
        if any(found.get("missing", {}).values()):
            notes.append(f"run {i}: egressd connection records missing: {found['missing']}")
        if odd := {k: v for k, v in found.get("kinds", {}).items() if not k.endswith(" allowed")}:
            notes.append(f"run {i}: egressd records other than allowed: {odd}")
        for system, phases in results.get("dns", {}).items():
            for name in ("allowed", "denied", "allowed_paced", "denied_paced"):
                got = phases.get(name, {})
                if got.get("lost") or got.get("overrun") or got.get("send_errors"):
                    notes.append(f"run {i}: {system} {name}: lost {got.get('lost')}, overrun {got.get('overrun')}, "
                                 f"send errors {got.get('send_errors')} of {got.get('sent')} queries")
            dns_found = phases.get("records", {})
            if dns_found.get("missing"):
                notes.append(f"run {i}: {system}: {dns_found['missing']} egress.dns records missing")
            upstream = dns_found.get("upstream_queries", phases.get("upstream_queries"))
            if upstream is not None and upstream > 2:
                notes.append(f"run {i}: {system} asked the upstream {upstream} times (every answer has TTL 300 s)")
        for found in (results.get("tunnels", {}).get("explicit", {}).get("records", {}),
                      *(ph.get("records", {}) for ph in results.get("dns", {}).values())):
            if found.get("log_problem_lines"):
                notes.append(f"run {i}: egressd logged {found['log_problem_lines']} warning/error lines, e.g. "
                             f"{found['log_problem_samples'][:1]}")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        print(f"bench.sidecar: needs root and {', '.join(NEEDS)} (missing: {', '.join(missing) or 'none'}; "
              f"root: {os.geteuid() == 0}): it makes network namespaces and iptables rules", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
