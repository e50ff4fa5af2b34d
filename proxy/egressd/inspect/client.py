"""The engine's side of inspection: :class:`Inspector` hands a decided, pinned TLS tunnel to the worker.

::

    listener ──open(rec, sni, pinned ip, port, inspect, service)──▶ Inspector ──TCP 127.0.0.1:<port>──▶ worker
       │   CONNECT <pinned ip>:<port>, Proxy-Authorization (the worker's secret), X-Egressd-* (who, which name,
       │   which rules) ◀── "200" ── the worker Side, returned; the listener writes the ClientHello and splices
       ▼
    worker ──one JSON line per request (its stdout)──▶ Inspector ──▶ emit(RequestRecord), metrics.inspected

The worker (:mod:`egressd.inspect.worker`) is started on the first inspected tunnel, as ``sys.executable -m
egressd.inspect.worker``: the secret and the CA paths go on its stdin, never argv or env, and its stdin stays open
as its lifeline (it exits at EOF, so it never outlives this process). When it is down, :meth:`Inspector.open`
fails closed (``upstream_failure``, "the inspection worker is down ..."): an inspected name is never passed on
uninspected. The next open starts a new worker at once after a first death, then with a doubling delay
(RESTART_BACKOFF up to RESTART_BACKOFF_MAX) while workers keep dying young. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

import egressd
from egressd.errors import UpstreamFailure
from egressd.hostport import IPAddress, join_host_port
from egressd.inspect.rules import Inspect, InspectEntry, parse_method, parse_path
from egressd.metrics import Metrics
from egressd.records import Record, RequestRecord
from egressd.relay import Side

log = structlog.get_logger("egressd.inspect")

USER = "egressd"  # the Proxy-Authorization user; the password is the worker's secret
H_CONN, H_SNI, H_SERVICE, H_CLIENT, H_POLICY, H_INSPECT = (
    "X-Egressd-Conn", "X-Egressd-Sni", "X-Egressd-Service", "X-Egressd-Client", "X-Egressd-Policy",
    "X-Egressd-Inspect",
)
START_TIMEOUT = 30.0  # seconds for a worker to report its port (mitmproxy's import is most of it)
CONNECT_TIMEOUT = 5.0  # seconds for the worker to answer a CONNECT
STOP_TIMEOUT = 5.0  # seconds close() waits after SIGTERM before SIGKILL
STABLE_AFTER = 30.0  # a worker that ran this long before dying died "old": the next start is immediate
RESTART_BACKOFF, RESTART_BACKOFF_MAX = 0.5, 30.0
MAX_LINE = 1 << 20
_PACKAGE_ROOT = str(Path(egressd.__file__).resolve().parent.parent)


def encode_inspect(inspect: Inspect, rule: str | None) -> str:
    """The X-Egressd-Inspect value: base64url of JSON {rule, entries: [{methods, paths, source}]}."""
    data = {"rule": rule, "entries": [
        {"methods": sorted(e.methods), "paths": list(e.paths), "source": e.source} for e in inspect.entries
    ]}
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode("ascii")


@functools.lru_cache(maxsize=256)
def decode_inspect(value: str) -> tuple[Inspect, str | None]:
    """The rules and the host rule's file:line back from :func:`encode_inspect`; ValueError if malformed.
    Remembered by value: every tunnel of a rule carries the same header, and the values are immutable."""
    try:
        data = json.loads(base64.urlsafe_b64decode(value.encode("ascii")))
        entries = tuple(
            InspectEntry(
                frozenset(parse_method(m) for m in e["methods"]), tuple(e["paths"]),
                tuple(parse_path(p) for p in e["paths"]), source=str(e.get("source") or ""),
            )
            for e in data["entries"]
        )
        rule = data.get("rule")
        return Inspect(entries), rule if isinstance(rule, str) else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed {H_INSPECT} header: {exc}") from None


def connect_head(
    secret: str, rec: Record, sni: str, ip: str, port: int, inspect: Inspect, service: str | None
) -> bytes:
    """The CONNECT request that hands one tunnel to the worker."""
    authority = join_host_port(ip, port)
    token = base64.b64encode(f"{USER}:{secret}".encode()).decode("ascii")
    lines = [
        f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"Proxy-Authorization: Basic {token}",
        f"{H_CONN}: {rec.conn_id}", f"{H_SNI}: {sni}", f"{H_SERVICE}: {service or ''}",
        f"{H_CLIENT}: {rec.client or ''}", f"{H_POLICY}: {rec.policy_version or ''}",
        f"{H_INSPECT}: {encode_inspect(inspect, rec.rule)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def record_from_event(event: dict[str, Any]) -> RequestRecord:
    """The egress.request record of one request line of the worker."""
    rec = RequestRecord(float(event["started"]), str(event["conn_id"]), event.get("service") or None,
                        event.get("client") or None)
    for name in ("host", "port", "upstream", "request", "method", "path", "http_version", "status", "decision",
                 "reason", "detail", "rule", "policy_version"):
        if event.get(name) is not None:
            setattr(rec, name, event[name])
    rec.bytes_up, rec.bytes_down = int(event.get("bytes_up") or 0), int(event.get("bytes_down") or 0)
    rec.duration_ms = float(event.get("duration_ms") or 0.0)
    return rec


class _Worker:
    """One running worker process: its port once ready, when it started, the task reading its lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.started = time.monotonic()
        self.reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and (self.reader is None or not self.reader.done())


