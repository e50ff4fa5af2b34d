"""The lab: loopback stand-ins for the outside world, for ``egressd demo``, the tests and the benchmarks.

::

    client ──CONNECT a.test:443──▶ egressd ──A? a.test──▶ DnsServer (zone we choose)
                                     │      ◀─127.0.0.1──
                                     └──TLS, SNI a.test──▶ TlsOrigin (cert from a lab CA)
                                                           HttpOrigin, EchoOrigin

* :mod:`egressd.lab.dns`: :class:`DnsServer`, authoritative for a mutable
  zone of ``name -> addresses | Servfail() | Slow(delay, addresses)``, over
  UDP and TCP on one port; it records every query it receives.
* :mod:`egressd.lab.origins`: :class:`TlsOrigin` and :class:`HttpOrigin`
  answer every request with a line saying what they saw (method, target,
  Host, SNI) and record it; :class:`EchoOrigin` echoes raw bytes.
* :class:`LabThread` runs any of them on a private event loop in a daemon
  thread, for synchronous code (pytest, benchmarks).

Every server binds a loopback IP literal only (anything else is refused
before a socket is made), on an ephemeral port unless told otherwise; tracks
the task of every connection and cancels it on ``stop()``; and closes
quietly when a client vanishes. Errors the loop does report are kept in
:attr:`LabThread.errors`, so a test can assert there were none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from egressd.lab.dns import Answer, DnsServer, Servfail, Slow
from egressd.lab.origins import (
    EchoOrigin,
    HttpOrigin,
    OriginRequest,
    TlsOrigin,
    client_ssl_context,
    make_ca,
)

__all__ = [
    "Answer",
    "DnsServer",
    "EchoOrigin",
    "HttpOrigin",
    "LabThread",
    "OriginRequest",
    "Servfail",
    "Slow",
    "TlsOrigin",
    "client_ssl_context",
    "make_ca",
]

_START_TIMEOUT = 5.0  # seconds for the lab thread's loop to come up
_STOP_TIMEOUT = 10.0  # seconds for the lab's servers and tasks to wind down

_log = logging.getLogger(__name__)

T = TypeVar("T")


class Server(Protocol):
    async def start(self, host: str = ..., port: int = ...) -> tuple[str, int]: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


class LabThread:
    """Runs lab servers on a private asyncio loop in a daemon thread, for synchronous code.

    ::

        with LabThread() as lab:
            dns = lab.serve(DnsServer({"a.test": ("127.0.0.1",)}))
            host, port = dns.address

    ``errors`` collects every context the loop's exception handler receives
    (after logging it as usual).
    """

    def __init__(
        self, loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop, netns: str | None = None
    ) -> None:
        """``netns``: serve inside that network namespace (see :mod:`egressd.lab.netns`)."""
        self.errors: list[dict[str, Any]] = []
        self._netns = netns
        self._loop_factory = loop_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._served: list[Server] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("LabThread is not started")
        return self._loop

    def start(self) -> LabThread:
        if self._loop is not None:
            raise RuntimeError("LabThread is already started")
        loop = self._loop_factory()
        loop.set_exception_handler(self._on_error)
        ready = threading.Event()

        def main() -> None:
            if self._netns is not None:
                from egressd.lab.netns import enter

                enter(self._netns)
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=main, name="egressd-lab", daemon=True)
        thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError(f"the lab event loop did not start within {_START_TIMEOUT}s")
        self._loop, self._thread = loop, thread
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the lab loop and return its result; TimeoutError (and cancel it) after ``timeout`` s."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine itself raised TimeoutError
                raise
            future.cancel()
            raise TimeoutError(f"lab coroutine {coro.__qualname__} did not finish within {timeout}s") from None

    def serve(self, server: S, host: str = "127.0.0.1", port: int = 0) -> S:
        """Start ``server`` on the lab loop and stop it when the lab stops; returns ``server``."""
        self.run(server.start(host, port))
        self._served.append(server)
        return server

    def stop(self) -> None:
        """Stop the servers started with :meth:`serve` (newest first), cancel what is left, end the thread."""
        if self._loop is None or self._thread is None:
            return
        try:
            while self._served:
                self.run(self._served.pop().stop(), _STOP_TIMEOUT)
            self.run(_cancel_other_tasks(), _STOP_TIMEOUT)
        finally:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_STOP_TIMEOUT)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> LabThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _on_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _is_failed_handshake(context):
            _log.debug("lab: a client failed the TLS handshake: %s", context.get("exception"))
            return
        self.errors.append(context)
        loop.default_exception_handler(context)


def _is_failed_handshake(context: dict[str, Any]) -> bool:
    """A client that sent garbage or rejected our certificate: routine in the lab.

    asyncio reports these to the exception handler only in debug mode
    (``PYTHONASYNCIODEBUG``, ``-X dev``); otherwise it drops them silently.
    """
    return context.get("message") == "Error on transport creation for incoming connection" and isinstance(
        context.get("exception"), OSError
    )


async def _cancel_other_tasks() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
    await asyncio.get_running_loop().shutdown_asyncgens()
