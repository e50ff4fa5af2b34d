"""Allowlist additions proposed from audit records: records in, rules per service out, then file texts.

::

    JSON lines ─▶ read_records ─▶ Reading (sightings summed per destination, refusals, counts)
    current Policy ───────────────▶ propose ─▶ a ServiceProposal per service: new rules, ports to add, notes
      render_new (a new file), render_block (:mod:`egressd.cli.suggest` edits an existing one) ─▶ as_stream,
      as_patch; the result must load, and :func:`verify` must find every proposed destination allowed

A sighting is an ``egress.connection`` record refused ``not_allowlisted`` or ``port_not_allowed``, or let
through with ``would_deny: true`` (audit mode), or an ``egress.dns`` query for an address (A, AAAA, HTTPS)
refused ``not_allowlisted`` (in audit mode: forwarded, unless the answer was NXDOMAIN: no such name). A record
refused for its address, SNI, Host, parsing, identity or a global deny (:data:`EXCLUDING`) is a refusal: its
names are never proposed, for any service, and no wildcard is proposed over them.

Each sighting is decided again on the current policy (:func:`decide`, enforce mode); what it allows now is
dropped. A port miss on an exact rule (or one-address cidr rule) of the service's own file adds the port to
that rule; anything else becomes a new rule: the exact name on the ports seen (443 when it was seen only in
DNS), ``*.parent`` when at least ``min_siblings`` names directly under ``parent`` were seen on the same ports
(never over a public suffix: :func:`parse_pattern` refuses those), ``cidr: IP/32`` (``/128``) for an IP
literal. Every rule and port carries a comment: how many records, first and last seen.
"""

from __future__ import annotations

import difflib
import functools
import operator
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import orjson

from egressd import records as audit
from egressd.hostport import BadDestination, Destination, normalize_host, parse_ip
from egressd.policy.decide import decide, decide_name
from egressd.policy.loader import SERVICE_NAME
from egressd.policy.match import parse_pattern
from egressd.policy.model import DEFAULT_PORTS, Decision, Mode, Policy, Reason, Rule, ServicePolicy, Verdict
from egressd.policy.nodes import VERSION

MIN_SIBLINGS = 5
SHOWN_NAMES = 4  # names listed in a wildcard's comment
COUNTED = frozenset({Reason.NOT_ALLOWLISTED.value, Reason.PORT_NOT_ALLOWED.value})
EXCLUDING = frozenset(reason.value for reason in (
    Reason.FORBIDDEN_ADDRESS, Reason.SNI_MISMATCH, Reason.SNI_MISSING, Reason.HOST_MISMATCH, Reason.BAD_REQUEST,
    Reason.NO_IDENTITY, Reason.BAD_IDENTITY, Reason.DENYLISTED,
))
ADDRESS_QUERIES = frozenset({"A", "AAAA", "HTTPS"})


@dataclass(frozen=True, slots=True)
class Seen:
    """How many records showed a destination, and when (``ts`` as egressd writes it: RFC 3339, UTC)."""

    connections: int
    queries: int
    first: str
    last: str

    def __add__(self, other: Seen) -> Seen:
        return Seen(self.connections + other.connections, self.queries + other.queries,
                    min(self.first, other.first), max(self.last, other.last))

    def describe(self) -> str:
        kinds = [_count(self.connections, "connection")] * bool(self.connections)
        kinds += [_count(self.queries, "DNS query", "DNS queries")] * bool(self.queries)
        total = _count(self.connections + self.queries, "record")
        return f"{total} ({', '.join(kinds)}), first {self.first}, last {self.last}"


@dataclass(frozen=True, slots=True)
class Sighting:
    service: str
    host: str  # canonical name or IP literal
    port: int | None  # None: a DNS query, which names no port
    ts: str


@dataclass(frozen=True, slots=True)
class Refusal:
    name: str
    reason: str
    service: str | None
    ts: str


@dataclass(frozen=True, slots=True)
class Reading:
    """What the audit lines held, summed up as they are read (a week of records need not fit in memory)."""

    seen: Mapping[tuple[str, str, int | None], Seen]  # (service, host, port; None for DNS) -> its sightings
    refusals: Mapping[str, Refusal]  # name -> its first refusal
    lines: int
    counted: int  # records that are sightings
    refused: int  # records refused for an EXCLUDING reason
    other: int  # records of other events, reasons or query types
    bad: int  # lines that are not JSON audit records, or records missing a field

    def summary(self) -> str:
        return (f"egressd suggest: {_count(self.lines, 'line')} read: {self.counted} counted, "
                f"{self.refused} refused for address, SNI, Host, parsing, identity or global deny (never suggested), "
                f"{self.other} of other events or reasons, {self.bad} not audit records (skipped)")


