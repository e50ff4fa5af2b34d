"""What a change to the allowlists opens up: two loaded Policies in, per-service changes out (pure).

Each change is judged by the rules alone (patterns and ports, wildcards through
:func:`egressd.policy.match.covers`), never by listing names::

    old Policy ─┐                          ┌─ global   (allow, deny, allow_cidrs: every service)
                ├─ diff_policies ─▶ Sections┤
    new Policy ─┘                          └─ one per service (rules, identities, mode, the file itself)

A rule that appears is a widening only for the ports it opens: a port that the
service already reached (through its own file or the global one) opens
nothing, and a name a global deny blocks opens nothing either. A rule that
disappears is a narrowing only for the ports it no longer allows. So a rule
moved from one file to another is judged per service: the service that gains
it widens unless it already reached it through the global file.

Wildcards: an added pattern that covers one the file had is ``widened`` (a
``*.`` that became ``**.``, a new wildcard over exact names, which are named);
a removed one that covers an added one is ``narrowed``. Global denies work the
other way round: a deny removed or narrowed widens every service.

Inspection, per pattern and port both sides have in one list (the entries of
all its rules there, as decide merges them): ``inspect:`` removed widens (every
request passes now), added narrows; a (method, path) that no old one covers
(:func:`egressd.inspect.rules.path_covers`) widens, one no new one covers narrows.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from egressd.inspect.rules import path_covers
from egressd.policy.match import covers
from egressd.policy.model import IPNetwork, Mode, Policy, Rule, ServicePolicy

__all__ = ["GLOBAL", "Change", "Effect", "Kind", "PolicyDiff", "Section", "diff_policies"]

GLOBAL = ""  # the name of the global section


class Effect(enum.Enum):
    """What a change does to what a service may reach."""

    WIDENS = "widens"
    NARROWS = "narrows"
    SAME = "same reach"


class Kind(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"
    WIDENED = "widened"
    NARROWED = "narrowed"
    PORTS_ADDED = "ports added"
    PORTS_REMOVED = "ports removed"
    TLS = "tls"
    IDENTITY_ADDED = "identity added"
    IDENTITY_REMOVED = "identity removed"
    MODE = "mode"
    SERVICE_ADDED = "service added"
    SERVICE_REMOVED = "service removed"
    INSPECT_ADDED = "inspection added"
    INSPECT_REMOVED = "inspection removed"
    REQUESTS_ADDED = "requests added"
    REQUESTS_REMOVED = "requests removed"


@dataclass(frozen=True, slots=True)
class Change:
    """One change: what it does, to which rule, on which ports, and the rules that explain the judgement.

    ``rule`` is the new rule for an addition and the old one for a removal; ``ports`` the ports opened or
    closed (``(None,)`` for a deny, which covers every port); ``others`` the rules a widening replaces or a
    narrowing turns into; ``covered`` the rules that keep some ports reachable (already or still allowed,
    or a global deny that blocks the name); ``subject`` the text of a change that is not a rule.
    """

    effect: Effect
    kind: Kind
    scope: str = ""  # "" for a service's allow list; "allow", "deny" or "allow_cidrs" in the global file
    rule: Rule | None = None
    ports: tuple[int | None, ...] = ()
    others: tuple[Rule, ...] = ()
    kept: tuple[Rule, ...] = ()  # WIDENED: existing rules, still there, that the new wildcard covers
    covered: tuple[Rule, ...] = ()
    covered_ports: tuple[int | None, ...] = ()  # the ports of ``rule`` that ``covered`` keeps reachable
    subject: str = ""
    source: str = ""


@dataclass(frozen=True, slots=True)
class Section:
    """The changes of one service (``name``) or of the global file (``name`` is ``GLOBAL``).

    ``mode`` is the service's mode now (None for the global section and a removed service): in audit mode
    what the allowlist adds changes what is enforced once the service is enforced, not what it reaches today.
    """

    name: str
    source: str
    changes: tuple[Change, ...]
    mode: Mode | None = None


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    sections: tuple[Section, ...]

    def count(self, effect: Effect) -> int:
        return sum(change.effect is effect for section in self.sections for change in section.changes)

    @property
    def widens(self) -> bool:
        return self.count(Effect.WIDENS) > 0


def diff_policies(old: Policy, new: Policy) -> PolicyDiff:
    """The changes from ``old`` to ``new``: the global section first (when it has any), then services by name."""
    sections = [_global_section(old, new)]
    for name in sorted(set(old.services) | set(new.services)):
        sections.append(_service_section(old, new, name))
    return PolicyDiff(tuple(section for section in sections if section.changes))


def _global_section(old: Policy, new: Policy) -> Section:
    was, now = old.global_allow.rules, new.global_allow.rules
    changes = _compare(was, now, was, now, old.global_deny.rules, new.global_deny.rules, "allow")
    was, now = old.global_deny.rules, new.global_deny.rules
    changes += _compare(was, now, was, now, (), (), "deny")
    changes += _allow_cidrs(old, new)
    return Section(GLOBAL, _global_file(new) or _global_file(old), tuple(changes))


def _service_section(old: Policy, new: Policy, name: str) -> Section:
    before, after = old.services.get(name), new.services.get(name)
    if after is None:
        assert before is not None
        rules = len(before.allow)
        removed = Change(Effect.NARROWS, Kind.SERVICE_REMOVED, subject=f"{rules} rule{'s' * (rules != 1)}",
                         source=before.source)
        return Section(name, before.source, (removed,))
    changes: list[Change] = []
    if before is None:
        changes.append(Change(Effect.WIDENS, Kind.SERVICE_ADDED, subject=after.mode.value, source=after.source))
        reach_before: tuple[Rule, ...] = ()  # a service that did not exist reached nothing
        rules_before: tuple[Rule, ...] = ()
    else:
        if before.mode is not after.mode:
            effect = Effect.WIDENS if after.mode is Mode.AUDIT else Effect.NARROWS
            subject = f"{before.mode.value} -> {after.mode.value}"
            changes.append(Change(effect, Kind.MODE, subject=subject, source=after.source))
        rules_before = before.allow.rules
        reach_before = rules_before + old.global_allow.rules
    reach_after = after.allow.rules + new.global_allow.rules
    changes += _compare(rules_before, after.allow.rules, reach_before, reach_after,
                        old.global_deny.rules, new.global_deny.rules, "")
    changes += _identities(before, after)
    return Section(name, after.source, tuple(changes), after.mode)


# Rules: grants (pattern, port) -> the first rule that grants it, compared pattern by pattern.

Grants = dict[str, dict[int | None, Rule]]


def _grants(rules: Iterable[Rule]) -> Grants:
    grants: Grants = {}
    for rule in rules:
        slot = grants.setdefault(rule.pattern, {})
        for port in sorted(rule.ports) if rule.ports is not None else (None,):
            slot.setdefault(port, rule)
    return grants


def _covers(wide: Rule, narrow: Rule) -> bool:
    """Whether ``wide`` matches every destination ``narrow`` does (ports aside)."""
    if narrow.host is not None:
        return wide.host is not None and covers(wide.host, narrow.host)
    return _within(narrow.cidr, wide.cidr)  # type: ignore[arg-type]


def _within(narrow: IPNetwork, wide: IPNetwork | None) -> bool:
    return wide is not None and wide.version == narrow.version and narrow.subnet_of(wide)  # type: ignore[arg-type]


def _reach(rule: Rule, ports: Iterable[int | None], allow: Sequence[Rule], deny: Sequence[Rule]) -> _Reach:
    """Which of ``ports`` the ``allow`` rules reach for ``rule``'s destinations, and which rules do."""
    blocker = next((other for other in deny if _covers(other, rule)), None)
    ports = tuple(ports)
    if blocker is not None:
        return _Reach((), (blocker,), ports)
    missing: list[int | None] = []
    reached: list[int | None] = []
    by: list[Rule] = []
    for port in ports:
        other = next((r for r in allow if (port is None or r.allows_port(port)) and _covers(r, rule)), None)
        if other is None:
            missing.append(port)
            continue
        reached.append(port)
        if not any(other is seen for seen in by):
            by.append(other)
    return _Reach(tuple(missing), tuple(by), tuple(reached))


