"""One connection's life, the steps every listener shares.

A listener accepts a client, reads what names the destination and calls, in
order: :meth:`Engine.open` (a Record, and the identity of the client),
:meth:`Engine.authorize` (the pure policy decision), :meth:`Engine.connect`
(resolve and pin, then dial only the pinned addresses) and finally
:meth:`Engine.close`, which emits the record and counts the metrics exactly
once whatever happened in between. Errors on the way are
:class:`~egressd.errors.ProxyError`; :meth:`Engine.fail` puts them in the
record.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from egressd.audit import AuditLog
from egressd.config import Config
from egressd.errors import ClientGone, Denied, ProxyError, UpstreamFailure, UpstreamTimeout
from egressd.hostport import Destination, IPAddress, ip_text, join_host_port
from egressd.identity.identify import Identifier
from egressd.limits import MAX_ADDRESSES_PER_NAME, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT, HeadSlots, LimitExceeded
from egressd.metrics import Metrics
from egressd.policy.decide import decide
from egressd.policy.model import Decision, IPNetwork, Policy, Reason
from egressd.records import Record
from egressd.relay import IdleSweeper, Side, peer_address, splice
from egressd.resolve import Resolver

if TYPE_CHECKING:
    from egressd.inspect.client import Inspector
    from egressd.inspect.rules import Inspect

Dial = Callable[[IPAddress, int], Awaitable[Side]]

_REASON_TEXT = {
    Reason.NOT_ALLOWLISTED: "{host} is not in the allowlist of service {service}",
    Reason.PORT_NOT_ALLOWED: "{host} is allowlisted by {rule} but not on port {port}",
    Reason.DENYLISTED: "{host} is denied by {rule}",
    Reason.NO_IDENTITY: "no allowlist is loaded for service {service}",
}


@dataclass(frozen=True, slots=True)
class Client:
    """Who is connecting: the address as the record writes it, its IP (limits count per IP), and the service."""

    address: str
    ip: str
    service: str | None


async def dial_tcp(ip: IPAddress, port: int) -> Side:
    """Open a TCP connection to ip:port (an address, never a name: nothing resolves again here)."""
    loop = asyncio.get_running_loop()
    _, side = await loop.create_connection(lambda: Side(loop), ip_text(ip), port)
    return side


class PolicyHolder:
    """The policy in force. Replaced whole on reload; a connection reads it once, at its decision."""

    __slots__ = ("current",)

    def __init__(self, policy: Policy | None = None) -> None:
        self.current = policy


class Engine:
    """The shared state of a running proxy: policy, resolver, audit log, metrics, open connections."""

    def __init__(
        self,
        config: Config,
        policy: PolicyHolder,
        resolver: Resolver,
        audit: AuditLog,
        metrics: Metrics,
        identifier: Identifier,
        dial: Dial | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.resolver = resolver
        self.audit = audit
        self.metrics = metrics
        self.identifier = identifier
        self.dial = dial or dial_tcp
        self.sweeper = IdleSweeper(config.idle_timeout, time.monotonic)
        self.tasks: set[asyncio.Task] = set()
        self.clients: set[Side] = set()
        self.per_client: dict[str, int] = {}  # open client connections by client IP
        self.capacity = config.max_connections  # lowered to what the file-descriptor limit allows, see fdlimit
        self.heads = HeadSlots(config.max_pending_heads)  # heads arriving: listeners read them through it
        self.inspector: Inspector | None = None  # the inspection worker's client, made on the first inspected tunnel
        self.tunnels: dict[Side, Record] = {}  # spliced tunnels by client side: no task holds them
        self._idle: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._cidrs: tuple[Policy | None, tuple[IPNetwork, ...]] = (None, config.allow_cidrs)
        self._prefix = f"{os.getpid():x}-{int(time.time()) & 0xFFFFFF:06x}-"

    # -- records --------------------------------------------------------------
    def who(self, client: Side) -> Client | None:
        """The client's address, taken once at accept, and its service when fixed (``--service``; else each
        request is identified, see :meth:`identify`). None when the kernel cannot say who connected: such a
        connection is not served."""
        peer = peer_address(client.transport)  # type: ignore[arg-type]
        if peer is None:
            return None
        ip = peer[0].split("%", 1)[0]
        fixed = self.identifier.fixed
        return Client(join_host_port(ip, peer[1]), ip, fixed.service if fixed is not None else None)

    def identify(self, rec: Record, ip: str, authorization: bytes | None = None) -> None:
        """The identify step for one request (or connection): fill rec's service and identity, or raise the
        refusal (``no_identity``, 407 asking for credentials, or ``bad_identity``). Nothing to do when fixed."""
        if self.identifier.fixed is not None:
            return
        identity, service = self.identifier.identify(ip, authorization)
        rec.service = service
        rec.identity = identity.fields()

    def service_of(self, peer: tuple) -> str | None:
        """The service of a client known by its address alone (the DNS filter's clients)."""
        return self.identifier.service_of(peer[0].split("%", 1)[0])

    def audit_refusal(self) -> ProxyError | None:
        """While audit records cannot be written nothing new is served: not a connection, not a request."""
        why = self.audit.unavailable
        if why is None:
            return None
        return ProxyError(
            Reason.AUDIT_UNAVAILABLE,
            f"the audit log cannot be written ({why}); nothing new is served until it can",
            503,
        )

    def admit(self, who: Client) -> ProxyError | None:
        """Whether a newly accepted client may be served: None, or why not (an error answered with 503)."""
        refused = self.audit_refusal()
        if refused is not None:
            return refused
        cfg = self.config
        if len(self.clients) >= self.capacity:
            fds = "" if self.capacity == cfg.max_connections else ", as many as the file-descriptor limit allows"
            return LimitExceeded(MAX_CONNECTIONS, f"{len(self.clients)} connections are open{fds}")
        if self.per_client.get(who.ip, 0) >= cfg.max_connections_per_client:
            return LimitExceeded(MAX_CONNECTIONS_PER_CLIENT, f"{self.per_client[who.ip]} connections are open from "
                                 f"{who.ip}")
        return None

    def open(self, who: Client, listener: str, follows: Record | None = None) -> Record:
        """A new record for a client connection; ``follows`` for the next request on the same connection."""
        if follows is not None:
            service = follows.service if self.identifier.fixed is not None else None  # else identified again
            rec = Record(follows.conn_id, time.time(), follows.client, listener, service)
            rec.request = (follows.request or 1) + 1
            rec.original_dst = follows.original_dst
        else:
            rec = Record(self._prefix + str(next(self._ids)), time.time(), who.address, listener, who.service)
        policy = self.policy.current
        rec.policy_version = policy.version if policy is not None else None  # authorize() sets the one it used
        return rec

    def close(self, rec: Record) -> None:
        """Emit the record and count it, once; later calls do nothing."""
        if rec.emitted:
            return
        rec.duration_ms = (time.time() - rec.started) * 1000
        if rec.limit is not None:
            self.metrics.limit_hits[rec.limit] += 1
        self.metrics.connection_done(
            rec.service or "-", rec.listener, rec.decision, rec.reason, rec.bytes_up, rec.bytes_down
        )
        self.audit.emit(rec)

    @staticmethod
    def fail(rec: Record, exc: ProxyError) -> None:
        """Put exc in the record. Before any byte went upstream it is a denial; after, the request was allowed
        and stays so: the record says how it ended (the failure's reason, or ``allowed`` when the client left)."""
        rec.note(str(exc))
        if isinstance(exc, LimitExceeded):
            rec.limit = exc.limit
        if rec.decision == "allow" and rec.bytes_up:
            if not isinstance(exc, ClientGone):
                rec.reason = exc.reason.value
                rec.status = rec.status or exc.status
            return
        rec.decision = "deny"
        rec.reason = exc.reason.value
        rec.status = rec.status or exc.status

    # -- the steps --------------------------------------------------------------
    def authorize(self, rec: Record, dest: Destination) -> Decision:
        """Decide for rec.service and dest; fill the record; raise Denied when the verdict is deny."""
        policy = self.policy.current
        rec.host, rec.port = dest.host, dest.port
        if policy is None:
            raise Denied(Reason.NO_IDENTITY, "no policy is loaded; egressd denies everything until one loads")
        rec.policy_version = policy.version
        decision = decide(policy, rec.service, dest, self.config.mode)
        rec.rule = decision.source
        rec.reason = decision.reason.value
        rec.would_deny = decision.would_deny
        if not decision.allowed:
            text = _REASON_TEXT.get(decision.reason, "{host} is denied")
            message = text.format(host=dest.host, port=dest.port, service=rec.service, rule=rec.rule)
            raise Denied(decision.reason, message)
        rec.decision = "allow"
        return decision

    async def connect(self, rec: Record, dest: Destination, original: IPAddress | None = None,
                      inspect: Inspect | None = None) -> Side:
        """Resolve and pin dest's addresses, dial them in order, return the connected upstream Side.

        ``original``: the address a redirected client dialled (transparent listener); the record says
        whether egressd's own answer held it. When it is one of the allowed answers it is tried first (the
        client's choice of family and front end is kept); otherwise it is never dialled.

        ``inspect`` (the decision's): the tunnel goes to the inspection worker instead
        (:mod:`egressd.inspect.client`), which dials the first pinned address itself and decides each request;
        the Side returned is the worker's, once it accepted the tunnel."""
        candidates = await self._pin(rec, dest, original)
        if inspect is None:
            return await self._dial(rec, dest, candidates)
        return await self._inspect(rec, dest, candidates[0], inspect)

    async def _inspect(self, rec: Record, dest: Destination, ip: IPAddress, inspect: Inspect) -> Side:
        cfg = self.config
        if not (cfg.inspect_ca_cert and cfg.inspect_ca_key):
            raise UpstreamFailure(f"{rec.rule} inspects {dest.host}, and inspect mode needs --inspect-ca-cert and "
                                  "--inspect-ca-key (the CA apps trust); nothing is forwarded uninspected")
        if self.inspector is None:
            from egressd.inspect.client import Inspector  # inspect mode is loaded only when a policy uses it

            self.inspector = Inspector(cfg.inspect_ca_cert, cfg.inspect_ca_key, cfg.inspect_upstream_ca,
                                       cfg.inspect_log_query, self.audit.emit, self.metrics)
        started = time.perf_counter()
        upstream = await self.inspector.open(rec, dest.host, ip, dest.port, inspect, rec.service)
        rec.connect_ms = (time.perf_counter() - started) * 1000
        rec.upstream = join_host_port(ip_text(ip), dest.port)
        rec.note("inspected: each request is decided by its method and path and has an egress.request record")
        return upstream

    async def _pin(self, rec: Record, dest: Destination, original: IPAddress | None) -> tuple[IPAddress, ...]:
        """Resolve and classify dest's addresses into the record; the ones that may be dialled, in order."""
        pinned = await self.resolver.pin(dest, self._allow_cidrs())
        rec.resolved = [ip_text(ip) for ip in pinned.resolved]
        rec.dns_ms = pinned.dns_ms
        if pinned.dropped:
            rec.limit = MAX_ADDRESSES_PER_NAME
            rec.note(f"{dest.host} has {len(pinned.resolved) + pinned.dropped} addresses; the first "
                     f"{len(pinned.resolved)} were kept (--max-addresses-per-name)")
        candidates = pinned.candidates
        if original is not None:
            rec.original_dst_in_answer = original in pinned.resolved
            if original in candidates and candidates[0] != original:
                candidates = (original, *(ip for ip in candidates if ip != original))
        if pinned.refused:
            refused = "; ".join(c.describe() for c in pinned.refused)
            if not candidates:
                raise Denied(Reason.FORBIDDEN_ADDRESS, f"{dest.host} resolves only to refused addresses: {refused}")
            rec.note("refused " + refused)
        return candidates

    async def _dial(self, rec: Record, dest: Destination, candidates: tuple[IPAddress, ...]) -> Side:
        """Dial the candidates in order within --connect-timeout; the first that answers."""
        deadline = time.monotonic() + self.config.connect_timeout
        timed_out = False
        errors = []
        started = time.perf_counter()
        for n, ip in enumerate(candidates):
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            remaining = len(candidates) - n
            budget = left if remaining == 1 else max(min(left, 0.25), left / remaining)
            try:
                async with asyncio.timeout(budget):
                    upstream = await self.dial(ip, dest.port)
            except TimeoutError:
                timed_out = True
                errors.append(f"{ip}: timed out after {budget:.2f}s")
                continue
            except OSError as exc:
                errors.append(f"{ip}: {exc.strerror or exc}")
                continue
            elapsed = time.perf_counter() - started
            self.metrics.connect_seconds.observe(elapsed)
            rec.connect_ms = elapsed * 1000
            rec.upstream = join_host_port(ip_text(ip), dest.port)
            return upstream
        rec.connect_ms = (time.perf_counter() - started) * 1000
        summary = f"cannot connect to {dest.authority}: " + ("; ".join(errors) or "no time left")
        raise UpstreamTimeout(summary) if timed_out else UpstreamFailure(summary)

    def _allow_cidrs(self) -> tuple[IPNetwork, ...]:
        """--allow-cidr and the policy's allow_cidrs together, built once per loaded policy."""
        policy = self.policy.current
        if self._cidrs[0] is not policy:
            self._cidrs = (policy, self.config.allow_cidrs + (policy.allow_cidrs if policy else ()))
        return self._cidrs[1]

    # -- bookkeeping ----------------------------------------------------------
    def serve(self, client: Side, who: Client, handler: Callable[[Engine, Side, Client], Awaitable[None]]) -> None:
        """Run handler(engine, client, who) on a tracked task; the client counts as active until
        :meth:`release` (its connection_lost)."""
        self.clients.add(client)
        self.per_client[who.ip] = self.per_client.get(who.ip, 0) + 1
        self.metrics.active[who.service or "-"] += 1
        task = asyncio.get_running_loop().create_task(handler(self, client, who))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._check_idle()

    def release(self, client: Side, who: Client) -> None:
        """The client connection is gone: it no longer counts as active."""
        if client in self.clients:
            self.clients.discard(client)
            left = self.per_client.pop(who.ip) - 1
            if left:
                self.per_client[who.ip] = left
            self.metrics.active[who.service or "-"] -= 1
            self._check_idle()

    def splice(self, rec: Record, client: Side, upstream: Side) -> None:
        """Hand a decided tunnel to the relay. No task waits on it: its record is emitted, with the byte
        counts, by the connection_lost of whichever side goes last."""
        self.tunnels[client] = rec
        sweeper = self.sweeper
        sweeper.add(client, upstream)

        def finish() -> None:
            if rec.emitted or not (client.lost and upstream.lost):
                return
            sweeper.discard(client, upstream)
            del self.tunnels[client]
            rec.bytes_up += client.forwarded
            rec.bytes_down += upstream.forwarded
            for side, who in ((upstream, "the origin"), (client, "the client")):
                if side.error is not None:
                    rec.note(f"{who} ended the connection with an error ({side.error}); the other side was reset")
                    break
            self.close(rec)
            self._check_idle()

        client.on_lost = upstream.on_lost = finish
        splice(client, upstream)
        finish()  # both connections may be gone already

    async def drain(self, timeout: float) -> bool:
        """Wait up to timeout seconds for every connection to end; whether they all did."""
        if not self._busy():
            return True
        self._idle = asyncio.get_running_loop().create_future()
        done, _ = await asyncio.wait([self._idle], timeout=timeout)
        return bool(done)

    def abort_all(self, note: str) -> None:
        """Cancel every handler and abort every client connection; open tunnels get ``note`` in their record."""
        for task in list(self.tasks):
            task.cancel()
        for rec in self.tunnels.values():
            rec.note(note)
        for client in list(self.clients):
            client.abort()

    def _busy(self) -> bool:
        return bool(self.tasks or self.clients or self.tunnels)

    def _check_idle(self) -> None:
        if self._idle is not None and not self._idle.done() and not self._busy():
            self._idle.set_result(None)

    def denial_body(self, rec: Record, exc: ProxyError) -> bytes:
        return (
            f"egressd denied {rec.host or '-'}:{rec.port or '-'} for service {rec.service or '-'}: "
            f"{exc.reason.value}: {exc}\n"
        ).encode("utf-8", "replace")
