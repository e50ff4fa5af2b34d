"""What the leak benchmarks run against and how they watch it: the DNS server, the echo origin, egressd, the load
generators, and snapshots of egressd's RSS, descriptors, records and active connections.

Processes are :class:`bench.procs.Proc` (pinned, logged, stopped by PID); the
DNS server is the lab's, on a thread of this process; the echo origin is
``loadc echo`` (``bench/origin.py`` without a C compiler). Every wait polls
with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import leaks_report, proxies, records, runner, scenario
from bench.procs import BenchError, Proc, port_open, tree_rss, wait_until
from egressd import fdlimit
from egressd.lab import DnsServer, LabThread

PROXY = f"127.0.0.1:{scenario.EGRESSD_PORT}"
POLL = 0.2  # seconds between two looks at egressd while waiting for it
QUIET_TIMEOUT = 30.0  # seconds for egressd to write its records and close everything after a warm-up
RSS_STEADY_KIB = 64  # two looks POLL apart whose RSS differ by no more than this: the RSS holds still
TUNNEL_TIMEOUT = 30.0  # seconds one tunnel may take before the generator counts it as failed
_COUNTED = b'"egress.connection"'  # the event of a connection record, in each of its lines and nowhere else


@dataclass(frozen=True, slots=True)
class Snapshot:
    rss_kib: int
    fds: int
    records: int
    active: float | None  # egressd_active_connections; None when /metrics did not answer


class World:
    """The session's helpers, and the operations the scenarios are written in."""

    def __init__(self, run_dir: Path, proxy_core: int | None, client_core: int | None) -> None:
        self.run_dir = run_dir
        self.proxy_cpus = None if proxy_core is None else str(proxy_core)
        self.client_cpus = None if client_core is None else str(client_core)
        self.payload = (run_dir / "hello.bin").read_bytes()  # a ClientHello for TLS_NAME (runner.write_world)
        self.helpers: list[Proc] = []
        self.lab: LabThread | None = None
        self.dns: tuple[str, int] = ("127.0.0.1", 0)
        self._n = 0

    def start(self, check_ports: bool) -> dict[str, Any]:
        ports = (scenario.EGRESSD_PORT, scenario.ECHO_TLS_PORT, scenario.ECHO_PORT)
        if check_ports and (busy := [p for p in ports if port_open("127.0.0.1", p)]):
            raise BenchError(f"ports {busy} are in use on 127.0.0.1 (outside a private namespace): free them or "
                             "run as root")
        self.lab = LabThread().start()
        self.dns = self.lab.serve(DnsServer({name: ("127.0.0.1",) for name in scenario.NAMES}, ttl=300)).address
        loadc = runner.build_loadc(self.run_dir)
        echo_ports = [str(scenario.ECHO_TLS_PORT), str(scenario.ECHO_PORT)]
        if loadc is not None:
            cmd = [str(loadc), "echo", "--port", echo_ports[0], "--port", echo_ports[1]]
        else:
            cmd = [sys.executable, "-m", "bench.origin", "--echo", echo_ports[0], "--echo", echo_ports[1]]
        echo = Proc("echo", cmd, self.run_dir / "echo.log", cpus=self.client_cpus, lines=True)
        self.helpers.append(echo)
        if '"ready"' not in echo.next_line(runner.SETUP_TIMEOUT):
            raise BenchError(f"the echo origin did not start:\n{echo.log_tail()}")
        return {
            "pinning": {"proxy_core": self.proxy_cpus, "client_core": self.client_cpus},
            "echo_origin": "bench/loadc.c echo (C, epoll)" if loadc else "bench/origin.py (uvloop)",
            "load_generators": "bench/leaks_load.py (uvloop) for short tunnels, bench/load.py idle for idle ones",
            "fd_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        }

    def stop(self) -> None:
        for proc in reversed(self.helpers):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                runner.log(f"stopping {proc.name}: {exc}")
        if self.lab is not None:
            self.lab.stop()

    def start_egressd(self, tag: str, max_connections: int | None = None) -> proxies.Started:
        """egressd on the proxy core, one worker, its audit log on the run directory; the connection caps raised
        to ``max_connections`` (every client here is 127.0.0.1) when given."""
        log, audit = self.run_dir / f"egressd-{tag}.log", self.run_dir / f"egressd-{tag}.audit.jsonl"
        cmd = [
            *proxies.egressd_command(), "run", "--workers", "1", "--listen", PROXY, "--admin-listen", "127.0.0.1:0",
            "--allowlists", str(self.run_dir / "allowlists"), "--service", scenario.SERVICE,
            "--resolver", f"{self.dns[0]}:{self.dns[1]}", "--allow-cidr", "127.0.0.0/8", "--audit-log", str(audit),
        ]
        if max_connections is not None:
            cmd += ["--max-connections", str(max_connections), "--max-connections-per-client", str(max_connections)]
        proc = Proc(f"egressd-{tag}", cmd, log, cpus=self.proxy_cpus)
        started = proxies.Started("egressd", proc, ("127.0.0.1", scenario.EGRESSD_PORT), [log], audit)
        try:
            line = wait_until(lambda: proxies._started_line(log), proxies.START_TIMEOUT,
                              "egressd's 'egressd.started' line", proc.alive)
        except BenchError as exc:
            proc.stop()
            raise BenchError(f"egressd did not start: {exc}\n{started.log_tails()}") from None
        admin = line.get("admin") or []
        started.admin = tuple(admin[0]) if admin else None  # type: ignore[assignment]
        return started

    def snapshot(self, started: proxies.Started) -> Snapshot:
        """RSS, descriptors and records first, then /metrics (whose connection would otherwise be counted)."""
        pid = _pid(started)
        rss, fds, written = tree_rss([pid]), _fds(pid), _count_records(started)
        metrics = records._metrics(started.admin) if started.admin is not None else {"error": "no admin listener"}
        return Snapshot(rss, fds, written, None if "error" in metrics else metrics.get("active_connections", 0.0))

    def quiesce(self, started: proxies.Started, expected: int) -> Snapshot:
        """The start values: once ``expected`` records are written, nothing is active, and the descriptors and
        the RSS hold still between two looks; BenchError after QUIET_TIMEOUT."""
        now, _, quiet = self.settle(started, expected, None, QUIET_TIMEOUT)
        if not quiet:
            raise BenchError(f"egressd did not settle within {QUIET_TIMEOUT:g}s after the warm-up: {now}, "
                             f"{expected} records expected\n{started.log_tails()}")
        return now

    def settle(self, started: proxies.Started, expected: int, fds: int | None,
               timeout: float) -> tuple[Snapshot, float, bool]:
        """Poll until the descriptors are back to ``fds`` (or, None, the same in two looks), ``expected`` records
        are written, nothing is active and the RSS holds still (when many connections close at once, RSS drops
        a moment after the last record is written), or ``timeout`` s pass: the last snapshot, the seconds it
        took, and whether it settled."""
        t0 = time.monotonic()
        last = self.snapshot(started)
        while True:
            time.sleep(POLL)
            now = self.snapshot(started)
            waited = round(time.monotonic() - t0, 2)
            steady = abs(now.rss_kib - last.rss_kib) <= RSS_STEADY_KIB and (fds is not None or now.fds == last.fds)
            quiet = now.records >= expected and now.active == 0 and (fds is None or now.fds == fds)
            if steady and quiet:
                return now, waited, True
            if waited > timeout:
                return now, waited, False
            last = now

    def audit_of(self, started: proxies.Started, expected: int, byte_counts: frozenset[int]) -> dict[str, Any]:
        assert started.audit is not None
        found = leaks_report.check_records(started.audit.read_bytes().splitlines(), expected, byte_counts)
        return {"records": found.as_dict(), **records.log_problems(started)}

    def _load(self, mode: str, target: str, *options: str) -> Proc:
        self._n += 1
        cmd = [sys.executable, "-m", "bench.leaks_load", mode, "--proxy", PROXY, "--target", target,
               "--payload", str(self.run_dir / "hello.bin"), "--timeout", str(TUNNEL_TIMEOUT), *options]
        return Proc(f"load-{self._n}", cmd, self.run_dir / f"load-{self._n}-{mode}.log", cpus=self.client_cpus,
                    lines=True)

    def batch(self, started: proxies.Started, target: str, count: int, concurrency: int) -> dict[str, Any]:
        """``count`` short tunnels, ``concurrency`` in flight; the generator's result."""
        if count == 0:
            return {"started": 0, "connected": 0, "completed": 0, "skipped": 0, "errors": {}, "per_s": 0.0}
        proc = self._load("count", target, "--count", str(count), "--concurrency", str(concurrency))
        try:  # allow 1 ms per tunnel and a minute besides: far slower than any proxy worth measuring
            return self.wait_event(proc, "result", 60 + count / 1000, started)
        finally:
            proc.stop()

    def soak(self, started: proxies.Started, target: str, rate: float, duration: float,
             every: float) -> tuple[dict[str, Any], list[tuple[float, int, int]]]:
        """A steady rate for ``duration`` s; (the generator's result, [(seconds, RSS KiB, fds)] every ``every`` s)."""
        proc = self._load("rate", target, "--rate", str(rate), "--duration", str(duration))
        samples: list[tuple[float, int, int]] = []
        t0 = time.monotonic()
        deadline = t0 + duration + TUNNEL_TIMEOUT + 60
        try:
            while True:
                now = time.monotonic()
                due, sampling = t0 + len(samples) * every, len(samples) * every <= duration + 1e-6
                if sampling and now >= due:
                    pid = _pid(started)
                    samples.append((round(now - t0, 2), tree_rss([pid]), _fds(pid)))
                    continue
                if now > deadline:
                    raise BenchError(f"the soak's load generator did not finish within {deadline - t0:.0f}s")
                line = _line(proc, max(0.01, min(due if sampling else deadline, deadline) - now))
                if line is not None and line.get("event") == "result":
                    return line, samples
        finally:
            proc.stop()

    @contextlib.contextmanager
    def idle_client(self, started: proxies.Started, count: int) -> Iterator[Proc]:
        """``bench.load idle``: ``count`` tunnels opened and held until a line on its stdin."""
        cmd = [sys.executable, "-m", "bench.load", "idle", "--proxy", PROXY,
               "--target", f"{scenario.IDLE_NAME}:{scenario.ECHO_PORT}", "--count", str(count),
               "--parallel", "64", "--timeout", str(TUNNEL_TIMEOUT), "--hold", "600"]
        proc = Proc("idle-client", cmd, self.run_dir / "idle-client.log", cpus=self.client_cpus, lines=True,
                    stdin=True)
        try:
            yield proc
        finally:
            proc.stop()

    def wait_event(self, proc: Proc, event: str, timeout: float,
                   started: proxies.Started | None = None) -> dict[str, Any]:
        """The next JSON line of ``proc`` whose event is ``event``; BenchError after ``timeout`` s, or when the
        process ends first, or when egressd (``started``) exits meanwhile."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if started is not None and started.proc is not None and not started.proc.alive():
                raise BenchError(f"egressd exited ({started.proc.popen.returncode}):\n{started.log_tails()}")
            line = _line(proc, min(left, 1.0))
            if line is not None and line.get("event") == event:
                if "error" in line:
                    raise BenchError(f"{proc.name}: {line['error']}\n{proc.log_tail()}")
                return line
        raise BenchError(f"{proc.name}: no '{event}' line within {timeout:g}s\n{proc.log_tail()}")


def check_room(started: proxies.Started, tunnels: int) -> None:
    """BenchError unless egressd's descriptor limit leaves room for ``tunnels`` connections at once."""
    pid = _pid(started)
    soft = _nofile(pid)
    fds = _fds(pid)
    room = fdlimit.connection_capacity(soft, fds)
    if room < tunnels:
        need = tunnels * fdlimit.PER_CONNECTION + fdlimit.RESERVE + fds
        raise BenchError(
            f"egressd can hold {room} connections under its descriptor limit of {soft} ({fds} open, "
            f"{fdlimit.PER_CONNECTION} per connection, {fdlimit.RESERVE} kept back), not {tunnels}: raise the "
            f"hard nofile limit to at least {need} (ulimit -Hn {need} in a root shell with CAP_SYS_RESOURCE, "
            f"or the container's nofile) or pass --idle-count {room}")


def _line(proc: Proc, timeout: float) -> dict[str, Any] | None:
    """One JSON line from ``proc`` within ``timeout`` s (None: none yet, or not JSON); BenchError once it ended."""
    try:
        raw = proc.lines.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return None
    if raw is None:
        raise BenchError(f"{proc.name} exited ({proc.popen.wait(5)}) before its result:\n{proc.log_tail()}")
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _pid(started: proxies.Started) -> int:
    assert started.proc is not None
    if not started.proc.alive():
        raise BenchError(f"egressd exited ({started.proc.popen.returncode}):\n{started.log_tails()}")
    return started.proc.pid


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as exc:
        raise BenchError(f"cannot count egressd's descriptors in /proc/{pid}/fd: {exc}") from None


def _nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise BenchError(f"no 'Max open files' line in /proc/{pid}/limits")


def _count_records(started: proxies.Started) -> int:
    assert started.audit is not None
    try:
        return started.audit.read_bytes().count(_COUNTED)
    except FileNotFoundError:
        return 0