@dataclass(frozen=True, slots=True)
class NewRule:
    pattern: str  # a canonical host pattern, or a cidr
    ports: frozenset[int]
    seen: Seen
    names: tuple[str, ...]  # the hosts it must allow (for a wildcard: the names it replaces)
    notes: tuple[str, ...] = ()

    @property
    def is_cidr(self) -> bool:
        return "/" in self.pattern


@dataclass(frozen=True, slots=True)
class PortAddition:
    rule: Rule  # an exact host or one-address cidr rule of the service's own file
    ports: frozenset[int]  # the ports to add to it
    seen: Seen


@dataclass(frozen=True, slots=True)
class ServiceProposal:
    service: str
    source: str | None  # the service's file, None for a new one
    rules: tuple[NewRule, ...]
    additions: tuple[PortAddition, ...]
    notes: tuple[str, ...]  # names not suggested, and why

    def destinations(self) -> Iterator[Destination]:
        """Every destination the proposal must allow once applied."""
        wanted = [(name, rule.ports) for rule in self.rules for name in rule.names]
        for addition in self.additions:
            rule = addition.rule
            wanted.append((rule.host or str(rule.cidr.network_address), addition.ports))  # type: ignore[union-attr]
        return (Destination(host, port, parse_ip(host)) for host, ports in wanted for port in sorted(ports))


def read_records(lines: Iterable[str | bytes]) -> Reading:
    """Sort audit lines into sightings and refusals; blank lines are ignored, every other one is counted."""
    seen: dict[tuple[str, str, int | None], Seen] = {}
    refusals: dict[str, Refusal] = {}
    tally = {"lines": 0, "counted": 0, "refused": 0, "other": 0, "bad": 0}
    for line in lines:
        if not line.strip():
            continue
        tally["lines"] += 1
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            record = None
        kind, found = _classify(record) if isinstance(record, dict) else ("bad", ())
        tally[kind] += 1
        for item in found:
            if isinstance(item, Refusal):
                if item.name not in refusals or item.ts < refusals[item.name].ts:
                    refusals[item.name] = item
                continue
            key = (item.service, item.host, item.port)
            one = Seen(int(item.port is not None), int(item.port is None), item.ts, item.ts)
            seen[key] = seen[key] + one if key in seen else one
    return Reading(MappingProxyType(seen), MappingProxyType(refusals), **tally)


def _classify(record: dict) -> tuple[str, tuple[Sighting, ...] | tuple[Refusal, ...]]:
    event, reason, ts, service = (record.get(key) for key in (audit.EVENT, audit.REASON, audit.TS, audit.SERVICE))
    if event == audit.CONNECTION_EVENT:
        names, port = (record.get(audit.HOST), record.get(audit.SNI)), record.get(audit.PORT)
        counted = reason in COUNTED or (record.get(audit.WOULD_DENY) is True and reason not in EXCLUDING)
    elif event == audit.DNS_EVENT:
        names, port = (record.get(audit.QNAME),), None
        nxdomain = record.get(audit.DECISION) == "allow" and record.get(audit.RCODE) == "NXDOMAIN"
        counted = reason == Reason.NOT_ALLOWLISTED.value and record.get(audit.QTYPE) in ADDRESS_QUERIES and not nxdomain
    else:
        return "other", ()
    if not isinstance(ts, str) or not isinstance(reason, str):
        return "bad", ()
    if reason in EXCLUDING:
        hosts = dict.fromkeys(host for host in map(_canonical, names) if host is not None)
        return "refused", tuple(Refusal(host, reason, service if isinstance(service, str) else None, ts)
                                for host in hosts)
    if not counted:
        return "other", ()
    host = _canonical(names[0])
    if event == audit.DNS_EVENT and host is not None and parse_ip(host) is not None:
        return "other", ()  # a query for an IP literal names nothing to allow
    good_port = port is None if event == audit.DNS_EVENT else type(port) is int and 1 <= port <= 65535
    if not isinstance(service, str) or not SERVICE_NAME.match(service) or host is None or not good_port:
        return "bad", ()
    return "counted", (Sighting(service, host, port, ts),)


def _canonical(text: object) -> str | None:
    try:
        return normalize_host(text) if isinstance(text, str) else None
    except BadDestination:
        return None


