"""``python -m bench``: options, the private namespaces, the session, the table and the JSON file."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import phases, proxies, report, runner, scenario
from bench.procs import BenchError, port_open

SYSTEMS = report.SYSTEMS
DEFAULT_JSON = runner.HERE / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark egressd against Squid and tinyproxy (and no proxy) on loopback, "
        "proxy pinned to one core, load generator and origins on the other.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, one run, about a second per figure")
    parser.add_argument("--only", default=",".join(SYSTEMS),
                        help="comma list of systems to measure: egressd,squid,tinyproxy,direct (default all)")
    parser.add_argument("--runs", type=int, default=None, help="runs per system; medians are reported (default 3, "
                        "--quick: 1)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"write the results here (default {DEFAULT_JSON})")
    parser.add_argument("--keep", action="store_true",
                        help="copy the run directory (configs, logs, records) to bench/results/run-<time>/ "
                        "(done anyway when something failed)")
    parser.add_argument("--retry-noisy", type=int, default=None,
                        help="measure again, up to N more times, when other programs used >=10%% of a core meanwhile "
                        "(default 2; --quick: 0)")
    parser.add_argument("--no-netns", action="store_true",
                        help="do not enter private network/mount namespaces even as root (tinyproxy then needs the "
                        "benchmark names in /etc/hosts)")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SYSTEMS]
    if unknown or not only:
        parser.error(f"--only takes a comma list of {', '.join(SYSTEMS)}, not {args.only!r}")
    args.only = tuple(s for s in SYSTEMS if s in only)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.retry_noisy is None:
        args.retry_noisy = 0 if args.quick else 2
    if not 0 <= args.retry_noisy <= 5:
        parser.error("--retry-noisy must be 0-5")
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be 1-20")
    return args


def wants_namespaces(no_netns: bool) -> bool:
    """Whether to re-run in namespaces of our own: as root, unless told not to or already inside them."""
    return os.geteuid() == 0 and not no_netns and os.environ.get("BENCH_NETNS") != "1" and bool(shutil.which("unshare"))


def reexec_in_namespaces(argv: list[str], module: str = "bench") -> None:
    """As root: re-run ``python -m module argv`` in new network and mount namespaces (loopback only, private
    /etc/hosts)."""
    env = {**os.environ, "BENCH_NETNS": "1", "BENCH_ARGV": shlex.join(["python", "-m", module, *argv])}
    root = str(runner.HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    os.chdir(root)
    os.execvpe("unshare", ["unshare", "--net", "--mount", "--", sys.executable, "-m", module, *argv], env)


def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        mem_mib = int(mem) // 1024
    except (OSError, StopIteration):
        mem_mib = None
    versions = {
        "egressd": _version("egressd"),
        "uvloop": _version("uvloop"),
        "squid": _first_line(["squid", "-v"]),
        "tinyproxy": _first_line(["tinyproxy", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "cc": _first_line(["cc", "--version"]),
    }
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "memory_mib": mem_mib, "kernel": platform.release(),
        "python": sys.version.split()[0], "python_executable": sys.executable,  # its build matters: bench/README
        "versions": versions, "egressd_git": runner.git_revision(),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, _on_sigterm)
    isolated = os.environ.get("BENCH_NETNS") == "1"
    run_dir = runner.make_run_dir(isolated)
    session = runner.Session(args, run_dir)
    params = runner.params_for(args)
    per_run: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    try:
        if isolated:
            info["isolation"] = runner.isolate(run_dir)
        runner.write_world(run_dir)
        if not isolated:
            info["isolation"] = {"network_namespace": False}
            busy = [p for p in (scenario.EGRESSD_PORT, scenario.SQUID_PORT, scenario.TINYPROXY_PORT,
                                scenario.HTTP_PORT, *scenario.CONNECT_PORTS) if port_open("127.0.0.1", p)]
            if busy:
                raise BenchError(f"ports {busy} are in use on 127.0.0.1 (outside a private namespace): free them "
                                 "or run as root")
        proxy_core, client_core = runner.cores()
        if client_core is not None:
            os.sched_setaffinity(0, {client_core})  # the runner and its DNS thread belong with the client
        runner.raise_fd_limit()
        loadc = runner.build_loadc(run_dir)
        bench = phases.Bench(run_dir, params, proxy_core, client_core, loadc, run_dir / "hello.bin",
                             run_dir / "wrk.lua")
        has_workers = "egressd" in args.only and proxies.egressd_has_workers()
        info.update({
            "pinning": {"proxy_core": proxy_core, "client_core": client_core},
            "load_generator": "bench/loadc.c (C, epoll) for tunnels and bulk; bench/load.py (uvloop) for idle"
            if loadc else "bench/load.py (Python, uvloop Protocols)",
            "http_load_generator": "wrk -t1 -c16 --latency",
            "egressd_workers_option": has_workers,
        })
        session.start_helpers(bench.client_cpus, loadc)
        info["echo_origin"] = session.echo_origin
        info["http_origin"] = session.http_origin
        info["bulk_origin"] = "bench/origin.py (uvloop, one preallocated buffer)"
        runner.log(f"run directory {run_dir}; {args.runs} run(s) of {', '.join(args.only)}")
        for run_no in range(1, args.runs + 1):
            results: dict[str, Any] = {}
            for name in ("direct", *[s for s in args.only if s != "direct"]):
                if name == "direct" and "direct" not in args.only:
                    results["direct_baseline"] = _baseline(session, bench, run_no)
                    continue
                results[name] = runner.measure_system(session, bench, name, run_no, has_workers)
            if has_workers:
                _merge_workers(results.setdefault("egressd", {"_run": run_no}),
                               runner.measure_workers(session, bench, run_no))
            baseline = (results.get("direct") or results.get("direct_baseline") or {}).get("latency")
            per_run.append({name: report.figures_of(res, baseline, name) for name, res in results.items()
                            if name in args.only})
            raw.append(results)
    except (KeyboardInterrupt, BenchError) as exc:
        runner.stopped_by(session, exc)
    finally:
        session.stop_helpers()
    summary = report.summarize(per_run)
    text = report.table(summary, args.only)
    elapsed = time.monotonic() - t0
    notes = _notes(summary, raw, has_workers=info.get("egressd_workers_option", False), args=args)
    notes += [f"FAILED: {failure.splitlines()[0][:300]}" for failure in session.failures]
    print(text)
    print()
    print(report.LEGEND)
    for note in notes:
        print(f"- {note}")
    document = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": os.environ.get("BENCH_ARGV") or shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "duration_s": round(elapsed, 1),
        "machine": machine(),
        "params": vars(params),
        "systems": list(args.only),
        **info,
        "figures": summary,
        "table": text,
        "notes": notes,
        "failures": session.failures,
        "runs": raw,
    }
    return runner.finish(args.json, document, elapsed, run_dir, args.keep, session.failures, isolated)


def _merge_workers(egressd: dict[str, Any], workers: dict[str, Any]) -> None:
    """Fold the --workers 2 session's results into egressd's: the figure, its records, its first error."""
    if "workers2" in workers:
        egressd["workers2"] = workers["workers2"]
    if "records" in workers:
        egressd["workers2_records"] = workers["records"]
    errors = workers.get("errors", {})
    if errors and "workers2" not in workers:
        egressd.setdefault("errors", {})["workers2"] = next(iter(errors.values()))


def _baseline(session: runner.Session, bench: phases.Bench, run_no: int) -> dict[str, Any]:
    """Direct's sequential latency only: the baseline of "added latency" when direct is not being reported."""
    out: dict[str, Any] = {"_run": run_no}
    started = proxies.Started("direct", None, None)
    session.phase(out, started, "latency",
                  lambda: phases.tunnels(bench, started, 1, bench.params.latency_duration, "latency"))
    return out


