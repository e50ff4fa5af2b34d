"""Real parts for the integration tests: the lab (DNS, origins) and egressd as a subprocess.

The proxy runs as ``python -m egressd run`` on ephemeral ports; it reports the
addresses it bound in its ``egressd.started`` log line, which :class:`ProxyProcess`
waits for (polling with a deadline, never sleeping blindly). Audit records go to
a file that the tests read.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEADLINE = 15.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Poll predicate until it returns something truthy; fail after timeout."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Clock:
    """A clock the test moves by hand (``clock.now += 5``); pass it where the code takes ``clock=``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_allowlists(directory: Path, files: dict[str, str]) -> Path:
    """Write {file name: YAML text} into directory (created), return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def stop_process(proc: subprocess.Popen, timeout: float = DEADLINE) -> int:
    """SIGTERM (if still running), wait up to ``timeout``, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout)


class ProxyProcess:
    """egressd run in a subprocess, with its audit log, stderr lines and admin endpoint."""

    def __init__(
        self,
        args: list[str],
        audit_path: Path | None,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
        stdout: int = subprocess.DEVNULL,
        command: str = "run",
    ) -> None:
        """``wrap`` is a command prefix (prlimit, a private mount namespace, ``ip netns exec``); without
        ``audit_path`` the records go to ``stdout``; ``command`` is ``run`` or ``sidecar``."""
        self.audit_path = audit_path
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        to_file = ["--audit-log", str(audit_path)] if audit_path is not None else []
        cmd = [*(wrap or []), sys.executable, "-m", "egressd", command, *to_file, *args]
        self.proc = subprocess.Popen(
            cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        started = self.wait_log("egressd.started")
        self.address: tuple[str, int] = tuple(started["listen"] or ())  # type: ignore[assignment]  # () if off
        self.admin: tuple[str, int] = tuple(started["admin"][0])  # type: ignore[assignment]
        self.dns: list[tuple[str, int]] = [tuple(a) for a in started.get("dns", [])]  # type: ignore[misc]

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_log(self, event: str, timeout: float = DEADLINE) -> dict:
        """Wait for an operational log line with this event name and return it parsed."""
        for line in self.stderr_lines:
            parsed = _json(line)
            if parsed.get("event") == event:
                return parsed
        end = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                stderr = "".join(self.stderr_lines)
                raise AssertionError(f"no {event!r} log line within {timeout}s; stderr:\n{stderr}") from None
            if line is None:
                stderr = "".join(self.stderr_lines)
                raise AssertionError(f"egressd exited ({self.proc.wait()}) before {event!r}:\n{stderr}")
            if _json(line).get("event") == event:
                return _json(line)

    def records(self) -> list[dict]:
        if self.audit_path is None or not self.audit_path.exists():
            return []
        lines = [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]
        return [r for r in lines if r.get("event") != "egress.checkpoint"]  # records, not the chain's checkpoints

    def wait_records(self, n: int, timeout: float = DEADLINE) -> list[dict]:
        """Wait until at least n audit records exist; return all of them."""
        return wait_for(lambda: (r := self.records()) and len(r) >= n and r, timeout, f"{n} audit records")

    def metrics(self) -> str:
        return http_get(self.admin, "/metrics")[1]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample, 0 when absent."""
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                sample, value = line.rsplit(" ", 1)
                if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                    return float(value)
        return 0.0

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = DEADLINE) -> int:
        return stop_process(self.proc, timeout)


def _json(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = recv_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def recv_all(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def raw_request(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes to the proxy, return everything it answers until it closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        return recv_all(sock)


def connect_tunnel(address: tuple[str, int], authority: str, timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    """Open a CONNECT tunnel; return the socket and the proxy's response head."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    return sock, recv_head(sock, size=1)


def recv_head(sock: socket.socket, size: int = 65536) -> bytes:
    """Read until a message head is complete (or the peer closes); ``size=1`` reads nothing past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(size)
        if not chunk:
            break
        data += chunk
    return data