def propose(policy: Policy, reading: Reading, service: str | None = None,
            min_siblings: int = MIN_SIBLINGS) -> tuple[ServiceProposal, ...]:
    """The additions each service needs (only ``service`` when given), from ``reading`` against ``policy``;
    a service whose names were all left out has only notes."""
    services: dict[str, dict[str, dict[int | None, Seen]]] = {}
    for (name, host, port), seen in reading.seen.items():
        if service is None or name == service:
            services.setdefault(name, {}).setdefault(host, {})[port] = seen
    proposals = (_propose_service(policy, name, hosts, reading.refusals, min_siblings)
                 for name, hosts in sorted(services.items()))
    return tuple(proposal for proposal in proposals if proposal.rules or proposal.additions or proposal.notes)


def _propose_service(policy: Policy, service: str, hosts: dict[str, dict[int | None, Seen]],
                     refused: Mapping[str, Refusal], min_siblings: int) -> ServiceProposal:
    own = policy.services.get(service)
    wanted: dict[str, tuple[frozenset[int], Seen, tuple[str, ...]]] = {}
    additions: dict[str, PortAddition] = {}
    notes: list[str] = []
    for host, by_port in sorted(hosts.items()):
        ports = sorted(port for port in by_port if port is not None) or [None]
        decisions = [(port, _decision(policy, service, host, port)) for port in ports]
        missing = [(port, decision) for port, decision in decisions if not decision.allowed]
        if not missing:
            continue
        denied = next((decision for _, decision in missing if decision.reason is Reason.DENYLISTED), None)
        if host in refused or denied is not None:
            why = _refusal_text(refused[host]) if host in refused else f"denied by the global rule at {denied.source}"
            notes.append(f"not suggested: {host}: {why}")  # type: ignore[union-attr]
            continue
        new_ports: set[int] = set()
        extra: list[str] = []
        for port, decision in missing:
            rule = decision.rule
            if port is not None and rule is not None and _extendable(rule, own):
                old = additions.get(rule.source)
                additions[rule.source] = PortAddition(rule, (old.ports if old else frozenset()) | {port},
                                                      old.seen + by_port[port] if old else by_port[port])
                continue
            new_ports.add(port if port is not None else 443)
            if port is None:
                extra.append("seen only in DNS queries: port 443 assumed; change ports: if the service uses another")
            elif rule is not None:
                extra.append(f"port {port} for this name only: {rule.pattern} ({rule.source}) allows it on "
                             f"{ports_text(rule.ports)}")
        if new_ports:
            total = functools.reduce(operator.add, by_port.values())
            wanted[host] = (frozenset(new_ports), total, tuple(dict.fromkeys(extra)))
    rules = _rules(wanted, refused, min_siblings, notes)
    return ServiceProposal(service, own.source if own else None, rules, tuple(additions.values()), tuple(notes))


def _decision(policy: Policy, service: str, host: str, port: int | None) -> Decision:
    """The current policy's decision, in enforce mode; for a service with no file, only its global deny."""
    ip = parse_ip(host)
    if service not in policy.services:
        denied = policy.global_deny.match_ip(ip) if ip is not None else policy.global_deny.match_host(host)
        if denied:
            return Decision(Verdict.DENY, Reason.DENYLISTED, denied[0])
        return Decision(Verdict.DENY, Reason.NOT_ALLOWLISTED)
    if port is None:
        return decide_name(policy, service, host, mode=Mode.ENFORCE)
    return decide(policy, service, Destination(host, port, ip), Mode.ENFORCE)


def _extendable(rule: Rule, own: ServicePolicy | None) -> bool:
    """A rule of the service's own file naming one destination: an exact host or a one-address cidr."""
    if own is None or not rule.source.startswith(f"{own.source}:"):
        return False
    if rule.cidr is not None:
        return rule.cidr.num_addresses == 1
    return rule.host is not None and "*" not in rule.host


