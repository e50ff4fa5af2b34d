"""The load generator: uvloop Protocols, one process, run pinned to the client core.

``python -m bench.load MODE --proxy HOST:PORT|direct --target NAME:PORT ...``

``tunnels``
    ``--concurrency`` loops, each: connect, ``CONNECT name:port``, read the
    200, send a canned TLS ClientHello for ``name``, read its echo, close.
    Completions are counted in a window of ``--duration`` seconds after
    ``--warmup``; each one's latency (connect to echo) is kept for p50/p99.
    ``direct`` connects to the origin and sends the ClientHello straight away.
``bulk``
    One tunnel; asks the source origin for ``--bytes`` bytes and discards them
    into one reused buffer (BufferedProtocol: no allocation per read).
``idle``
    Opens ``--count`` tunnels (CONNECT + 200, nothing more), prints ``ready``,
    holds them until a line arrives on stdin, closes them.
``http``
    The fallback when wrk is not installed: ``--concurrency`` keep-alive
    connections each sending ``GET http://NAME:PORT/`` (absolute form, through
    the proxy; origin form for direct) one after another for ``--duration``
    seconds; reconnects when the server closes. Responses must carry
    Content-Length.

Protocol with the runner: JSON lines on stdout. ``measure_start`` and
``measure_end`` mark the measured interval (the runner samples the proxy's CPU
on each), ``ready`` (idle mode) says the tunnels are open, and ``result`` is
the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import ssl
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

MAX_HEAD = 8192
_now = time.perf_counter


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def client_hello(name: str) -> bytes:
    """The first flight of a TLS client connecting to ``name`` (SNI = name), made once in memory."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


class Failed(Exception):
    """A tunnel that did not complete: the message is its error class."""


class Tunnel(asyncio.Protocol):
    """CONNECT (unless direct), then send ``payload`` and wait for as many bytes back; None payload: stop at 200."""

    def __init__(self, connect: bytes | None, payload: bytes | None, done: asyncio.Future[None]) -> None:
        self.connect = connect
        self.payload = payload
        self.done = done
        self.in_head = connect is not None
        self.head = b""
        self.got = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.connect is not None:
            transport.write(self.connect)  # type: ignore[attr-defined]
        else:
            self._established(0)

    def data_received(self, data: bytes) -> None:
        if not self.in_head:
            self.got += len(data)
            self._check()
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD:
                self._finish(Failed("head too large"))
            return
        status = self.head[9:12]
        if status != b"200":
            self._finish(Failed(f"status {status.decode(errors='replace') or 'none'}"))
            return
        self.in_head = False
        self._established(len(self.head) - end - 4)

    def _established(self, extra: int) -> None:
        if self.payload is None:
            self._finish(None)
            return
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self.got = extra
        self._check()

    def _check(self) -> None:
        if self.payload is not None and self.got >= len(self.payload):
            self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(Failed("closed early" if exc is None else type(exc).__name__))


def _route(args: argparse.Namespace) -> tuple[tuple[str, int], bytes | None]:
    """Where to connect, and the CONNECT request (None for direct)."""
    name, port = args.target.rsplit(":", 1)
    if args.proxy == "direct":
        return (args.origin_host, int(port)), None
    host, proxy_port = args.proxy.rsplit(":", 1)
    request = f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode()
    return (host, int(proxy_port)), request


async def open_tunnel(
    address: tuple[str, int], connect: bytes | None, payload: bytes | None, timeout: float
) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: Tunnel(connect, payload, done), *address)
            await done
    except TimeoutError:
        if transport is not None:
            transport.abort()
        raise Failed("timeout") from None
    except OSError as exc:
        raise Failed(type(exc).__name__) from None
    except Failed:
        if transport is not None:
            transport.abort()
        raise
    return transport  # type: ignore[return-value]


async def tunnels(args: argparse.Namespace) -> dict[str, Any]:
    address, connect = _route(args)
    hello = args.hello_bytes or client_hello(args.target.rsplit(":", 1)[0])
    loop = asyncio.get_running_loop()
    t0 = _now()
    start, end = t0 + args.warmup, t0 + args.warmup + args.duration
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    opened = 0
    loop.call_at(loop.time() + args.warmup, emit, "measure_start")
    loop.call_at(loop.time() + args.warmup + args.duration, emit, "measure_end")

    async def worker() -> None:
        nonlocal opened
        while (began := _now()) < end:
            opened += 1
            try:
                transport = await open_tunnel(address, connect, hello, args.timeout)
            except Failed as exc:
                errors[str(exc)] += 1
                continue
            finished = _now()
            transport.close()
            if start <= finished < end:
                latencies.append(finished - began)

    pending = await _run_workers(worker, args)
    return {
        "completed": len(latencies),
        "per_s": len(latencies) / args.duration,
        **latency_ms(latencies),
        "opened": opened,
        "errors": dict(errors),
        "stuck_workers": len(pending),
    }


