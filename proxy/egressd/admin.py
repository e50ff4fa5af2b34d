"""The admin listener: ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only
once a policy is loaded (and 503 while shutting down), so Kubernetes sends no
traffic to a proxy that would deny everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

READ_TIMEOUT = 5.0
MAX_HEAD = 8192


class Admin:
    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.refresh = refresh
        self.tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._client, host, port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(4096))
                        continue
                    break
            if isinstance(event, h11.Request):
                if self.refresh is not None and event.target.startswith(b"/metrics"):
                    await self.refresh()
                status, ctype, body = self.answer(event.method, event.target.split(b"?")[0])
                headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
        except (TimeoutError, h11.ProtocolError, ConnectionError):
            pass  # a scraper that hangs up or sends garbage gets nothing; the proxy carries on
        finally:
            writer.close()
            if task is not None:
                self.tasks.discard(task)

    def answer(self, method: bytes, path: bytes) -> tuple[int, str, bytes]:
        if method != b"GET":
            return 405, "text/plain", b"only GET\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if path == b"/readyz":
            return (200, "text/plain", b"ready\n") if self.ready() else (503, "text/plain", b"no policy loaded\n")
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