def _rules(wanted: dict[str, tuple[frozenset[int], Seen, tuple[str, ...]]], refused: Mapping[str, Refusal],
           min_siblings: int, notes: list[str]) -> tuple[NewRule, ...]:
    """Exact names, grouped into ``*.parent`` where enough siblings on the same ports allow, and cidr rules."""
    groups: dict[tuple[str, frozenset[int]], list[str]] = {}
    for host, (ports, _, _) in wanted.items():
        parent = host.partition(".")[2]
        if parent and parse_ip(host) is None:
            groups.setdefault((parent, ports), []).append(host)
    rules: list[NewRule] = []
    grouped: set[str] = set()
    for (parent, ports), names in sorted(groups.items(), key=lambda item: (item[0][0], sorted(item[0][1]))):
        if len(names) < min_siblings:
            continue
        blocker = next((refused[name] for name in sorted(refused) if name.partition(".")[2] == parent), None)
        pattern = _wildcard(parent)
        if blocker is not None or pattern is None:
            why = (f"{blocker.name} under it was {_refusal_text(blocker)}" if blocker is not None
                   else f"{parent} is a public suffix, anyone can register a name under it")
            notes.append(f"no wildcard *.{parent} over {_count(len(names), 'name')}: {why}")
            continue
        grouped.update(names)
        dns_only = sum(wanted[name][1].connections == 0 for name in names)
        more = f" and {len(names) - SHOWN_NAMES} more" if names[SHOWN_NAMES:] else ""
        shown = ", ".join(name.partition(".")[0] for name in names[:SHOWN_NAMES]) + more
        rule_notes = [f"replaces {_count(len(names), 'name')} seen under {parent}: {shown}"]
        if dns_only:
            rule_notes.append(f"{dns_only} of them seen only in DNS queries (port 443 assumed)")
        total = functools.reduce(operator.add, (wanted[name][1] for name in names))
        rules.append(NewRule(pattern, ports, total, tuple(names), tuple(rule_notes)))
    for host, (ports, seen, extra) in wanted.items():
        if host in grouped:
            continue
        ip = parse_ip(host)
        if ip is None:
            rules.append(NewRule(host, ports, seen, (host,), extra))
        else:
            no_name = f"{host} has no name: replace this rule with a host: rule if the destination has one"
            rules.append(NewRule(f"{host}/{ip.max_prefixlen}", ports, seen, (host,), (no_name, *extra)))
    return tuple(sorted(rules, key=_rule_order))


def _rule_order(rule: NewRule) -> tuple[object, ...]:
    if rule.is_cidr:
        ip = parse_ip(rule.pattern.partition("/")[0])
        return (1, ip.version, int(ip))  # type: ignore[union-attr]
    return (0, tuple(reversed(rule.pattern.split("."))))


def _wildcard(parent: str) -> str | None:
    try:
        return parse_pattern(f"*.{parent}")
    except ValueError:
        return None


def _refusal_text(refusal: Refusal) -> str:
    return (f"refused for {refusal.reason} ({refusal.service or 'no service'}, {refusal.ts}); "
            "add it by hand once that is understood")


# -- file texts ----------------------------------------------------------------------------------------------


def render_new(proposal: ServiceProposal) -> str:
    """A whole new service file holding the proposal."""
    return (f"# Egress allowlist of the {proposal.service} service, suggested by `egressd suggest` from audit "
            "records.\n# Review every rule before merging. Format: allowlists/README.md.\n"
            f"version: {VERSION}\nservice: {proposal.service}\nmode: enforce\nallow:\n"
            + render_block(proposal, "  "))


def render_block(proposal: ServiceProposal, indent: str) -> str:
    """The proposal's rules and notes as ``allow:`` items indented by ``indent``, each rule under its comments."""
    lines: list[str] = []
    for rule in proposal.rules:
        lines += [f"{indent}# {text}" for text in (rule.seen.describe(), *rule.notes)]
        value = f'"{rule.pattern}"' if rule.pattern.startswith("*") else rule.pattern
        lines.append(f"{indent}- {'cidr' if rule.is_cidr else 'host'}: {value}")
        if rule.ports != DEFAULT_PORTS:
            lines.append(f"{indent}  ports: {flow_ports(rule.ports)}")
    lines += [f"{indent}# {note}" for note in proposal.notes]
    return "".join(line + "\n" for line in lines)


def as_stream(files: Iterable[tuple[str, str]]) -> str:
    """Service files as one YAML stream: ``---`` between them, each headed ``# file: <name>``."""
    return "---\n".join(f"# file: {name}\n{text}" for name, text in files)


def as_patch(changes: Iterable[tuple[str, str | None, str]]) -> str:
    """A unified diff of ``(path, old text or None for a new file, new text)``, applicable with ``git apply``."""
    lines: list[str] = []
    for path, old, new in changes:
        before = old.splitlines(keepends=True) if old is not None else []
        lines += difflib.unified_diff(before, new.splitlines(keepends=True),
                                      f"a/{path}" if old is not None else "/dev/null", f"b/{path}")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def verify(policy: Policy, proposals: Iterable[ServiceProposal]) -> list[str]:
    """Every proposed destination that ``policy`` (the proposal applied) does not allow; empty when all are."""
    missed = []
    for proposal in proposals:
        for dest in proposal.destinations():
            decision = decide(policy, proposal.service, dest, Mode.ENFORCE)
            if not decision.allowed:
                missed.append(f"{proposal.service} {dest.authority}: {decision.reason.value}")
    return missed


def flow_ports(ports: Iterable[int] | None, added: Iterable[int] = ()) -> str:
    return "[" + ", ".join(map(str, sorted({*(ports or ()), *added}))) + "]"


def ports_text(ports: Iterable[int] | None) -> str:
    return "every port" if ports is None else ", ".join(map(str, sorted(ports)))


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