@dataclass(frozen=True, slots=True)
class _Reach:
    missing: tuple[int | None, ...]  # ports not reached
    by: tuple[Rule, ...]  # the rules (or the global deny) that account for the others
    reached: tuple[int | None, ...]  # the others


def _compare(
    old: Sequence[Rule], new: Sequence[Rule], before: Sequence[Rule], after: Sequence[Rule],
    old_deny: Sequence[Rule], new_deny: Sequence[Rule], scope: str,
) -> list[Change]:
    """The changes between the rules ``old`` and ``new`` of one list; ``before``/``after`` is all that reached.

    An added rule opens the ports that nothing in ``before`` reached (and that no rule in ``new_deny``
    blocks); a removed rule closes the ports that nothing in ``after`` reaches any more. For the deny list
    (``scope`` "deny") adding takes reach away and removing gives it back.
    """
    gain, loss = (Effect.NARROWS, Effect.WIDENS) if scope == "deny" else (Effect.WIDENS, Effect.NARROWS)
    old_grants, new_grants = _grants(old), _grants(new)
    added = _first_rules(new_grants, old_grants)
    removed = _first_rules(old_grants, new_grants)
    opened = {id(rule): _reach(rule, ports, before, new_deny) for rule, ports in added}
    closed = {id(rule): _reach(rule, ports, after, old_deny) for rule, ports in removed}
    kept = [rules[next(iter(rules))] for pattern, rules in new_grants.items() if pattern in old_grants]
    changes: list[Change] = []
    folded: set[int] = set()  # ids of the rules that a widening or narrowing already tells about
    for rule, _ in added:
        reach = opened[id(rule)]
        if reach.missing:
            replaces = tuple(gone for gone, _ in removed if not closed[id(gone)].missing and _covers(rule, gone))
            over = tuple(other for other in kept if _covers(rule, other))
            folded.update(id(gone) for gone in replaces)
            kind = Kind.WIDENED if replaces or over else Kind.ADDED
            changes.append(_change(gain, kind, scope, rule, reach, others=replaces, kept=over))
    for rule, _ in removed:
        reach = closed[id(rule)]
        if reach.missing:
            into = tuple(new for new, _ in added if not opened[id(new)].missing and _covers(rule, new))
            folded.update(id(new) for new in into)
            changes.append(_change(loss, Kind.NARROWED if into else Kind.REMOVED, scope, rule, reach, others=into))
        elif id(rule) not in folded:
            changes.append(_change(Effect.SAME, Kind.REMOVED, scope, rule, reach))
    for rule, _ in added:
        if not opened[id(rule)].missing and id(rule) not in folded:
            changes.append(_change(Effect.SAME, Kind.ADDED, scope, rule, opened[id(rule)]))
    changes += _ports(old_grants, new_grants, before, after, old_deny, new_deny, scope, gain, loss)
    if scope != "deny":
        changes += _inspection(old, new, scope)
    return changes


