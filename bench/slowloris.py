"""A normal client's latency while thousands of slow heads sit on egressd (the hostile-input issue's slowloris).

``python -m bench.slowloris [--slow 2000] [--addresses 20] [--requests 500] [--json PATH]``

egressd (pinned to core 0, ``--max-pending-heads`` at its default) and an echo origin (``bench.origin``, core
1); this process is the clients, on core 1. One client, sequentially: connect, ``CONNECT 127.0.0.1:<echo>``, the
200, 4 bytes echoed, close; its p50/p99 measured twice in one run: with nothing else connected, and while
``--slow`` connections from ``--addresses`` loopback addresses each hold half a request head (more than
``--max-pending-heads`` of them: past it egressd resets the oldest head of the address with the most, so the
attack keeps the slots full while it lasts). The report is the ratio under attack to idle, and how many slow
heads egressd reset.

An IP literal and a ``cidr:`` rule: no DNS, so the figure is the head handling and the relay alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import BenchError, Proc, port_open, wait_until
from bench.proxies import egressd_command

PROXY_PORT, ADMIN_PORT, ECHO_PORT = 18128, 18129, 18130
START_TIMEOUT = 30.0


def one_tunnel(timeout: float = 10.0) -> float:
    """Seconds from connect to the echo of 4 bytes through one new tunnel."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", PROXY_PORT), timeout=timeout) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{ECHO_PORT} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                raise BenchError(f"egressd closed the tunnel: {head!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"egressd refused the tunnel: {head!r}")
        sock.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += sock.recv(4 - len(got))
    return time.perf_counter() - started


def latencies(count: int) -> dict[str, float]:
    for _ in range(20):  # warm-up
        one_tunnel()
    samples = sorted(one_tunnel() for _ in range(count))
    return {"p50_ms": statistics.median(samples) * 1000, "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1000}


def hold_slow_heads(count: int, addresses: int) -> list[socket.socket]:
    """``count`` connections from 127.0.1.1 ... 127.0.1.<addresses>, each with half a request head sent."""
    held = []
    for n in range(count):
        sock = socket.socket()
        sock.bind((f"127.0.1.{n % addresses + 1}", 0))
        sock.connect(("127.0.0.1", PROXY_PORT))
        sock.sendall(b"CONNECT 127.0.0.1:")
        held.append(sock)
    return held


def resets(admin: int) -> float:
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith('egressd_limit_hits_total{limit="max_pending_heads"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slowloris")
    parser.add_argument("--slow", type=int, default=2000)
    parser.add_argument("--addresses", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.slow + 1024)), hard))
    if any(port_open("127.0.0.1", p) for p in (PROXY_PORT, ADMIN_PORT, ECHO_PORT)):
        raise BenchError(f"a port of {PROXY_PORT}, {ADMIN_PORT}, {ECHO_PORT} is taken")
    run = Path(tempfile.mkdtemp(prefix="egressd-slowloris-"))
    (run / "allowlists").mkdir()
    (run / "allowlists" / "svc.yaml").write_text(
        f"version: v1\nservice: svc\nallow:\n  - cidr: 127.0.0.1/32\n    ports: [{ECHO_PORT}]\n")
    procs = []
    try:
        origin = Proc("origin", [sys.executable, "-m", "bench.origin", "--echo", str(ECHO_PORT)], run / "origin.log",
                      cpus="1")
        procs.append(origin)
        egressd = Proc("egressd", [*egressd_command(), "run", "--workers", "1", "--service", "svc",
                                   "--listen", f"127.0.0.1:{PROXY_PORT}", "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
                                   "--allowlists", str(run / "allowlists"), "--allow-cidr", "127.0.0.0/8",
                                   "--audit-log", str(run / "audit.jsonl"), "--header-timeout", "120"],
                       run / "egressd.log", cpus="0")
        procs.append(egressd)
        for port, proc in ((ECHO_PORT, origin), (PROXY_PORT, egressd), (ADMIN_PORT, egressd)):
            wait_until(lambda p=port: port_open("127.0.0.1", p), START_TIMEOUT, f"port {port}", proc.alive)
        idle = latencies(args.requests)
        held = hold_slow_heads(args.slow, args.addresses)
        try:
            attacked = latencies(args.requests)
            reset = resets(ADMIN_PORT)
        finally:
            for sock in held:
                sock.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(run, ignore_errors=True)
    result = {"slow_heads": args.slow, "addresses": args.addresses, "requests": args.requests, "idle": idle,
              "under_attack": attacked, "slow_heads_reset": reset,
              "p50_ratio": attacked["p50_ms"] / idle["p50_ms"], "p99_ratio": attacked["p99_ms"] / idle["p99_ms"]}
    print(f"| | p50 ms | p99 ms |\n|---|---|---|\n| idle | {idle['p50_ms']:.3f} | {idle['p99_ms']:.3f} |\n"
          f"| {args.slow} slow heads from {args.addresses} addresses | {attacked['p50_ms']:.3f} | "
          f"{attacked['p99_ms']:.3f} |\n| ratio | {result['p50_ratio']:.2f} | {result['p99_ratio']:.2f} |\n"
          f"slow heads reset by --max-pending-heads: {reset:.0f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench.slowloris: {exc}", file=sys.stderr)
        sys.exit(1)
