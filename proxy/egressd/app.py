"""Wire the pieces together and run until SIGTERM/SIGINT.

Start-up refuses to serve without a valid policy (exit 2, every load error
listed). Shutdown stops accepting, lets open tunnels drain for
``drain_timeout`` seconds, aborts the rest, and writes the audit records of
every connection, the aborted ones included, within
:data:`egressd.audit.CLOSE_TIMEOUT` seconds; records that could not be written
by then are reported on stderr and make the exit code 1.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import structlog
import uvloop

from egressd import fdlimit
from egressd.admin import Admin
from egressd.audit import CLOSE_TIMEOUT, AuditLog
from egressd.auditchain import AuditKeyError, Chain, default_stream, load_signer
from egressd.auditformats import FORMATS
from egressd.config import Config, system_resolvers
from egressd.connection import Dial, Engine, PolicyHolder
from egressd.identity.sources import SourceError, Sources
from egressd.listeners import Listening, explicit
from egressd.metrics import Metrics, registry_for
from egressd.policy.loader import PolicyError
from egressd.reload import Reloader, load_for
from egressd.resolve import Resolver
from egressd.workers import Supervisor, serve_control

log = structlog.get_logger("egressd")


def configure_logging() -> None:
    """Operational logs (not audit records) as JSON lines on stderr."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def open_audit(config: Config) -> AuditLog:
    """The audit log as configured: this process's stream, its format, signing key and checkpoint intervals."""
    signer = load_signer(config.audit_signing_key) if config.audit_signing_key else None
    chain = Chain(default_stream(), FORMATS[config.audit_format], signer, config.audit_checkpoint_records,
                  config.audit_checkpoint_seconds)
    return AuditLog(config.audit_log, chain=chain)


