"""What the inspect-mode benchmark runs on the client core: the HTTPS origin and the load generator.

``python -m bench.inspect_load origin --port P --cert F --key F``: an HTTPS/1.1 origin (uvloop, ALPN
``http/1.1`` only, no session tickets): every request head gets ``200`` with a 3-byte body, keep-alive. Prints
``{"event": "ready"}`` once listening.

``python -m bench.inspect_load load --proxy HOST:PORT|direct --target NAME:PORT --cafile F --mode M ...``: one
process of the load generator (uvloop, Python's ssl; ALPN ``http/1.1``), C connections from monotonic time T0:

- ``keepalive``: each connection opens one tunnel (``CONNECT``, ``200``, TLS for NAME) and sends
  ``GET PATH`` after ``GET PATH`` on it, one at a time, until the window ends;
- ``tunnels``: each connection does connect, ``CONNECT``, TLS, one ``GET``, close, and again.

With ``--http2`` the client offers ALPN ``h2`` too and speaks HTTP/2 where it is chosen (an interceptor; the
origin speaks HTTP/1.1 only). ``GET /stats`` on the origin answers how many connections it has accepted.
Only requests completed inside ``[T0 + warmup, T0 + warmup + duration)`` count; latency is from the request's
write (keepalive) or the TCP connect (tunnels) to the response's last byte. One JSON result line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import ssl
import sys
import time
from collections import Counter
from typing import Any

import uvloop

from bench.procs import BenchError

NAME = "api.inspect.bench-example.com"  # the origin's name, in the namespace's /etc/hosts and the lab DNS
ORIGIN_PORT = 18446
PATH = "/bench/ok"  # the inspect: rule allows GET /bench/**
BODY = b"ok\n"
_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\n" + BODY
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
SERVICE = "bench"
MAX_SAMPLES = 50_000  # latencies a process reports (a uniform sample when it has more)


# ---- the origin ----

class _Http(asyncio.Protocol):
    """One 200 per request head (no request bodies), written as soon as the head is complete."""

    accepted = 0  # connections so far (GET /stats)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buf = transport, b""
        _Http.accepted += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n and self.buf.startswith(b"GET /stats "):
            self.buf, body = b"", b"%d\n" % _Http.accepted
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
            self.transport.write(head + body)  # type: ignore[attr-defined]
        elif n:
            self.buf = self.buf[self.buf.rindex(b"\r\n\r\n") + 4:]
            self.transport.write(_RESPONSE * n)  # type: ignore[attr-defined]
        elif len(self.buf) > 65536:
            self.transport.close()


async def serve_origin(port: int, cert: str, key: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.num_tickets = 0  # no client here resumes a session: do not pay for tickets
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Http, "127.0.0.1", port, ssl=ctx, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready"}), flush=True)
    await stop.wait()
    server.close()


# ---- the load generator ----

class Failed(Exception):
    pass


class _Conn(asyncio.Protocol):
    """A client connection: waits for one response head (and its Content-Length body) at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.buf, self.body, self.status = loop, bytearray(), False, b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.h2: Any = None  # an h2.connection.H2Connection once HTTP/2 was negotiated
        self.tls: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def expect(self, body: bool) -> asyncio.Future[bytes]:
        self.body, self.waiter = body, self.loop.create_future()
        self._check()
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            return self._h2_received(data)
        self.buf += data
        self._check()

    def _h2_received(self, data: bytes) -> None:
        import h2.events as ev

        for event in self.h2.receive_data(data):
            if isinstance(event, ev.ResponseReceived):
                self.status = dict(event.headers).get(b":status", b"")
            elif isinstance(event, ev.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (ev.StreamEnded, ev.StreamReset, ev.ConnectionTerminated)):
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(self.status if isinstance(event, ev.StreamEnded) else b"RST")
        if out := self.h2.data_to_send():
            self.tls.write(out)

    def _check(self) -> None:
        if self.h2 is not None or self.waiter is None or self.waiter.done() or (end := self.buf.find(b"\r\n\r\n")) < 0:
            return
        match = _LENGTH.search(self.buf, 0, end + 2) if self.body else None
        size = end + 4 + (int(match.group(1)) if match else 0)
        if len(self.buf) >= size:
            status = bytes(self.buf[9:12])
            del self.buf[:size]
            self.waiter.set_result(status)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Failed("closed"))