class Inspector:
    """Starts the inspection worker on first use, hands it tunnels, turns its lines into records."""

    def __init__(
        self,
        ca_cert: str,
        ca_key: str,
        upstream_ca: str | None,
        log_query: bool,
        emit: Callable[[RequestRecord], object],
        metrics: Metrics,
        *,
        python: str = sys.executable,
    ) -> None:
        self._config = {"ca_cert": str(ca_cert), "ca_key": str(ca_key),
                        "upstream_ca": str(upstream_ca) if upstream_ca else None, "log_query": bool(log_query)}
        self._emit = emit
        self._metrics = metrics
        self._python = python
        self._secret = ""
        self._worker: _Worker | None = None
        self._lock = asyncio.Lock()
        self._failures = 0  # workers in a row that failed to start or died young
        self._not_before = 0.0  # monotonic time before which no new worker is started
        self._last_error = ""
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The running worker's process id (None when none runs)."""
        worker = self._worker
        return worker.proc.pid if worker is not None and worker.alive else None

    async def open(self, rec: Record, sni: str, pinned_ip: IPAddress | str, port: int, inspect: Inspect,
                   service: str | None) -> Side:
        """Hand one tunnel to the worker: the connected worker Side after its 200, in buffer mode (the listener
        writes the client's buffered ClientHello into it, then splices). Raises UpstreamFailure (fail closed)."""
        worker = await self._ready()
        loop = asyncio.get_running_loop()
        head = connect_head(self._secret, rec, sni, str(pinned_ip), port, inspect, service)
        side: Side | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, side = await loop.create_connection(lambda: Side(loop), "127.0.0.1", worker.port)
                side.write(head)
                while b"\r\n\r\n" not in side.buffer and not side.eof:
                    await side.read_more()
        except (OSError, TimeoutError) as exc:
            if side is not None:
                side.abort()
            what = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise UpstreamFailure(self._down(f"handing the tunnel over failed: {what}")) from None
        except asyncio.CancelledError:
            if side is not None:
                side.abort()
            raise
        end = side.buffer.find(b"\r\n\r\n")
        if end < 0:
            side.abort()
            raise UpstreamFailure(self._down("it closed the tunnel before answering"))
        status_line = bytes(side.buffer[: side.buffer.find(b"\r\n")]).decode("latin-1")
        del side.buffer[: end + 4]
        if status_line.split(" ")[1:2] != ["200"]:
            side.abort()
            raise UpstreamFailure(f"the inspection worker refused the tunnel to {sni}: {status_line[:200]}")
        return side

    def _down(self, what: str) -> str:
        return (f"the inspection worker is down ({what}); an inspected tunnel is refused rather than passed on "
                "uninspected")

    async def _ready(self) -> _Worker:
        """The running worker, started now if there is none (and the backoff allows)."""
        worker = self._worker
        if worker is not None and worker.alive and worker.port:
            return worker
        async with self._lock:
            worker = self._worker
            if worker is not None and worker.alive and worker.port:
                return worker
            if self._closed:
                raise UpstreamFailure(self._down("egressd is shutting down"))
            wait = self._not_before - time.monotonic()
            if wait > 0:
                raise UpstreamFailure(self._down(f"{self._last_error}; next start in {wait:.1f}s"))
            try:
                return await self._start()
            except UpstreamFailure as exc:
                self._failed(str(exc))
                raise UpstreamFailure(self._down(str(exc))) from None

    async def _start(self) -> _Worker:
        self._secret = secrets.token_urlsafe(32)
        env = dict(os.environ)
        root = _PACKAGE_ROOT  # the worker imports this same egressd
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        started = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                self._python, "-m", "egressd.inspect.worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=env, limit=MAX_LINE,
            )
        except OSError as exc:
            raise UpstreamFailure(f"cannot start {self._python}: {exc.strerror or exc}") from None
        worker = _Worker(proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({**self._config, "secret": self._secret}).encode() + b"\n")
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await proc.stdin.drain()
                first = _parse(await proc.stdout.readline())
        except (OSError, TimeoutError, ValueError) as exc:
            first = {"error": f"no ready line ({type(exc).__name__}: {exc})"}
        if first.get("event") != "ready" or not isinstance(first.get("port"), int):
            await _stop(proc, 1.0)
            why = first.get("error") or f"it exited with code {proc.returncode} before it was ready"
            raise UpstreamFailure(f"the worker did not start: {why}")
        worker.port = first["port"]
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker))
        self._worker = worker
        log.info("inspect.worker_started", pid=proc.pid, port=worker.port,
                 seconds=round(time.perf_counter() - started, 3))
        return worker

    async def _read(self, worker: _Worker) -> None:
        """Every line of the worker, until it exits; then note its death (the next open starts another)."""
        stdout = worker.proc.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readline()
            except (OSError, ValueError) as exc:  # ValueError: a line longer than MAX_LINE
                log.error("inspect.worker_output_unreadable", error=repr(exc))
                break
            if not line:
                break
            self._handle(_parse(line))
        code = await worker.proc.wait()
        if self._worker is worker:
            self._worker = None
        if not self._closed:
            lived = time.monotonic() - worker.started
            if lived >= STABLE_AFTER:
                self._failures = 0
            self._failed(f"the worker exited with code {code} after {lived:.1f}s")
            log.error("inspect.worker_exited", pid=worker.proc.pid, code=code, seconds=round(lived, 3))

    def _handle(self, event: dict[str, Any]) -> None:
        if event.get("event") != "request":
            if event:
                log.warning("inspect.worker_line", line=event)
            return
        try:
            rec = record_from_event(event)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("inspect.bad_event", error=repr(exc), line=event)
            return
        self._metrics.inspected[(rec.service or "-", rec.decision, rec.reason)] += 1
        self._emit(rec)

    def _failed(self, error: str) -> None:
        """One more worker failed: the first failure in a row restarts at once, later ones after a delay."""
        self._failures += 1
        self._last_error = error
        delay = 0.0 if self._failures <= 1 else min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (self._failures - 2))
        self._not_before = time.monotonic() + delay

    async def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the worker (its stdin closed and SIGTERM, SIGKILL after ``timeout``) and read its last lines."""
        self._closed = True
        async with self._lock:
            worker, self._worker = self._worker, None
        if worker is None:
            return
        await _stop(worker.proc, timeout)
        if worker.reader is not None:
            try:
                async with asyncio.timeout(timeout):
                    await worker.reader
            except TimeoutError:
                worker.reader.cancel()


async def _stop(proc: asyncio.subprocess.Process, timeout: float) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _parse(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {"error": line.decode("utf-8", "replace").strip()[:500]} if line.strip() else {}
    return value if isinstance(value, dict) else {}
