"""The origins, as uvloop Protocol servers in one process (run pinned to the client core).

``python -m bench.origin --echo PORT [--echo PORT] --bulk PORT [--http PORT]`` serves:

* echo: every byte received is written back; closes when the client does.
* bulk: the client sends ``SEND n\\n`` and gets n bytes, streamed from one
  preallocated buffer with write flow control; or ``RECV n\\n`` and sends n
  bytes, answered with ``OK\\n``.
* http (only when nginx is not available): HTTP/1.1 keep-alive, every request
  head answered with 200 "ok"; request bodies are not supported.

Binds 127.0.0.1 only. Prints one JSON line ``{"event": "ready"}`` on stdout
once every port listens, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import uvloop

CHUNK = 1 << 20
_PAYLOAD = memoryview(b"\x5a" * CHUNK)
_MAX_LINE = 64
_HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Bulk(asyncio.Protocol):
    """SEND n: stream n bytes; RECV n: swallow n bytes, then say OK."""

    def __init__(self) -> None:
        self.line = b""
        self.to_send = 0
        self.to_receive = -1
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=4 * CHUNK)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.to_receive > 0:
            self.to_receive -= len(data)
            if self.to_receive <= 0:
                self.transport.write(b"OK\n")  # type: ignore[attr-defined]
            return
        self.line += data
        if b"\n" not in self.line:
            if len(self.line) > _MAX_LINE:
                self.transport.close()
            return
        line, _, rest = self.line.partition(b"\n")
        self.line = b""
        verb, _, count = line.partition(b" ")
        n = int(count) if count.isdigit() else -1
        if verb == b"SEND" and n >= 0:
            self.to_send = n
            self._pump()
        elif verb == b"RECV" and n >= 0:
            self.to_receive = n
            if rest:
                self.data_received(rest)
        else:
            self.transport.close()

    def _pump(self) -> None:
        write = self.transport.write  # type: ignore[attr-defined]
        while self.to_send > 0 and not self.paused:
            n = min(CHUNK, self.to_send)
            write(_PAYLOAD[:n])
            self.to_send -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


class Http(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 responder: one 200 per request head (no request bodies)."""

    def __init__(self) -> None:
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        replies = self.buf.count(b"\r\n\r\n")
        if replies:
            self.buf = self.buf[self.buf.rindex(b"\r\n\r\n") + 4 :]
            self.transport.write(_HTTP_OK * replies)  # type: ignore[attr-defined]
        elif len(self.buf) > 65536:
            self.transport.close()


async def serve(echo: list[int], bulk: list[int], http: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for ports, factory in ((echo, Echo), (bulk, Bulk), (http, Http)):
        for port in ports:
            servers.append(await loop.create_server(factory, "127.0.0.1", port, backlog=4096, reuse_address=True))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready"}), flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.origin")
    parser.add_argument("--echo", type=int, action="append", default=[])
    parser.add_argument("--bulk", type=int, action="append", default=[])
    parser.add_argument("--http", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    uvloop.run(serve(args.echo, args.bulk, args.http))
    return 0


if __name__ == "__main__":
    sys.exit(main())
