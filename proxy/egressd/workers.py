"""``--workers N``: N worker processes behind one port, one admin endpoint, one audit stream.

The supervisor (this module) loads the policy once to fail fast, reserves the
listen port with an SO_REUSEPORT socket (so ``:0`` gets one port for all), and
starts each worker as ``egressd run ... --workers 1 --reuse-port
--control-fd FD``: its own process, event loop and SO_REUSEPORT listener, so the
kernel spreads new connections over the workers. Over a socketpair each worker
reports ready and answers metric snapshots; the supervisor's ``/metrics`` sums
them. Audit records go to the inherited stdout or the same O_APPEND file, in
whole-line writes of at most PIPE_BUF bytes (see :mod:`egressd.audit`), so lines
never interleave; each worker's lines are a chain of their own, its stream
named with ``/w<N>`` (:data:`egressd.auditchain.WORKER_ENV`). SIGHUP and
SIGTERM are passed on to the workers; a worker that dies is started again.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import struct
import sys

import structlog

from egressd.admin import Admin
from egressd.auditchain import WORKER_ENV, AuditKeyError, load_signer
from egressd.config import Config
from egressd.hostport import join_host_port
from egressd.metrics import Metrics, registry_for
from egressd.policy.loader import PolicyError
from egressd.reload import load_for

log = structlog.get_logger("egressd.workers")

READY_TIMEOUT = 30.0
SNAPSHOT_TIMEOUT = 2.0
_LEN = struct.Struct("!I")


async def send_frame(writer: asyncio.StreamWriter, value: object) -> None:
    data = pickle.dumps(value)
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> object:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return pickle.loads(await reader.readexactly(size))  # noqa: S301 - our own child process


async def serve_control(fd: int, metrics: Metrics, on_lost) -> None:
    """Worker side: say ready, then answer b"m" with a metrics snapshot; the supervisor gone means stop."""
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    await send_frame(writer, {"ready": os.getpid()})
    try:
        while await reader.read(1) == b"m":
            await send_frame(writer, metrics.snapshot())
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
    on_lost()


class Worker:
    """One worker process as the supervisor sees it."""

    def __init__(
        self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()

    async def snapshot(self) -> dict | None:
        async with self.lock:
            try:
                self.writer.write(b"m")
                async with asyncio.timeout(SNAPSHOT_TIMEOUT):
                    return await read_frame(self.reader)  # type: ignore[return-value]
            except (OSError, TimeoutError, asyncio.IncompleteReadError, pickle.UnpicklingError):
                return None


class Supervisor:
    def __init__(self, config: Config, argv: list[str]) -> None:
        self.config = config
        self.argv = argv
        self.workers: list[Worker | None] = [None] * config.workers
        self.metrics = Metrics()
        self.stopping = False
        self.stopped = asyncio.Event()
        self.reserved: socket.socket | None = None
        self.tasks: set[asyncio.Task] = set()

    def reserve_port(self) -> tuple[str, int]:
        host, port = self.config.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        # SO_REUSEADDR too, as every listener of the group has: without it the bind fails while a
        # TIME_WAIT connection of an earlier run still holds the port (a rollout that changes --workers).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        self.reserved = sock
        return host, sock.getsockname()[1]

    async def spawn(self, index: int, listen: tuple[str, int]) -> None:
        parent, child = socket.socketpair()
        args = [
            *self.argv, "--workers", "1", "--listen", join_host_port(*listen), "--admin-listen", "off",
            "--reuse-port", "--control-fd", str(child.fileno()),
        ]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "egressd", "run", *args, pass_fds=(child.fileno(),),
            env={**os.environ, WORKER_ENV: str(index)},
        )
        child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await read_frame(reader)
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            if proc.returncode is None:
                proc.kill()
            raise RuntimeError(f"worker {index} did not start (exit code {proc.returncode})") from exc
        self.workers[index] = Worker(proc, reader, writer)
        task = asyncio.get_running_loop().create_task(self.watch(index, listen))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def watch(self, index: int, listen: tuple[str, int]) -> None:
        """Start a worker again if it exits while the supervisor is not stopping."""
        worker = self.workers[index]
        assert worker is not None
        code = await worker.proc.wait()
        if self.stopping:
            return
        log.error("worker.exited", worker=index, pid=worker.proc.pid, code=code)
        await asyncio.sleep(1.0)
        if not self.stopping:
            await self.spawn(index, listen)

    async def refresh(self) -> None:
        """Sum the workers' metric snapshots into self.metrics (called before each scrape)."""
        snapshots = await asyncio.gather(*(w.snapshot() for w in self.workers if w is not None))
        self.metrics.load_sum([s for s in snapshots if s is not None])

    def ready(self) -> bool | str:
        """Ready unless stopping or a worker cannot write audit records (from the snapshots just summed)."""
        if self.stopping:
            return "shutting down"
        if not self.metrics.audit_summed[2]:
            return "a worker cannot write audit records and refuses new connections"
        return True

    def forward(self, sig: int) -> None:
        for worker in self.workers:
            if worker is not None and worker.proc.returncode is None:
                worker.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.forward(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w is not None]
        exits = {asyncio.ensure_future(proc.wait()): proc for proc in procs}
        if exits:  # the workers drain in parallel, within one deadline in all
            _, late = await asyncio.wait(exits, timeout=self.config.drain_timeout + 10)
            for waiter in late:
                exits[waiter].kill()
                waiter.cancel()
        for task in list(self.tasks):
            task.cancel()
        self.stopped.set()

    async def run(self) -> int:
        try:
            load_for(self.config.allowlists, self.config.service)
        except PolicyError as exc:
            print(f"egressd: cannot start: the allowlists do not load:\n{exc}", file=sys.stderr)
            return 2
        try:
            if self.config.audit_signing_key:
                load_signer(self.config.audit_signing_key)
        except AuditKeyError as exc:
            print(f"egressd: cannot start: {exc}", file=sys.stderr)
            return 2
        listen = self.reserve_port()
        try:
            for index in range(self.config.workers):
                await self.spawn(index, listen)
        except RuntimeError as exc:
            print(f"egressd: {exc}", file=sys.stderr)
            await self.stop()
            return 1
        admin = Admin(registry_for(self.metrics), self.ready, refresh=self.refresh)
        addresses = [listen]
        if self.config.admin_listen is not None:
            server = await admin.start(*self.config.admin_listen)
            addresses.append(server.sockets[0].getsockname()[:2])
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: self.forward(signal.SIGHUP))
        log.info("egressd.started", listen=addresses[0], admin=addresses[1:], service=self.config.service,
                 workers=[w.proc.pid for w in self.workers if w is not None])
        await self.stopped.wait()
        admin.close()
        log.info("egressd.stopped")
        return 0
