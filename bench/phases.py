"""One function per measured figure, against one started system (a proxy, or direct).

Every phase runs its load generator as a process pinned to the client core
and samples, at the generator's ``measure_start``/``measure_end`` lines, the
CPU of the proxy's process tree, the generator's CPU and both cores' busy
share. Each returns a flat dict of numbers; a failure raises BenchError.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import scenario
from bench.procs import CLK_TCK, BenchError, Proc, all_cores_task_ticks, busy_share, core_times, process_tree, tree_cpu
from bench.proxies import Started

NOISY = 10.0  # % of a core used by other programs during a measurement, from which it is marked noisy
CLIENT_BOUND = 0.90  # client core busy share from which a figure is marked client-bound
LINE_SLACK = 15.0  # seconds of slack on top of a phase's own duration when waiting for the generator


@dataclass(frozen=True)
class Params:
    tunnel_warmup: float
    tunnel_duration: float
    latency_duration: float
    bulk_bytes: int
    idle_count: int
    wrk_seconds: int
    concurrency: int = 16

    @classmethod
    def full(cls) -> Params:
        return cls(0.5, 5.0, 3.0, 4 << 30, 1000, 5)

    @classmethod
    def quick(cls) -> Params:
        return cls(0.2, 1.0, 0.5, 256 << 20, 200, 1)


@dataclass
class Bench:
    """What every phase needs: where to write, how long, which cores, which client binaries."""

    run_dir: Path
    params: Params
    proxy_core: int | None  # None on a one-core machine: nothing is pinned
    client_core: int | None
    loadc: Path | None  # the C generator, when it was built
    hello: Path  # the canned ClientHello for TLS_NAME
    wrk_script: Path

    @property
    def client_cpus(self) -> str | None:
        return None if self.client_core is None else str(self.client_core)

    @property
    def proxy_cpus(self) -> str | None:
        return None if self.proxy_core is None else str(self.proxy_core)


class Sampler:
    """CPU and core counters at one instant."""

    def __init__(self, bench: Bench, started: Started, load_pids: list[int]) -> None:
        self.t = time.monotonic()
        self.proxy_cpu = tree_cpu(started.proc.tree()) if started.proc else 0.0
        self.load_cpu = tree_cpu(load_pids)
        self.client_core = core_times(bench.client_core) if bench.client_core is not None else None
        self.proxy_core = core_times(bench.proxy_core) if bench.proxy_core is not None else None
        self.ours = tree_cpu(process_tree(os.getpid()))  # the runner and everything it started
        self.machine_ticks = all_cores_task_ticks()


def usage(a: Sampler, b: Sampler) -> dict[str, Any]:
    wall = max(b.t - a.t, 1e-9)
    out: dict[str, Any] = {
        "seconds": wall,
        "proxy_cpu_s": b.proxy_cpu - a.proxy_cpu,
        "proxy_cpu_pct": 100 * (b.proxy_cpu - a.proxy_cpu) / wall,
        "load_cpu_pct": 100 * (b.load_cpu - a.load_cpu) / wall,
    }
    if a.client_core and b.client_core:
        out["client_core_busy_pct"] = 100 * busy_share(a.client_core, b.client_core)
        out["client_bound"] = out["client_core_busy_pct"] >= 100 * CLIENT_BOUND
    if a.proxy_core and b.proxy_core:
        out["proxy_core_busy_pct"] = 100 * busy_share(a.proxy_core, b.proxy_core)
    # CPU that other programs on this machine used meanwhile (in % of one core): noise in the figure.
    foreign = (b.machine_ticks - a.machine_ticks) / CLK_TCK - (b.ours - a.ours)
    out["foreign_cpu_pct"] = max(0.0, 100 * foreign / wall)
    out["noisy"] = out["foreign_cpu_pct"] >= NOISY
    return out


def _proxy_arg(started: Started) -> str:
    return "direct" if started.address is None else f"{started.address[0]}:{started.address[1]}"


def _load_cmd(bench: Bench, mode: str, started: Started, target: str, *opts: str) -> list[str]:
    if bench.loadc is not None and mode in ("tunnels", "bulk"):
        head = [str(bench.loadc), mode]
    else:
        head = [sys.executable, "-m", "bench.load", mode]
    return [*head, "--proxy", _proxy_arg(started), "--target", target, *opts]


def _run_load(bench: Bench, started: Started, cmd: list[str], tag: str, budget: float) -> tuple[dict, dict]:
    """Run a generator to its result line, sampling at its markers; (result, usage between the markers)."""
    log = bench.run_dir / f"load-{tag}.log"
    proc = Proc(f"load-{tag}", cmd, log, cpus=bench.client_cpus, lines=True)
    deadline = time.monotonic() + budget + LINE_SLACK
    samples: dict[str, Sampler] = {}
    try:
        while True:
            line = proc.next_line(deadline - time.monotonic())
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.pop("event", None)
            if kind in ("measure_start", "measure_end"):
                samples[kind] = Sampler(bench, started, [proc.pid])
            elif kind == "result":
                break
    except BenchError as exc:
        raise BenchError(f"load generator ({tag}): {exc}\n{proc.log_tail()}") from None
    finally:
        proc.stop()
    if "error" in event:
        raise BenchError(f"load generator ({tag}): {event['error']}")
    if set(samples) != {"measure_start", "measure_end"}:
        raise BenchError(f"load generator ({tag}) never marked its measured interval")
    return event, usage(samples["measure_start"], samples["measure_end"])


def warm_up(started: Started) -> None:
    """One tunnel through the proxy (CONNECT, 200, a few bytes echoed), so lazy start-up work is done."""
    if started.address is None:
        return
    target = f"{scenario.IDLE_NAME}:{scenario.ECHO_PORT}"
    with socket.create_connection(started.address, timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        if head[9:12] != b"200":
            raise BenchError(f"warm-up CONNECT {target} got {head[:80]!r}")
        sock.sendall(b"ping")
        echoed = head.partition(b"\r\n\r\n")[2]
        while len(echoed) < 4:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError("warm-up tunnel closed before the echo")
            echoed += chunk


def idle_rss(bench: Bench, started: Started) -> dict[str, Any]:
    """RSS after start + one request; then with N idle tunnels open; KiB per tunnel from the difference."""
    if started.proc is None:
        return {}
    n = bench.params.idle_count
    base = started.proc.rss_kib()
    target = f"{scenario.IDLE_NAME}:{scenario.ECHO_PORT}"
    cmd = _load_cmd(bench, "idle", started, target, "--count", str(n), "--hold", "120")
    log = bench.run_dir / f"load-idle-{started.name}.log"
    proc = Proc(f"load-idle-{started.name}", cmd, log, cpus=bench.client_cpus, lines=True, stdin=True)
    try:
        ready = json.loads(_line_with(proc, "ready", 60 + n / 50))
        if ready.get("open") != n:
            raise BenchError(f"only {ready.get('open')} of {n} idle tunnels opened: {ready.get('errors')}")
        loaded = started.proc.rss_kib()
        proc.send("close\n")
        result = json.loads(_line_with(proc, "result", 30))
    except BenchError as exc:
        raise BenchError(f"idle tunnels: {exc}\n{proc.log_tail()}") from None
    finally:
        proc.stop()
    return {
        "idle_rss_mib": base / 1024,
        "rss_with_idle_mib": loaded / 1024,
        "idle_tunnels": n,
        "idle_kib_per_tunnel": (loaded - base) / n,
        "idle_opened": result.get("open", 0),
    }


def _line_with(proc: Proc, event: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = proc.next_line(deadline - time.monotonic())
        if f'"{event}"' in line:
            return line
        if '"result"' in line:
            raise BenchError(f"ended early: {line}")


def tunnels(bench: Bench, started: Started, concurrency: int, duration: float, tag: str) -> dict[str, Any]:
    """New tunnels per second with ``concurrency`` clients (TLS port: CONNECT, ClientHello, echo, close)."""
    p = bench.params
    target = f"{scenario.TLS_NAME}:{scenario.ECHO_TLS_PORT}"
    cmd = _load_cmd(
        bench, "tunnels", started, target, "--hello", str(bench.hello), "--concurrency", str(concurrency),
        "--warmup", str(p.tunnel_warmup), "--duration", str(duration), "--timeout", "10",
    )
    result, use = _run_load(bench, started, cmd, f"{tag}-{started.name}", p.tunnel_warmup + duration + 10)
    if not result.get("completed"):
        raise BenchError(f"no tunnel completed: errors {result.get('errors')}")
    out = {**result, **use}
    if started.proc is not None:
        out["cpu_us_per_tunnel"] = 1e6 * use["proxy_cpu_s"] / result["completed"]
    return out


def bulk(bench: Bench, started: Started) -> dict[str, Any]:
    """MiB/s of one download through one tunnel (non-TLS port: the bytes are relayed unread)."""
    target = f"{scenario.BULK_NAME}:{scenario.BULK_PORT}"
    budget = 120.0 * max(1, bench.params.bulk_bytes >> 32)
    cmd = _load_cmd(bench, "bulk", started, target, "--bytes", str(bench.params.bulk_bytes), "--timeout", str(budget))
    result, use = _run_load(bench, started, cmd, f"bulk-{started.name}", budget)
    return {**result, **use}


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise BenchError(f"cannot read wrk's output:\n{out[-800:]}")
    result: dict[str, Any] = {"rps": float(rps.group(1)), "requests": int(total.group(1))}
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[key] = _wrk_ms(match.group(1)) if match else None
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(map(int, errors.groups())) if errors else 0
    return result


def http(bench: Bench, started: Started) -> dict[str, Any]:
    """wrk -t1 -c16 --latency: absolute-form GETs through the proxy, or straight at the origin for direct.

    Without wrk, bench/load.py's http mode does the same (slower: it may be client-bound).
    """
    if shutil.which("wrk") is None:
        return _http_python(bench, started)
    seconds = bench.params.wrk_seconds
    cmd = ["wrk", "-t1", f"-c{bench.params.concurrency}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if started.address is None:
        cmd.append(f"http://127.0.0.1:{scenario.HTTP_PORT}/")
    else:
        cmd += ["-s", str(bench.wrk_script), f"http://{started.address[0]}:{started.address[1]}/"]
    if bench.client_cpus:
        cmd = ["taskset", "-c", bench.client_cpus, *cmd]
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    a = Sampler(bench, started, [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + 30}s") from None
    b = Sampler(bench, started, [])
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    (bench.run_dir / f"wrk-{started.name}.log").open("a").write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise BenchError(f"wrk exited {done.returncode}: {done.stderr.strip()[-400:]}")
    result = {**parse_wrk(done.stdout), **usage(a, b)}
    wrk_cpu = sum(getattr(after_children, f) - getattr(before_children, f) for f in ("ru_utime", "ru_stime"))
    result["load_cpu_pct"] = 100 * wrk_cpu / result["seconds"]
    result["foreign_cpu_pct"] = max(0.0, result["foreign_cpu_pct"] - result["load_cpu_pct"])  # wrk had exited
    result["noisy"] = result["foreign_cpu_pct"] >= NOISY
    if result["requests"] and result["non_2xx"] > 0.01 * result["requests"]:
        raise BenchError(f"{result['non_2xx']} of {result['requests']} wrk requests were not 2xx (denied?)")
    if not result["requests"]:
        raise BenchError(f"wrk completed no request; socket errors {result['socket_errors']}")
    return result


def _http_python(bench: Bench, started: Started) -> dict[str, Any]:
    p = bench.params
    target = f"{scenario.HTTP_NAME}:{scenario.HTTP_PORT}"
    cmd = _load_cmd(bench, "http", started, target, "--concurrency", str(p.concurrency), "--warmup", "0.2",
                    "--duration", str(p.wrk_seconds), "--timeout", "5")
    result, use = _run_load(bench, started, cmd, f"http-{started.name}", p.wrk_seconds + 10)
    if not result.get("requests"):
        raise BenchError(f"no HTTP request completed; socket errors {result.get('socket_errors')}")
    if result["non_2xx"] > 0.01 * result["requests"]:
        raise BenchError(f"{result['non_2xx']} of {result['requests']} requests were not 2xx (denied?)")
    return {**result, **use}