class Load:
    """One process's connections and counts."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.name, port = a.target.rsplit(":", 1)
        self.port = int(port)
        self.addr = (a.origin_host, self.port) if a.proxy == "direct" else _split(a.proxy)
        self.connect = f"CONNECT {a.target} HTTP/1.1\r\nHost: {a.target}\r\n\r\n".encode()
        self.request = f"GET {a.path} HTTP/1.1\r\nHost: {a.target}\r\n\r\n".encode()
        self.h2_headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", a.target.encode()),
                           (b":path", a.path.encode())]
        self.ctx = ssl.create_default_context(cafile=a.cafile)
        self.ctx.set_alpn_protocols(["h2", "http/1.1"] if a.http2 else ["http/1.1"])
        self.alpn: Counter[str] = Counter()
        self.start, self.end = a.t0 + a.warmup, a.t0 + a.warmup + a.duration
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.total = self.tunnels = 0

    async def open(self) -> tuple[asyncio.BaseTransport, _Conn]:
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(lambda: _Conn(loop), *self.addr)
        try:
            if self.a.proxy != "direct":
                transport.write(self.connect)  # type: ignore[attr-defined]
                if (status := await conn.expect(False)) != b"200":
                    raise Failed(f"CONNECT {status.decode(errors='replace')}")
            tls = await loop.start_tls(transport, conn, self.ctx, server_hostname=self.name)  # type: ignore[arg-type]
        except BaseException:
            transport.abort()  # type: ignore[attr-defined]
            raise
        self.tunnels += 1
        alpn = tls.get_extra_info("ssl_object").selected_alpn_protocol() or "none"
        self.alpn[alpn] += 1
        if alpn == "h2":
            import h2.config
            import h2.connection

            conn.h2, conn.tls = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None)), tls
            conn.h2.initiate_connection()
            tls.write(conn.h2.data_to_send())
        return tls, conn  # type: ignore[return-value]

    async def get(self, tls: asyncio.BaseTransport, conn: _Conn) -> None:
        if conn.h2 is not None:
            stream = conn.h2.get_next_available_stream_id()
            conn.h2.send_headers(stream, self.h2_headers, end_stream=True)
            tls.write(conn.h2.data_to_send())  # type: ignore[attr-defined]
        else:
            tls.write(self.request)  # type: ignore[attr-defined]
        if (status := await conn.expect(True)) != b"200":
            raise Failed(f"status {status.decode(errors='replace')}")

    def done(self, began: float) -> None:
        now = time.monotonic()
        self.total += 1
        if self.start <= now < self.end:
            self.latencies.append(now - began)

    async def keepalive(self) -> None:
        while time.monotonic() < self.end:
            tls = None
            try:
                async with asyncio.timeout(self.a.timeout):
                    tls, conn = await self.open()
                while time.monotonic() < self.end:
                    began = time.monotonic()
                    async with asyncio.timeout(self.a.timeout):
                        await self.get(tls, conn)
                    self.done(began)
            except (OSError, Failed, TimeoutError, ssl.SSLError) as exc:
                self.errors[_kind(exc)] += 1
                await asyncio.sleep(0.01)  # a refusing system is not hammered in a tight loop
            finally:
                if tls is not None:
                    tls.close()

    async def new_tunnels(self) -> None:
        while time.monotonic() < self.end:
            began, tls = time.monotonic(), None
            try:
                async with asyncio.timeout(self.a.timeout):
                    tls, conn = await self.open()
                    await self.get(tls, conn)
                self.done(began)
            except (OSError, Failed, TimeoutError, ssl.SSLError) as exc:
                self.errors[_kind(exc)] += 1
                await asyncio.sleep(0.01)  # a refusing system is not hammered in a tight loop
            finally:
                if tls is not None:
                    tls.close()

    async def run(self) -> dict[str, Any]:
        late = time.monotonic() - self.a.t0
        if late < 0:
            await asyncio.sleep(-late)
        work = self.keepalive if self.a.mode == "keepalive" else self.new_tunnels
        tasks = [asyncio.create_task(work()) for _ in range(self.a.concurrency)]
        await asyncio.wait(tasks, timeout=self.end - time.monotonic() + self.a.timeout + 1)
        for task in tasks:
            task.cancel()
        await asyncio.sleep(0.05)  # let the closes go out
        lat = self.latencies
        sample = lat if len(lat) <= MAX_SAMPLES else random.sample(lat, MAX_SAMPLES)
        return {"event": "result", "completed": len(lat), "total": self.total, "tunnels": self.tunnels,
                "errors": dict(self.errors), "late_s": round(max(0.0, late), 3), "alpn": dict(self.alpn),
                "lat_us": [round(x * 1e6) for x in sample]}


def _kind(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"[:80]


def _split(hostport: str) -> tuple[str, int]:
    host, port = hostport.rsplit(":", 1)
    return host, int(port)




def merge(results: list[dict[str, Any]], use: dict[str, Any], duration: float, warmup: float,
          proxied: bool) -> dict[str, Any]:
    """The processes' results as one: requests/s in the window, p50/p99, errors, and the CPU per request."""
    lat = sorted(x for r in results for x in r["lat_us"])
    completed, errors = sum(r["completed"] for r in results), Counter()
    for r in results:
        errors.update(r["errors"])
    late = max(r["late_s"] for r in results)
    if not completed:
        raise BenchError(f"no request completed: errors {dict(errors)}")
    if late > warmup:
        raise BenchError(f"a load generator process started {late:.2f}s late (the warm-up is {warmup:g}s)")
    alpn: Counter[str] = Counter()
    for r in results:
        alpn.update(r["alpn"])
    out = {"per_s": completed / duration, "completed": completed, "total": sum(r["total"] for r in results),
           "alpn": dict(alpn),
           "tunnels": sum(r["tunnels"] for r in results), "errors": dict(errors), "late_s": late,
           "p50_ms": lat[len(lat) // 2] / 1000, "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000,
           **use}
    if proxied:
        out["cpu_us_per_request"] = 1e6 * use["proxy_cpu_s"] / completed
        out["main_cpu_us_per_request"] = 1e6 * use["main_cpu_s"] / completed
    return out


def _whole(data: bytes) -> bool:
    end = data.find(b"\r\n\r\n")
    match = _LENGTH.search(data, 0, end + 2) if end >= 0 else None
    return end >= 0 and len(data) >= end + 4 + (int(match.group(1)) if match else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inspect_load")
    sub = parser.add_subparsers(dest="what", required=True)
    origin = sub.add_parser("origin")
    origin.add_argument("--port", type=int, default=ORIGIN_PORT)
    origin.add_argument("--cert", required=True)
    origin.add_argument("--key", required=True)
    load = sub.add_parser("load")
    load.add_argument("--proxy", required=True, help="HOST:PORT, or 'direct'")
    load.add_argument("--origin-host", default="127.0.0.1")
    load.add_argument("--target", default=f"{NAME}:{ORIGIN_PORT}")
    load.add_argument("--path", default=PATH)
    load.add_argument("--cafile", required=True)
    load.add_argument("--mode", choices=("keepalive", "tunnels"), required=True)
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--t0", type=float, required=True, help="time.monotonic() at which to start")
    load.add_argument("--warmup", type=float, default=0.5)
    load.add_argument("--duration", type=float, default=4.0)
    load.add_argument("--timeout", type=float, default=10.0)
    load.add_argument("--http2", action="store_true", help="offer ALPN h2 too, and speak HTTP/2 when chosen")
    args = parser.parse_args(argv)
    if args.what == "origin":
        uvloop.run(serve_origin(args.port, args.cert, args.key))
    else:
        print(json.dumps(uvloop.run(Load(args).run())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
