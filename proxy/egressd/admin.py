"""The admin listener: ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only
once a policy is loaded, and 503 while shutting down or while audit records
cannot be written, so Kubernetes sends no traffic to a proxy that would deny
or refuse everything. The body of a 503 says why.
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
    """``ready()`` returns True when ready, else False or a text saying why not."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool | str],
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
            if self.refresh is not None and head.target.startswith((b"/metrics", b"/readyz")):
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
            state = self.ready()
            if state is True:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", (f"not ready: {state}\n" if isinstance(state, str) else "not ready\n").encode()
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