def _notes(summary: dict[str, Any], raw: list[dict[str, Any]], has_workers: bool, args: Any) -> list[str]:
    """Plain-language remarks for the reader: client-bound cells, skipped figures, record problems."""
    notes = []
    if "egressd" in args.only and not has_workers:
        notes.append("egressd --workers 2: skipped (`egressd run --help` has no --workers)")
    if "direct" in args.only:
        notes.append("direct runs the load generator and the origins on the same core, so it is client-bound by "
                     "construction: it shows what the client core can do, the ceiling of every other column")
    for entry in summary.values():
        for system, cell in entry["systems"].items():
            if cell.get("client_bound") and system != "direct":
                notes.append(f"{entry['label']}: {system} is client-bound (client core ≥90% busy): a floor, "
                             "not the proxy's limit")
    for i, results in enumerate(raw, 1):
        for system, phases_ in results.items():
            http = phases_.get("http", {}) if isinstance(phases_, dict) else {}
            if http.get("socket_errors"):
                notes.append(f"run {i}: {system}: wrk counted {http['socket_errors']} socket errors in "
                             f"{http['requests']} requests (a proxy that closes the connection after each "
                             "response shows one read error per request)")
        for key, what, caches in (("records", "egressd", 1), ("workers2_records", "egressd --workers 2", 2)):
            found = results.get("egressd", {}).get(key)
            if found:
                notes.extend(_record_notes(i, what, found, caches))
    return notes


def _record_notes(run_no: int, what: str, found: dict[str, Any], caches: int) -> list[str]:
    """Remarks on one egressd instance's records, logs and metrics after its load (``caches``: its worker count,
    each of which has its own DNS cache)."""
    notes = []
    missing = found.get("missing_connect_records", 0) + found.get("missing_http_records", 0)
    if missing:
        notes.append(f"run {run_no}: {what}: audit records missing: {missing} "
                     f"(connect {found['connect_records']}/{found['expected_connect_at_least']}, "
                     f"http {found['http_records']}/{found['expected_http_at_least']})")
    if found.get("unparsable_records"):
        notes.append(f"run {run_no}: {what}: {found['unparsable_records']} audit lines are not JSON")
    if found.get("log_problem_lines"):
        notes.append(f"run {run_no}: {what} logged {found['log_problem_lines']} warning/error lines, e.g. "
                     f"{found['log_problem_samples'][:1]}")
    if found.get("metrics", {}).get("active_connections"):
        notes.append(f"run {run_no}: {what} still reported {found['metrics']['active_connections']:.0f} active "
                     "connections after the load ended")
    repeated = {q: n for q, n in found.get("dns_queries", {}).items() if n > caches}
    if repeated:
        notes.append(f"run {run_no}: {what} asked the DNS server the same question more than {caches}x although "
                     f"every answer has TTL 300 s (concurrent lookups of an uncached name not shared?): {repeated}")
    odd = {k: v for k, v in found.get("reasons", {}).items() if k != "allowed"}
    if odd:
        notes.append(f"run {run_no}: {what}: records with reasons other than allowed: {odd} "
                     f"(samples: {found.get('not_allowed_samples', [])[:2]})")
    return notes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if wants_namespaces(args.no_netns):
        reexec_in_namespaces(argv)
    return run(args)
