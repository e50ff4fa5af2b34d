"""Starting the systems under test: egressd, Squid, tinyproxy, and "direct" (no proxy at all).

Each launcher writes nothing but its own log files in the run directory,
starts the proxy pinned to the proxy core(s), and returns once it accepts
connections (egressd: its ``egressd.started`` line; the others: the port
accepts), or raises BenchError with the tail of the proxy's log.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import scenario
from bench.procs import BenchError, Proc, port_open, run_bounded, tail, wait_until

START_TIMEOUT = 30.0  # seconds for a proxy to start accepting


@dataclass
class Started:
    """A running system under test (``proc`` None for direct)."""

    name: str
    proc: Proc | None
    address: tuple[str, int] | None
    logs: list[Path] = field(default_factory=list)  # the files to show the tail of when something fails
    audit: Path | None = None  # egressd's audit records, Squid's access.log, tinyproxy's log
    admin: tuple[str, int] | None = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log_tails(self, lines: int = 12) -> str:
        parts = []
        for path in self.logs:
            text = tail(path, lines)
            if text:
                parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)


def egressd_command() -> list[str]:
    """``egressd`` next to this interpreter (the venv's), else ``python -m egressd``."""
    script = Path(sys.executable).with_name("egressd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "egressd"]


def egressd_has_workers() -> bool:
    """Whether ``egressd run`` takes ``--workers`` (added separately; skip that figure when absent)."""
    try:
        out = subprocess.run([*egressd_command(), "run", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--workers" in out.stdout


def start_egressd(
    run_dir: Path, tag: str, cpus: str | None, dns: tuple[str, int], workers: int | None
) -> Started:
    log = run_dir / f"egressd-{tag}.log"
    audit = run_dir / f"egressd-{tag}.audit.jsonl"
    cmd = [
        *egressd_command(), "run",
        "--listen", f"127.0.0.1:{scenario.EGRESSD_PORT}",
        "--admin-listen", "127.0.0.1:0",
        "--allowlists", str(run_dir / "allowlists"),
        "--service", scenario.SERVICE,
        "--resolver", f"{dns[0]}:{dns[1]}",
        "--allow-cidr", "127.0.0.0/8",
        "--audit-log", str(audit),
    ]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    proc = Proc(f"egressd-{tag}", cmd, log, cpus=cpus)
    started = Started("egressd", proc, ("127.0.0.1", scenario.EGRESSD_PORT), [log], audit)
    try:
        line = wait_until(lambda: _started_line(log), START_TIMEOUT, "egressd's 'egressd.started' line", proc.alive)
    except BenchError as exc:
        proc.stop()
        raise BenchError(f"egressd did not start: {exc}\n{started.log_tails()}") from None
    admin = line.get("admin") or []
    started.admin = tuple(admin[0]) if admin else None  # type: ignore[assignment]
    return started


def _started_line(log: Path) -> dict[str, Any] | None:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if '"egressd.started"' in line:
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _squid_user() -> str | None:
    try:
        return pwd.getpwnam("proxy").pw_name
    except KeyError:
        return None


def start_squid(run_dir: Path, tag: str, cpus: str | None) -> Started:
    binary = shutil.which("squid") or "/usr/sbin/squid"
    if not os.path.exists(binary):
        raise BenchError("squid is not installed (apt-get install -y squid)")
    if os.geteuid() != 0:
        raise BenchError("squid needs root here (it switches to the 'proxy' user); run the benchmark as root")
    conf = run_dir / f"squid-{tag}.conf"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    conf.write_text(scenario.squid_conf(run_dir, tag, max_fds=min(soft, 65536)))
    access, cache = run_dir / f"squid-{tag}-access.log", run_dir / f"squid-{tag}-cache.log"
    user = _squid_user()
    for path in (access, cache):
        path.touch()
        if user:
            shutil.chown(path, user)
    log = run_dir / f"squid-{tag}.out"
    check = run_bounded([binary, "-k", "parse", "-f", str(conf)], 30, log)
    if check.returncode != 0:
        raise BenchError(f"squid -k parse failed:\n{tail(log)}")
    proc = Proc(f"squid-{tag}", [binary, "-N", "-f", str(conf)], log, cpus=cpus)
    started = Started("squid", proc, ("127.0.0.1", scenario.SQUID_PORT), [log, cache], access)
    _wait_port(started)
    return started


def start_tinyproxy(run_dir: Path, tag: str, cpus: str | None) -> Started:
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not os.path.exists(binary):
        raise BenchError("tinyproxy is not installed (apt-get install -y tinyproxy)")
    conf = run_dir / f"tinyproxy-{tag}.conf"
    conf.write_text(scenario.tinyproxy_conf(run_dir, tag))
    log, main_log = run_dir / f"tinyproxy-{tag}.out", run_dir / f"tinyproxy-{tag}.log"
    proc = Proc(f"tinyproxy-{tag}", [binary, "-d", "-c", str(conf)], log, cpus=cpus)
    started = Started("tinyproxy", proc, ("127.0.0.1", scenario.TINYPROXY_PORT), [log, main_log], main_log)
    _wait_port(started)
    return started


def _wait_port(started: Started) -> None:
    assert started.proc is not None and started.address is not None
    proc, (host, port) = started.proc, started.address
    try:
        wait_until(lambda: port_open(host, port), START_TIMEOUT, f"{started.name} to accept on {port}", proc.alive)
    except BenchError as exc:
        proc.stop()
        raise BenchError(f"{started.name} did not start: {exc}\n{started.log_tails()}") from None


def lines_of(path: Path) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def start(name: str, run_dir: Path, tag: str, cpus: str | None, dns: tuple[str, int], workers: int | None) -> Started:
    if name == "direct":
        return Started("direct", None, None)
    if name == "egressd":
        return start_egressd(run_dir, tag, cpus, dns, workers)
    if name == "squid":
        return start_squid(run_dir, tag, cpus)
    if name == "tinyproxy":
        return start_tinyproxy(run_dir, tag, cpus)
    raise BenchError(f"unknown system {name!r}")
