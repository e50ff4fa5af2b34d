"""The DNS filter's steps for one query: decide, answer (from the cache, upstream or ourselves), seed, record.

::

    wire ─▶ read_query ─▶ normalize_host ─▶ decide_name ─┬─ deny ──▶ NXDOMAIN now, no upstream query
                                                        └─ allow ─▶ AnswerCache ─ hit ──▶ the kept answer, TTLs lowered
                                                                       └─ miss ─▶ task: ask_upstream ─▶ Answer.of
    every query: Resolver.seed (A/AAAA answers), one egress.dns record (unless --dns-audit denied), one count
    while the audit log cannot be written: SERVFAIL (audit_unavailable) before any decision, as the proxy's 503

:class:`Filter` is shared by the UDP socket and the TCP connections of
:mod:`egressd.listeners.dns`; the message logic is in :mod:`egressd.sniff.dns`.

The cache, and why: the app asks the same few names over and over (every
connection starts with an A and an AAAA query, ndots:5 search lists multiply
them), so a small answer cache keyed by (name, type, class, RD/CD/DO bits)
answers most queries without a task or an await. An answer is kept for its
smallest TTL (a negative answer for its SOA's negative TTL, and not at all
without an SOA, RFC 2308), at most ``--dns-max-ttl``; replies from it have
their TTLs lowered by the whole seconds it was held. Each entry also keeps
its last rendering per response form (EDNS, DO, AD, padding) for the current
second, which a later client gets with only its ID and question bytes put in
(:func:`~egressd.sniff.dns.stamp`): dnspython renders an answer in about 60
µs, and skipping that took one core from about 7,000 to 11,000 cached answers
a second. Denials are kept rendered the same way. Decisions are never cached:
each query is decided against the policy in force.

Upstream (:func:`egressd.listeners.dns.ask_upstream`, the I/O, handed in):
the client's question (:func:`~egressd.sniff.dns.upstream_query`) goes to
each resolver in turn (``--resolver``, else resolv.conf as read at
start) over UDP with ``--dns-timeout`` for each, again over TCP when the UDP
answer is truncated; the first NOERROR or NXDOMAIN answer is the answer.
Timeouts, unreachable resolvers and other rcodes from all of them give the
client SERVFAIL (``dns_failure``). Concurrent misses of one name are not
merged: each asks upstream (the cache absorbs the repeats).

Limits (:mod:`egressd.limits`): one client may send ``--dns-max-qps-per-client``
queries a second (and a burst of two seconds' worth); past that its queries
are answered REFUSED before anything else is done. At most
``--max-pending-lookups`` queries wait upstream; past that a query is answered
SERVFAIL at once. Both are ``overloaded`` with the limit in the record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import structlog

from egressd.config import ConfigError, system_resolvers
from egressd.connection import Engine
from egressd.hostport import BadDestination, join_host_port, normalize_host
from egressd.limits import DNS_MAX_QPS_PER_CLIENT, MAX_PENDING_LOOKUPS, RateLimiter, flag
from egressd.policy.decide import decide_name, passthrough_suffix
from egressd.policy.model import Decision, Reason, Verdict
from egressd.records import DnsRecord
from egressd.sniff.dns import (
    MAX_MESSAGE,
    Answer,
    Bad,
    addresses_of,
    read_query,
    refusal,
    render,
    reply,
    response_form,
    stamp,
    udp_limit,
    upstream_query,
)

log = structlog.get_logger("egressd.dns")

MAX_CACHE_ENTRIES = 4096

Send = Callable[[bytes], None]
Upstreams = tuple[tuple[str, int], ...]
# (query, resolvers, timeout each) -> (the answer or None, what each failed resolver did): listeners.dns.ask_upstream
Ask = Callable[[dns.message.Message, Upstreams, float], Awaitable[tuple[dns.message.Message | None, list[str]]]]
CacheKey = tuple[str, int, int, int]  # canonical name, qtype, qclass, RD|CD|DO bits of the query
Renders = dict[tuple, tuple[int, bytes, list]]  # response form -> (seconds held, wire, the record's answers)


def cache_key(name: str, query: dns.message.Message) -> CacheKey:
    question = query.question[0]
    return name, question.rdtype, question.rdclass, (query.flags & (dns.flags.RD | dns.flags.CD)) | (
        query.ednsflags & dns.flags.DO
    )


class AnswerCache:
    """Answers by :data:`CacheKey` until their lifetime is up, with their renderings; past ``size`` entries the
    oldest goes. Times are seconds of a monotonic clock the caller passes in."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = MAX_CACHE_ENTRIES) -> None:
        self._entries: dict[CacheKey, tuple[float, Answer, Renders]] = {}
        self._size = size

    def get(self, key: CacheKey, now: float) -> tuple[Answer, int, Renders] | None:
        """The answer, the whole seconds it has been held, and its renderings; None when absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored, answer, renders = entry
        elapsed = int(now - stored)
        if elapsed >= answer.lifetime:
            del self._entries[key]
            return None
        return answer, elapsed, renders

    def put(self, key: CacheKey, answer: Answer, now: float) -> Renders | None:
        """Keep ``answer`` unless its lifetime is 0; the renderings to fill, or None when it is not kept."""
        if answer.lifetime <= 0:
            return None
        if key not in self._entries and len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]
        renders: Renders = {}
        self._entries[key] = (now, answer, renders)
        return renders

    def __len__(self) -> int:
        return len(self._entries)


def _note(rec: DnsRecord, text: str) -> None:
    rec.detail = text if not rec.detail else f"{rec.detail}; {text}"


class Filter:
    """Decides, answers and records each query; shared by the UDP socket and the TCP connections of a port."""

    def __init__(self, engine: Engine, ask: Ask) -> None:
        cfg = engine.config
        self.engine = engine
        self.ask = ask
        self.upstreams = cfg.resolvers or system_resolvers()
        try:
            self.passthrough = tuple(normalize_host(suffix) for suffix in cfg.dns_passthrough)
        except BadDestination as exc:
            raise ConfigError(f"--dns-passthrough: {exc}") from None
        self.denied_only = cfg.dns_audit == "denied"
        self.cache = AnswerCache()
        self.denials: dict[tuple, bytes] = {}  # (cache key, response form) -> a rendered NXDOMAIN
        self.tasks: dict[asyncio.Task[None], DnsRecord] = {}  # queries waiting upstream, with their records
        self.max_pending = cfg.max_pending_lookups
        self.rates = RateLimiter(cfg.dns_max_qps_per_client)

    def receive(self, wire: bytes, peer: tuple, send: Send, udp: bool) -> asyncio.Task[None] | None:
        """Answer one message from ``peer``; the task when the answer waits for upstream, else None (answered)."""
        engine = self.engine
        ip = peer[0].split("%", 1)[0]
        rec = DnsRecord(time.time(), engine.service_of(peer), join_host_port(ip, peer[1]))
        query = read_query(wire)
        if isinstance(query, Bad):
            rec.rcode, rec.detail = query.rcode, query.detail
            if query.wire is not None:
                send(query.wire)
            self.finish(rec)
            return None
        question = query.question[0]
        rec.qtype = dns.rdatatype.to_text(question.rdtype)
        text = question.name.to_text(omit_final_dot=True)
        if not self.rates.allow(ip):
            rec.qname, rec.reason, rec.limit = text, Reason.OVERLOADED.value, DNS_MAX_QPS_PER_CLIENT
            self._refuse(rec, query, send, udp, dns.rcode.REFUSED, f"{ip} sent more than {self.rates.rate:g} "
                         f"queries a second, the {flag(DNS_MAX_QPS_PER_CLIENT)} limit")
            return None
        try:
            name = rec.qname = normalize_host(text)
        except BadDestination as exc:
            rec.qname = text
            self._refuse(rec, query, send, udp, dns.rcode.NXDOMAIN, f"the name does not normalise: {exc}")
            return None
        refused = engine.audit_refusal()
        if refused is not None:  # no record could be written: answer nothing (a SERVFAIL, so clients retry later)
            rec.decision, rec.reason = "deny", refused.reason.value
            self._refuse(rec, query, send, udp, dns.rcode.SERVFAIL, str(refused))
            return None
        policy = engine.policy.current
        if policy is None:
            decision = Decision(Verdict.DENY, Reason.NO_IDENTITY)
        else:
            rec.policy_version = policy.version
            decision = decide_name(policy, rec.service, name, self.passthrough, engine.config.mode)
        rec.reason = decision.reason.value
        rec.rule = decision.source
        key = cache_key(name, query)
        if not decision.allowed:
            self._deny(rec, query, wire, key, send, _denial(decision, name, rec))
            return None
        rec.decision = "allow"
        if decision.would_deny:
            rec.detail = f"mode audit: forwarded, would be denied ({decision.reason.value})"
        elif decision.reason is Reason.PASSTHROUGH:
            rec.detail = f"under the pass-through suffix {passthrough_suffix(name, self.passthrough)}"
        hit = self.cache.get(key, time.monotonic())
        if hit is not None:
            self._answer(rec, query, wire, name, *hit, send, udp)
            return None
        if len(self.tasks) >= self.max_pending:
            rec.decision, rec.reason, rec.limit = "deny", Reason.OVERLOADED.value, MAX_PENDING_LOOKUPS
            self._refuse(rec, query, send, udp, dns.rcode.SERVFAIL,
                         f"{len(self.tasks)} queries wait upstream, the {flag(MAX_PENDING_LOOKUPS)} limit")
            return None
        task = asyncio.get_running_loop().create_task(self._forward(rec, query, wire, name, key, send, udp))
        self.tasks[task] = rec
        task.add_done_callback(self._task_done)
        return task

    def _deny(self, rec: DnsRecord, query: dns.message.Message, wire: bytes, key: CacheKey, send: Send,
              detail: str) -> None:
        """NXDOMAIN for a denied name, rendered once per name and response form."""
        form = (key, response_form(query))
        template = self.denials.get(form)
        out = stamp(template, wire) if template is not None else None
        if out is None:
            out = render(refusal(query, dns.rcode.NXDOMAIN), MAX_MESSAGE)
            if len(self.denials) >= MAX_CACHE_ENTRIES:
                del self.denials[next(iter(self.denials))]
            self.denials[form] = out
        send(out)
        rec.rcode = "NXDOMAIN"
        _note(rec, detail)
        self.finish(rec)

    def _refuse(self, rec: DnsRecord, query: dns.message.Message, send: Send, udp: bool, rcode: int,
                detail: str) -> None:
        send(render(refusal(query, rcode), udp_limit(query) if udp else MAX_MESSAGE))
        rec.rcode = dns.rcode.to_text(rcode)
        _note(rec, detail)
        self.finish(rec)

    def _answer(self, rec: DnsRecord, query: dns.message.Message, wire: bytes, name: str, answer: Answer,
                elapsed: int, renders: Renders | None, send: Send, udp: bool) -> None:
        limit = udp_limit(query) if udp else MAX_MESSAGE
        form = response_form(query)
        memo = renders.get(form) if renders is not None else None
        out = None
        if memo is not None and memo[0] == elapsed and len(memo[1]) <= limit:
            out, answers = stamp(memo[1], wire), memo[2]
        if out is None:
            response = reply(query, answer, elapsed)
            out, answers = render(response, MAX_MESSAGE), addresses_of(response)
            if renders is not None:
                renders[form] = (elapsed, out, answers)
            if len(out) > limit:
                out = render(response, limit)
        send(out)
        rec.rcode = dns.rcode.to_text(answer.rcode)
        if out[2] & 0x02:  # TC: the client got no records and asks again over TCP
            _note(rec, f"truncated: the answer does not fit the client's {limit} bytes over UDP")
        else:
            rec.answers = answers
        if answer.ech_stripped:
            _note(rec, f"ech removed from {answer.ech_stripped} HTTPS/SVCB record(s)")
        if answer.seed is not None:
            ips, ttl = answer.seed
            self.engine.resolver.seed(name, query.question[0].rdtype, ips, ttl - elapsed)
        self.finish(rec)

    async def _forward(self, rec: DnsRecord, query: dns.message.Message, wire: bytes, name: str, key: CacheKey,
                       send: Send, udp: bool) -> None:
        try:
            started = time.perf_counter()
            response, errors = await self.ask(upstream_query(query), self.upstreams, self.engine.config.dns_timeout)
            waited = time.perf_counter() - started
            rec.upstream_ms = waited * 1000
            self.engine.metrics.dns_upstream_seconds.observe(waited)
            if response is None:
                rec.reason = Reason.DNS_FAILURE.value
                self._refuse(rec, query, send, udp, dns.rcode.SERVFAIL, "; ".join(errors))
                return
            answer = Answer.of(response, self.engine.config.dns_max_ttl)
            renders = self.cache.put(key, answer, time.monotonic())
            self._answer(rec, query, wire, name, answer, 0, renders, send, udp)
        except asyncio.CancelledError:
            self._shut_down(rec)
            raise
        except Exception as exc:  # a bug must cost one query, never the listener; the record still goes out
            log.exception("dns.internal_error", qname=rec.qname)
            rec.reason = Reason.DNS_FAILURE.value
            self._refuse(rec, query, send, udp, dns.rcode.SERVFAIL, f"internal error: {type(exc).__name__}: {exc}")

    def _shut_down(self, rec: DnsRecord) -> None:
        if rec.emitted:
            return
        rec.reason = Reason.DNS_FAILURE.value
        _note(rec, "the proxy shut down before the resolvers answered")
        self.finish(rec)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)

    def finish(self, rec: DnsRecord) -> None:
        """Count the query and write its record (unless --dns-audit denied and it was not denied); once."""
        if rec.emitted:
            return
        metrics = self.engine.metrics
        metrics.dns_queries[(rec.service or "-", rec.decision, rec.reason)] += 1
        if rec.limit is not None:
            metrics.limit_hits[rec.limit] += 1
        if self.denied_only and rec.decision != "deny":
            rec.emitted = True
        else:
            self.engine.audit.emit(rec)

    def close(self) -> None:
        """Record and cancel every query still waiting for upstream."""
        for task, rec in list(self.tasks.items()):
            self._shut_down(rec)
            task.cancel()


def _denial(decision: Decision, name: str, rec: DnsRecord) -> str:
    if decision.reason is Reason.DENYLISTED:
        why = f"{name} is denied by {decision.source}"
    elif decision.reason is Reason.NO_IDENTITY:
        why = f"no allowlist is loaded for service {rec.service}"
    else:
        why = f"{name} is not in the allowlist of service {rec.service}"
    return why + "; answered NXDOMAIN without asking upstream"