class Proxy:
    """A running egressd: engine, listener, admin endpoint and reloader."""

    def __init__(self, config: Config, audit: AuditLog | None = None, dial: Dial | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.holder = PolicyHolder(load_for(config.allowlists, config.service))
        self.metrics.policy_loaded(ok=True, version=self.holder.current.version)
        resolvers = config.resolvers or system_resolvers()
        self.resolver = Resolver(
            resolvers, config.dns_timeout, config.dns_min_ttl, config.dns_max_ttl, self.metrics,
            max_pending=config.max_pending_lookups, max_addresses=config.max_addresses_per_name,
        )
        self.audit = audit or open_audit(config)
        self.metrics.audit_source = self.audit.state
        self.unwritten = 0  # audit records shutdown could not write
        service = config.service
        holder = self.holder
        self.sources = Sources(config, lambda: holder.current, self.metrics)
        self.engine = Engine(
            config, self.holder, self.resolver, self.audit, self.metrics, self.sources.identifier, dial
        )
        self.engine.capacity, nofile = fdlimit.plan(config.max_connections)
        if self.engine.capacity < config.max_connections:
            log.warning(
                "egressd.fd_limit", serving=self.engine.capacity, max_connections=config.max_connections,
                nofile=nofile, detail=fdlimit.advice(config.max_connections, self.engine.capacity, nofile),
            )
        self.reloader = Reloader(config.allowlists, service, self.holder, self.metrics)
        self.admin = Admin(registry_for(self.metrics), self.ready)
        self.servers: list[Listening] = []
        self.bound: dict[str, list[tuple[str, int]]] = {}  # listener kind -> the addresses it bound
        self.background: list[asyncio.Task] = []
        self.stopping = False
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        await self.sources.start()
        if cfg.listen is not None:
            self._bind("explicit", await explicit.start(self.engine, *cfg.listen, reuse_port=cfg.reuse_port))
        if cfg.admin_listen is not None:
            self._bind("admin", await self.admin.start(*cfg.admin_listen))
        if cfg.transparent_listen:
            from egressd.listeners import transparent

            for host, port in cfg.transparent_listen:
                self._bind("transparent", await transparent.start(self.engine, host, port))
        if cfg.dns_listen:
            from egressd.listeners import dns

            for host, port in cfg.dns_listen:
                self._bind("dns", await dns.start(self.engine, host, port))
        loop = asyncio.get_running_loop()
        self.background = [
            loop.create_task(self.engine.sweeper.run()),
            loop.create_task(self.reloader.watch(self.config.reload_interval)),
            *(loop.create_task(coro) for coro in self.sources.background()),
        ]

    def ready(self) -> bool | str:
        """True, or why /readyz answers 503."""
        if self.stopping:
            return "shutting down"
        if self.holder.current is None:
            return "no policy loaded"
        why = self.audit.unavailable
        if why:
            return f"the audit log cannot be written: {why}"
        why = self.sources.not_ready()
        return f"clients cannot be identified by their pod: {why}" if why else True

    def _bind(self, kind: str, server: Listening) -> None:
        self.servers.append(server)
        address = server.address if hasattr(server, "address") else server.sockets[0].getsockname()[:2]
        self.bound.setdefault(kind, []).append(address)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The explicit listener's address, then the admin endpoint's (what the demo uses)."""
        return [*self.bound.get("explicit", []), *self.bound.get("admin", [])]

    async def stop(self) -> None:
        """Stop accepting, drain open connections up to drain_timeout, abort the rest, flush records."""
        if self.stopping:
            return
        self.stopping = True
        for server in self.servers:
            server.close()
        await self.engine.drain(self.config.drain_timeout)
        self.engine.abort_all("the proxy shut down")
        await self.engine.drain(5)
        for task in self.background:
            task.cancel()
        self.admin.close()
        self.resolver.close()
        if self.engine.inspector is not None:  # its last request records, then the worker process ends
            await self.engine.inspector.close()
        await asyncio.gather(*self.background, return_exceptions=True)
        self.audit.flush()
        why = self.audit.unavailable
        self.unwritten = await asyncio.to_thread(self.audit.close, CLOSE_TIMEOUT)  # the loop never waits on it
        if self.unwritten or self.audit.unrecorded:
            log.error(
                "audit.unwritten", records=self.unwritten, refusals_only_counted=self.audit.unrecorded,
                reason=why or self.audit.unavailable or f"not written within {CLOSE_TIMEOUT:g}s",
            )
        self.stopped.set()


async def serve(config: Config) -> int:
    try:
        proxy = Proxy(config)
    except PolicyError as exc:
        print(f"egressd: cannot start: the allowlists do not load:\n{exc}", file=sys.stderr)
        return 2
    except (SourceError, AuditKeyError) as exc:
        print(f"egressd: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        await proxy.start()
    except SourceError as exc:
        print(f"egressd: cannot start: {exc}", file=sys.stderr)
        await proxy.stop()
        return 2
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()  # signal-started work and the worker's control channel

    def spawn(coro: Coroutine[Any, Any, Any]) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: spawn(proxy.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(proxy.reloader.reload("SIGHUP")))
    if config.control_fd is not None:
        spawn(serve_control(config.control_fd, proxy.metrics, lambda: spawn(proxy.stop())))
    log.info(
        "worker.started" if config.control_fd is not None else "egressd.started",
        listen=(proxy.bound.get("explicit") or [None])[0], admin=proxy.bound.get("admin", []),
        transparent=proxy.bound.get("transparent", []), dns=proxy.bound.get("dns", []), service=config.service,
        policy_version=proxy.holder.current.version if proxy.holder.current else None,
        audit_stream=proxy.audit.stream,
    )
    await proxy.stopped.wait()
    for task in list(tasks):
        task.cancel()
    log.info("egressd.stopped")
    return 1 if proxy.unwritten or proxy.audit.unrecorded else 0


def run(config: Config, argv: list[str] | None = None) -> int:
    """Serve in this process, or supervise --workers processes that each do."""
    configure_logging()
    if config.workers > 1 and config.control_fd is None:
        return uvloop.run(Supervisor(config, list(argv or [])).run())
    return uvloop.run(serve(config))
