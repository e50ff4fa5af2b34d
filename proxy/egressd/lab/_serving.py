"""What every lab server shares: loopback-only binding, tracked tasks, quiet closing.

A lab server must never listen beyond the machine, must not leave tasks behind
when it stops, and must not print a traceback because a client hung up. The
pieces here enforce those three things once, for the DNS server and the origins.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = [
    "IDLE_TIMEOUT",
    "PEER_ERRORS",
    "STOP_TIMEOUT",
    "StreamServer",
    "TaskSet",
    "check_loopback",
    "close_quietly",
    "read_some",
    "run_connection",
]

IDLE_TIMEOUT = 60.0  # seconds a lab connection may sit silent before it is closed
STOP_TIMEOUT = 5.0  # seconds stop() waits for cancelled tasks to finish
_CLOSE_TIMEOUT = 1.0  # seconds to wait for a transport (and a TLS close_notify) to close

# What a peer can do to a connection: reset it, send garbage TLS, stall past a timeout.
# ssl.SSLError, ConnectionError and TimeoutError are all OSErrors; IncompleteReadError is an EOFError.
PEER_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError)


_DOCUMENTATION = tuple(
    ipaddress.ip_network(n) for n in ("198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def check_loopback(host: str) -> None:
    """Refuse to serve on anything but a loopback or documentation IP literal: the lab is never reachable from
    outside (documentation ranges are routed nowhere; the sidecar tests put them in namespaces of their own)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"lab servers bind an IP literal, not {host!r}: use 127.0.0.1 or ::1") from None
    if not address.is_loopback and not any(address in net for net in _DOCUMENTATION):
        raise ValueError(f"lab servers bind loopback or documentation addresses only, not {host}: use 127.0.0.1")


class TaskSet:
    """The tasks a server has under way, so that stop() can cancel every one of them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.adopt(task)
        return task

    def adopt(self, task: asyncio.Task[Any] | None = None) -> None:
        """Track ``task`` (the current one by default) until it finishes."""
        task = task or asyncio.current_task()
        assert task is not None, "adopt() outside a task"
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout: float) -> None:
        """Wait until the tasks under way now have finished; raise TimeoutError after ``timeout`` seconds."""
        pending = {t for t in self._tasks if t is not asyncio.current_task()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            if still:
                raise TimeoutError(f"{len(still)} lab task(s) still running after {timeout}s")

    async def cancel(self, timeout: float = STOP_TIMEOUT) -> None:
        """Cancel every task and wait (up to ``timeout``) for them to unwind."""
        for task in self._tasks:
            task.cancel()
        await self.wait(timeout)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close a stream, ignoring whatever a peer that already left makes the close raise."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except PEER_ERRORS:
        pass


async def run_connection(
    tasks: TaskSet, converse: Callable[[], Awaitable[None]], writer: asyncio.StreamWriter
) -> None:
    """The body of a connection's task: tracked in ``tasks``, quiet about peers that leave, always closed."""
    tasks.adopt()
    try:
        try:
            await converse()
        except PEER_ERRORS:
            pass
        finally:
            await close_quietly(writer)
    except asyncio.CancelledError:
        # stop() cancelled us. End the task normally all the same: on Python 3.11 and
        # early 3.12, asyncio's streams call task.exception() on a cancelled connection
        # task and log the CancelledError traceback as an error.
        pass


class StreamServer:
    """A TCP (or TLS) server on loopback; subclasses implement :meth:`converse` for one connection.

    ``connections`` counts accepted connections; each is handed its serial
    number (from 1), so tests can tell whether two requests shared one.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self._ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._tasks = TaskSet()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        check_loopback(host)
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already started on {self.address}")
        self._server = await asyncio.start_server(self._accept, host, port, ssl=self._ssl_context)
        return self.address

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await self._tasks.cancel()
        async with asyncio.timeout(STOP_TIMEOUT):
            await server.wait_closed()

    async def wait_idle(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait until every connection accepted so far has been closed."""
        await self._tasks.wait(timeout)

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        serial = self.connections
        await run_connection(self._tasks, lambda: self.converse(reader, writer, serial), writer)

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serial: int) -> None:
        raise NotImplementedError


async def read_some(reader: asyncio.StreamReader, limit: int = 65536) -> bytes:
    """Read what has arrived (b"" at end of stream), giving up after IDLE_TIMEOUT seconds of silence."""
    async with asyncio.timeout(IDLE_TIMEOUT):
        return await reader.read(limit)
