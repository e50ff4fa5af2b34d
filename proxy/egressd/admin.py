"""The admin listener: ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only
once a policy is loaded (and 503 while shutting down), so Kubernetes sends no
traffic to a proxy that would deny everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from egressd.errors import BadRequest
from egressd.listeners.httpio import whole_response
from egressd.sniff.http import Head, RequestParser

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
        requests = RequestParser(MAX_HEAD)  # the proxy's own parser: one HTTP/1 parser in the process
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                while not requests.events:
                    data = await reader.read(4096)
                    if not data:
                        return
                    requests.feed(data)
            head = requests.events.popleft()
            assert isinstance(head, Head)
            if self.refresh is not None and head.target.startswith(b"/metrics"):
                await self.refresh()
            status, ctype, body = self.answer(head.method, head.target.split(b"?")[0])
            writer.write(whole_response(status, [(b"Content-Type", ctype.encode())], body))
            await writer.drain()
        except (TimeoutError, BadRequest, ConnectionError):
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