async def _run_workers(worker: Any, args: argparse.Namespace) -> set[asyncio.Task]:
    """Run args.concurrency copies of worker() for the measured window; cancel and return any still stuck."""
    loop = asyncio.get_running_loop()
    workers = [loop.create_task(worker()) for _ in range(args.concurrency)]
    _, pending = await asyncio.wait(workers, timeout=args.warmup + args.duration + args.timeout + 5)
    for task in pending:
        task.cancel()
    return pending


def latency_ms(latencies: list[float]) -> dict[str, float | None]:
    """p50_ms and p99_ms of latencies in seconds (sorted here)."""
    latencies.sort()
    return {"p50_ms": _ms(percentile(latencies, 0.50)), "p99_ms": _ms(percentile(latencies, 0.99))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


class BulkClient(asyncio.BufferedProtocol):
    """Reads a CONNECT response head, then asks for ``total`` bytes and counts them into one reused buffer."""

    def __init__(self, connect: bytes | None, total: int, done: asyncio.Future[float]) -> None:
        self.connect = connect
        self.total = total
        self.done = done
        self.buffer = bytearray(1 << 20)
        self.view = memoryview(self.buffer)
        self.head: bytes | None = b"" if connect is not None else None
        self.got = 0
        self.began = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.connect is not None:
            transport.write(self.connect)  # type: ignore[attr-defined]
        else:
            self._ask()

    def _ask(self) -> None:
        emit("measure_start")
        self.began = _now()
        self.transport.write(f"SEND {self.total}\n".encode())  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.head is None:
            self.got += nbytes
        else:
            self.head += bytes(self.view[:nbytes])
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD and not self.done.done():
                    self.done.set_exception(Failed("head too large"))
                return
            status = self.head.split(b"\r\n", 1)[0]
            if status[9:12] != b"200":
                if not self.done.done():
                    self.done.set_exception(Failed(f"status {status[9:12].decode(errors='replace')}"))
                return
            self.got = len(self.head) - end - 4
            self.head = None
            self._ask()
        if self.got >= self.total and not self.done.done():
            elapsed = _now() - self.began
            emit("measure_end")
            self.done.set_result(elapsed)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(Failed(f"closed after {self.got} bytes"))


async def bulk(args: argparse.Namespace) -> dict[str, Any]:
    address, connect = _route(args)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    transport = None
    try:
        async with asyncio.timeout(args.timeout):
            transport, _ = await loop.create_connection(lambda: BulkClient(connect, args.bytes, done), *address)
            elapsed = await done
    except TimeoutError:
        raise Failed(f"timeout after {args.timeout:g}s") from None
    finally:
        if transport is not None:
            transport.close()
    return {"bytes": args.bytes, "seconds": elapsed, "mib_per_s": args.bytes / elapsed / (1 << 20)}


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    address, connect = _route(args)
    loop = asyncio.get_running_loop()
    held: list[asyncio.Transport] = []
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(args.parallel)

    async def one() -> None:
        async with gate:
            try:
                held.append(await open_tunnel(address, connect, None, args.timeout))
            except Failed as exc:
                errors[str(exc)] += 1

    await asyncio.gather(*(one() for _ in range(args.count)))
    emit("ready", open=len(held), errors=dict(errors))
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.hold)
    still_open = sum(1 for t in held if not t.is_closing())
    for transport in held:
        transport.close()
    return {"open": len(held), "still_open_at_close": still_open, "errors": dict(errors), "told": line.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("mode", choices=("tunnels", "bulk", "idle", "http"))
    parser.add_argument("--proxy", required=True, help="HOST:PORT of the proxy, or 'direct'")
    parser.add_argument("--target", required=True, help="NAME:PORT to CONNECT to")
    parser.add_argument("--origin-host", default="127.0.0.1", help="where NAME is, for direct")
    parser.add_argument("--hello", help="file with the ClientHello to send (default: made for NAME)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per tunnel (bulk: the whole transfer)")
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=64, help="idle: tunnels being opened at once")
    parser.add_argument("--hold", type=float, default=120.0, help="idle: longest wait for the close line")
    args = parser.parse_args(argv)
    args.hello_bytes = Path(args.hello).read_bytes() if args.hello else None
    from bench.load_http import http

    mode = {"tunnels": tunnels, "bulk": bulk, "idle": idle, "http": http}[args.mode]
    try:
        result = uvloop.run(mode(args))
    except (Failed, TimeoutError) as exc:
        emit("result", error=str(exc) or type(exc).__name__)
        return 1
    emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
