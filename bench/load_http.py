"""The load generator's ``http`` mode (used when wrk is not installed): keep-alive GETs through the proxy."""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from typing import Any

from bench.load import Failed, _now, _run_workers, emit, latency_ms


class HttpClient(asyncio.Protocol):
    """One keep-alive connection: send a request, wait for a whole response (Content-Length framed)."""

    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[int] | None = None
        self.lost = lost
        self.server_closes = False  # the last response said "Connection: close"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def request(self, data: bytes) -> asyncio.Future[int]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)  # type: ignore[attr-defined]
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12]) if self.buf[9:12].isdigit() else 0
        self.server_closes = b"\r\nconnection: close" in head or self.buf.startswith(b"HTTP/1.0")
        self.buf = self.buf[end + 4 + length :]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Failed("closed"))
        if not self.lost.done():
            self.lost.set_result(None)


async def http(args: argparse.Namespace) -> dict[str, Any]:
    name, port = args.target.rsplit(":", 1)
    if args.proxy == "direct":
        address, target = (args.origin_host, int(port)), "/"
    else:
        host, proxy_port = args.proxy.rsplit(":", 1)
        address, target = (host, int(proxy_port)), f"http://{name}:{port}/"
    request = f"GET {target} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    t0 = _now()
    start, end = t0 + args.warmup, t0 + args.warmup + args.duration
    latencies: list[float] = []
    counts: Counter[str] = Counter()
    loop.call_at(loop.time() + args.warmup, emit, "measure_start")
    loop.call_at(loop.time() + args.warmup + args.duration, emit, "measure_end")

    async def worker() -> None:
        while _now() < end:
            lost: asyncio.Future[None] = loop.create_future()
            try:
                transport, proto = await loop.create_connection(lambda lost=lost: HttpClient(lost), *address)
            except OSError:
                counts["socket_errors"] += 1
                continue
            try:
                while (began := _now()) < end and not lost.done() and not proto.server_closes:
                    async with asyncio.timeout(args.timeout):
                        status = await proto.request(request)
                    finished = _now()
                    if start <= finished < end:
                        latencies.append(finished - began)
                        counts["non_2xx"] += not 200 <= status < 400
            except (Failed, TimeoutError):
                counts["socket_errors"] += 1
            finally:
                transport.close()

    await _run_workers(worker, args)
    return {
        "requests": len(latencies),
        "rps": len(latencies) / args.duration,
        **latency_ms(latencies),
        "non_2xx": counts["non_2xx"],
        "socket_errors": counts["socket_errors"],
    }