def _change(effect: Effect, kind: Kind, scope: str, rule: Rule, reach: _Reach, **more: tuple[Rule, ...]) -> Change:
    """A change to ``rule``: the ports it opens or closes (all of them when none), and what reaches the others."""
    ports = reach.missing or reach.reached
    return Change(effect, kind, scope, rule, ports, covered=reach.by, covered_ports=reach.reached, **more)


def _first_rules(grants: Grants, other: Grants) -> list[tuple[Rule, tuple[int | None, ...]]]:
    """Each rule of a pattern that ``other`` lacks, with the ports it is the first to grant, in file order."""
    found: dict[int, tuple[Rule, list[int | None]]] = {}
    for pattern, ports in grants.items():
        if pattern not in other:
            for port, rule in ports.items():
                found.setdefault(id(rule), (rule, []))[1].append(port)
    return [(rule, tuple(ports)) for rule, ports in found.values()]


def _ports(
    old: Grants, new: Grants, before: Sequence[Rule], after: Sequence[Rule],
    old_deny: Sequence[Rule], new_deny: Sequence[Rule], scope: str, gain: Effect, loss: Effect,
) -> list[Change]:
    """Ports added to or removed from a pattern both sides have, and TLS checks turned off or on."""
    changes: list[Change] = []
    for pattern in (pattern for pattern in new if pattern in old):
        was, now = old[pattern], new[pattern]
        more = tuple(port for port in now if port not in was)
        if more:
            reach = _reach(now[more[0]], more, before, new_deny)
            effect = gain if reach.missing else Effect.SAME
            changes.append(_change(effect, Kind.PORTS_ADDED, scope, now[more[0]], reach))
        fewer = tuple(port for port in was if port not in now)
        if fewer:
            reach = _reach(was[fewer[0]], fewer, after, old_deny)
            effect = loss if reach.missing else Effect.SAME
            changes.append(_change(effect, Kind.PORTS_REMOVED, scope, was[fewer[0]], reach))
        for port in (port for port in now if port in was and port is not None):
            required_before, required_now = was[port].requires_tls(port), now[port].requires_tls(port)
            if required_before != required_now:
                effect = Effect.NARROWS if required_now else Effect.WIDENS
                changes.append(Change(effect, Kind.TLS, scope, now[port], (port,)))
    return changes


