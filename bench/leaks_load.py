"""The leak benchmarks' load generator: a counted batch, or a steady rate, of short tunnels (uvloop, one process).

``python -m bench.leaks_load MODE --proxy HOST:PORT --target NAME:PORT --payload FILE ...``

``count``
    ``--count`` tunnels, at most ``--concurrency`` in flight; each: connect,
    ``CONNECT name:port``, read the 200, send the payload, read its echo, close.
``rate``
    One tunnel started every 1/``--rate`` s for ``--duration`` s, whatever the
    others are doing (open loop), at most ``--max-inflight`` at once: a start
    that finds that many still open is counted as ``skipped``, not queued, so
    the rate stays steady and memory stays bounded.

Both print one JSON line ``{"event": "result", ...}``: ``connected`` is the
count of TCP connections the proxy accepted (each must have exactly one
audit record), ``completed`` those whose echo came back whole, ``errors`` the
others by cause. The tunnel itself is :class:`bench.load.Tunnel`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from bench.load import Failed, Tunnel, emit


@dataclass
class Tally:
    """What the tunnels did so far."""

    started: int = 0
    connected: int = 0
    completed: int = 0
    skipped: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def result(self) -> dict[str, Any]:
        return {"started": self.started, "connected": self.connected, "completed": self.completed,
                "skipped": self.skipped, "errors": dict(self.errors)}


@dataclass(frozen=True)
class Route:
    address: tuple[str, int]
    connect: bytes
    payload: bytes
    timeout: float


def route_of(args: argparse.Namespace) -> Route:
    """The proxy to dial, the CONNECT request for the target, the payload to echo."""
    name, port = args.target.rsplit(":", 1)
    host, proxy_port = args.proxy.rsplit(":", 1)
    connect = f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode()
    return Route((host, int(proxy_port)), connect, Path(args.payload).read_bytes(), args.timeout)


async def one_tunnel(route: Route, tally: Tally) -> None:
    """One short tunnel, counted in ``tally``; never raises (its failure is counted by cause)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport = None
    tally.started += 1
    try:
        async with asyncio.timeout(route.timeout):
            transport, _ = await loop.create_connection(lambda: Tunnel(route.connect, route.payload, done),
                                                        *route.address)
            tally.connected += 1
            await done
        tally.completed += 1
    except TimeoutError:
        tally.errors["timeout"] += 1
    except OSError as exc:  # the connection was not made: the proxy never saw it
        tally.errors[type(exc).__name__] += 1
    except Failed as exc:
        tally.errors[str(exc)] += 1
    finally:
        if transport is not None:
            transport.close()


async def count(args: argparse.Namespace) -> dict[str, Any]:
    route, tally = route_of(args), Tally()
    remaining = iter(range(args.count))

    async def worker() -> None:
        for _ in remaining:  # shared iterator: each index is taken by exactly one worker
            await one_tunnel(route, tally)

    t0 = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(min(args.concurrency, args.count))]
    pending: set[asyncio.Future[None]] = set()
    if workers:  # each tunnel is bounded by --timeout, so the whole batch is too
        bound = (args.count // len(workers) + 1) * args.timeout + 60
        _, pending = await asyncio.wait(workers, timeout=bound)
    for task in pending:
        task.cancel()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return {**tally.result(), "seconds": round(elapsed, 3), "per_s": round(tally.completed / elapsed, 1),
            "stuck_workers": len(pending)}


async def rate(args: argparse.Namespace) -> dict[str, Any]:
    route, tally = route_of(args), Tally()
    loop = asyncio.get_running_loop()
    inflight: set[asyncio.Task[None]] = set()
    total = round(args.rate * args.duration)
    t0 = loop.time()
    worst_lag = 0.0
    for i in range(total):
        due = t0 + i / args.rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        worst_lag = max(worst_lag, loop.time() - due)
        if len(inflight) >= args.max_inflight:
            tally.skipped += 1
            continue
        task = loop.create_task(one_tunnel(route, tally))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        _, pending = await asyncio.wait(set(inflight), timeout=args.timeout + 5)
        for task in pending:
            task.cancel()
    elapsed = max(loop.time() - t0, 1e-9)
    return {**tally.result(), "seconds": round(elapsed, 3), "per_s": round(tally.completed / elapsed, 1),
            "planned": total, "worst_lag_ms": round(worst_lag * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.leaks_load")
    parser.add_argument("mode", choices=("count", "rate"))
    parser.add_argument("--proxy", required=True, help="HOST:PORT of the proxy")
    parser.add_argument("--target", required=True, help="NAME:PORT to CONNECT to (an echo origin)")
    parser.add_argument("--payload", required=True, help="file whose bytes each tunnel sends and awaits back")
    parser.add_argument("--count", type=int, default=1000, help="count: tunnels in all")
    parser.add_argument("--concurrency", type=int, default=32, help="count: tunnels in flight")
    parser.add_argument("--rate", type=float, default=200.0, help="rate: tunnels started per second")
    parser.add_argument("--duration", type=float, default=60.0, help="rate: seconds")
    parser.add_argument("--max-inflight", type=int, default=512, help="rate: most tunnels open at once")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per tunnel")
    args = parser.parse_args(argv)
    if args.count < 0 or args.concurrency < 1 or args.rate <= 0 or args.duration < 0 or args.max_inflight < 1:
        parser.error("--count and --duration must not be negative; --concurrency, --rate, --max-inflight positive")
    result = uvloop.run({"count": count, "rate": rate}[args.mode](args))
    emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
