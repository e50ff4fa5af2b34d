"""Processes the runner starts: pinned with taskset, logged to a file, waited for with deadlines, killed by PID.

Accounting reads /proc: CPU is utime+stime (all threads, every process in
the tree under the PID we started), memory is VmRSS summed over that tree, and
a core's busy share comes from its line in /proc/stat.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT = 5.0  # seconds a process gets after SIGTERM before SIGKILL


class BenchError(Exception):
    """A phase failed: the message says which program and what; the runner records it and goes on."""


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, alive: Callable[[], bool] = lambda: True
) -> Any:
    """Poll ``predicate`` every 10 ms until it is truthy; BenchError after ``timeout`` s or if ``alive()`` fails."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if not alive():
            raise BenchError(f"exited while waiting for {what}")
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """One started program: its PID, its log file, and (optionally) its stdout lines as a queue."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log: Path,
        cpus: str | None = None,
        lines: bool = False,
        stdin: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self.cmd = (["taskset", "-c", cpus] if cpus else []) + list(cmd)
        self._log_file: IO[bytes] = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.popen = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE if lines else self._log_file,
            stderr=self._log_file,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: a stray child can be found and killed
        )
        self.pid = self.popen.pid
        if lines:
            threading.Thread(target=self._pump, name=f"{name}-stdout", daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def next_line(self, timeout: float) -> str:
        """The next stdout line; BenchError on timeout or end of output."""
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise BenchError(f"{self.name}: no output within {timeout:g}s") from None
        if line is None:
            raise BenchError(f"{self.name}: exited ({self.popen.wait(STOP_TIMEOUT)}) before answering")
        return line

    def send(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode())
        self.popen.stdin.flush()

    def tree(self) -> list[int]:
        return process_tree(self.pid) if self.alive() else []

    def cpu_seconds(self) -> float:
        return tree_cpu(self.tree())

    def rss_kib(self) -> int:
        return tree_rss(self.tree())

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT, for this PID and the descendants it had."""
        try:
            if self.alive():
                descendants = [p for p in process_tree(self.pid) if p != self.pid]
                _signal(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _signal(self.pid, signal.SIGKILL)
                    self.popen.wait(STOP_TIMEOUT)
                for pid in descendants:  # helpers that outlived their parent
                    _signal(pid, signal.SIGKILL)
            return self.popen.returncode
        finally:
            if self.popen.stdin:
                try:
                    self.popen.stdin.close()
                except OSError:
                    pass
            self._log_file.close()

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log, lines)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants now alive."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu(pids: Sequence[int]) -> float:
    """utime + stime, seconds, summed over ``pids`` (each counts all its threads, the exited ones too)."""
    total = 0
    for pid in pids:
        if fields := _stat_fields(pid):
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def tree_rss(pids: Sequence[int]) -> int:
    """VmRSS in KiB summed over ``pids``."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass(frozen=True, slots=True)
class CoreTimes:
    busy: int
    total: int


def core_times(core: int) -> CoreTimes:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]  # idle + iowait
            return CoreTimes(sum(values) - idle, sum(values))
    raise BenchError(f"no cpu{core} line in /proc/stat")


def all_cores_task_ticks() -> int:
    """user + nice + system ticks of all cores together: the time tasks ran (irq/softirq excluded)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:4]]
            return sum(values)
    raise BenchError("no cpu line in /proc/stat")


def busy_share(before: CoreTimes, after: CoreTimes) -> float:
    total = after.total - before.total
    return (after.busy - before.busy) / total if total > 0 else 0.0


def run_bounded(cmd: Sequence[str], timeout: float, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion with a timeout; BenchError if it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cmd[0]} did not finish within {timeout:g}s") from None
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    return done