# Inspection: (pattern, port) -> the first rule there and the requests of its inspected rules (None: blind).

Request = tuple[str, str, tuple[str, ...]]  # method, pattern as written, compiled
Inspections = dict[tuple[str, int | None], tuple[Rule, frozenset[Request] | None]]


def _inspections(rules: Iterable[Rule]) -> Inspections:
    found: Inspections = {}
    for rule in rules:
        requests = None if rule.inspect is None else frozenset(
            (method, text, compiled) for entry in rule.inspect.entries for method in entry.methods
            for text, compiled in zip(entry.paths, entry.compiled, strict=True))
        for port in sorted(rule.ports) if rule.ports is not None else (None,):
            first, known = found.get((rule.pattern, port), (rule, None))
            merged = known if requests is None else requests | (known or frozenset())
            found[(rule.pattern, port)] = (first, merged)
    return found


def _inspection(old: Sequence[Rule], new: Sequence[Rule], scope: str) -> list[Change]:
    """Inspection turned on or off, and requests added or removed, for each pattern and port both sides have."""
    was, now = _inspections(old), _inspections(new)
    grouped: dict[tuple[Kind, Effect, int, str], tuple[Rule, list[int | None]]] = {}
    for key, (rule, requests) in now.items():
        if key not in was:
            continue
        before = was[key][1]
        found: list[tuple[Kind, Effect, str]] = []
        if before is not None and requests is None:
            found.append((Kind.INSPECT_REMOVED, Effect.WIDENS, "every method and path passes now"))
        elif before is None and requests is not None:
            found.append((Kind.INSPECT_ADDED, Effect.NARROWS, _requests_text(requests)))
        elif before is not None and requests is not None:
            for kind, gained, other, effect in ((Kind.REQUESTS_ADDED, requests - before, before, Effect.WIDENS),
                                               (Kind.REQUESTS_REMOVED, before - requests, requests, Effect.NARROWS)):
                wider = frozenset(r for r in gained if not any(
                    o[0] == r[0] and path_covers(o[2], r[2]) for o in other))
                if wider:
                    found.append((kind, effect, _requests_text(wider)))
                if gained - wider:
                    found.append((kind, Effect.SAME, _requests_text(gained - wider)))
        for kind, effect, subject in found:
            grouped.setdefault((kind, effect, id(rule), subject), (rule, []))[1].append(key[1])
    return [Change(effect, kind, scope, rule, tuple(ports), subject=subject)
            for (kind, effect, _, subject), (rule, ports) in grouped.items()]


def _requests_text(requests: frozenset[Request]) -> str:
    """``GET /a, /b; POST /c``: the requests by method, in a stable order."""
    by_method: dict[str, list[str]] = {}
    for method, text, _ in sorted(requests):
        by_method.setdefault(method, []).append(text)
    return "; ".join(f"{method} {', '.join(paths)}" for method, paths in by_method.items())


def _allow_cidrs(old: Policy, new: Policy) -> list[Change]:
    changes = []
    for network in new.allow_cidrs:
        if network not in old.allow_cidrs:
            covered = any(_within(network, wide) for wide in old.allow_cidrs)
            effect = Effect.SAME if covered else Effect.WIDENS
            changes.append(Change(effect, Kind.ADDED, "allow_cidrs", subject=str(network), source=_global_file(new)))
    for network in old.allow_cidrs:
        if network not in new.allow_cidrs:
            covered = any(_within(network, wide) for wide in new.allow_cidrs)
            effect = Effect.SAME if covered else Effect.NARROWS
            changes.append(Change(effect, Kind.REMOVED, "allow_cidrs", subject=str(network), source=_global_file(old)))
    return changes


def _identities(before: ServicePolicy | None, after: ServicePolicy) -> list[Change]:
    was = {identity.pattern: identity for identity in before.identities} if before is not None else {}
    now = {identity.pattern: identity for identity in after.identities}
    added = [Change(Effect.WIDENS, Kind.IDENTITY_ADDED, subject=pattern, source=identity.source)
             for pattern, identity in now.items() if pattern not in was]
    removed = [Change(Effect.NARROWS, Kind.IDENTITY_REMOVED, subject=pattern, source=identity.source)
               for pattern, identity in was.items() if pattern not in now]
    return added + removed


def _global_file(policy: Policy) -> str:
    return next((path for path in policy.files if path.endswith("/_global.yaml") or path == "_global.yaml"), "")
