"""The policy decisions: pure functions from (policy, service, destination or name) to a Decision.

:func:`decide` is for a connection (a host or IP and a port); :func:`decide_name`
for a DNS query, which names a host and no port.
"""

from __future__ import annotations

import dataclasses

from egressd.hostport import Destination
from egressd.policy.match import RuleSet
from egressd.policy.model import AUDITABLE_REASONS, TLS_PORT, Decision, Mode, Policy, Reason, Rule, Verdict

__all__ = ["decide", "decide_name", "passthrough_suffix"]


def decide(policy: Policy, service: str | None, dest: Destination, mode: Mode | None = None) -> Decision:
    """Decide whether ``service`` may connect to ``dest``; the first step that applies wins.

    1. No service identity, or a service with no allowlist file -> DENY ``no_identity``.
    2. (A malformed destination never gets here: :mod:`egressd.hostport` rejects
       it at the edge, and the caller records ``bad_request``.)
    3. A global deny rule matches -> DENY ``denylisted``. Audit mode does not soften this.
    4. A rule of the service, then of the global file, matches the destination and
       lists its port -> ALLOW ``allowed`` with that rule; ``tls_required`` is
       ``rule.requires_tls(port)``. Inspection: if any of the rules (service or
       global) that match the destination and list its port has ``inspect:``,
       the connection is inspected whichever rule came first: the decision's
       rule is the first such rule (its ``tls_required``), carrying the entries
       of all of them, service file first (a request passes when one entry
       allows it). A wider or global rule without ``inspect:`` never opens an
       inspected name blind.
    5. Otherwise DENY: ``port_not_allowed`` with the first rule that matched the
       destination but not its port, else ``not_allowlisted`` with no rule.
    6. If the effective mode (``mode`` when given, else the service file's) is
       audit and the reason is auditable (step 5) -> ALLOW with the same reason
       and rule, ``would_deny=True``, and ``tls_required`` when the port is 443.

    A name destination is matched against host rules only; an IP destination
    (``dest.ip`` set) against cidr rules only. Nothing here resolves a name.
    """
    service_policy = policy.services.get(service) if service else None
    if service_policy is None:
        return Decision(Verdict.DENY, Reason.NO_IDENTITY)
    denied = _match(policy.global_deny, dest)
    if denied:
        return Decision(Verdict.DENY, Reason.DENYLISTED, denied[0])
    wrong_port: Rule | None = None
    allow, global_allow = service_policy.allow, policy.global_allow
    for rules in (allow, global_allow):
        for rule in _match(rules, dest):
            if rule.allows_port(dest.port):
                if allow.inspected or global_allow.inspected:  # only then can a later rule inspect this one's names
                    rule = _inspecting(allow, global_allow, dest) or rule
                return Decision(Verdict.ALLOW, Reason.ALLOWED, rule, tls_required=rule.requires_tls(dest.port))
            wrong_port = wrong_port or rule
    if wrong_port is not None:
        decision = Decision(Verdict.DENY, Reason.PORT_NOT_ALLOWED, wrong_port)
    else:
        decision = Decision(Verdict.DENY, Reason.NOT_ALLOWLISTED)
    effective = mode if mode is not None else service_policy.mode
    if effective is Mode.AUDIT and decision.reason in AUDITABLE_REASONS:
        return Decision(
            Verdict.ALLOW, decision.reason, decision.rule, would_deny=True, tls_required=dest.port == TLS_PORT
        )
    return decision


def decide_name(
    policy: Policy, service: str | None, name: str, passthrough: tuple[str, ...] = (), mode: Mode | None = None
) -> Decision:
    """Decide whether the DNS filter may ask upstream about ``name`` for ``service``; the first step that applies wins.

    ``name`` is canonical (from :func:`egressd.hostport.normalize_host`);
    ``passthrough`` holds canonical suffixes (``--dns-passthrough``).

    1. A global deny host rule matches -> DENY ``denylisted``. Neither audit mode
       nor a pass-through suffix softens this.
    2. ``name`` is a pass-through suffix or ends with ``.`` + one (whole labels
       only: ``evilcluster.local`` is not under ``cluster.local``) -> ALLOW
       ``passthrough``, no rule: the allowlist is not consulted.
    3. No service identity, or a service with no allowlist file -> DENY ``no_identity``.
    4. A host rule of the service, then of the global file, matches, whatever
       its ports -> ALLOW ``allowed`` with that rule.
    5. Otherwise DENY ``not_allowlisted``; when the effective mode (``mode`` when
       given, else the service file's) is audit -> ALLOW ``not_allowlisted``
       with ``would_deny=True``.

    An IP literal (a query for ``1.2.3.4``) matches no host rule: step 5.
    """
    denied = policy.global_deny.match_host(name)
    if denied:
        return Decision(Verdict.DENY, Reason.DENYLISTED, denied[0])
    if passthrough and passthrough_suffix(name, passthrough) is not None:
        return Decision(Verdict.ALLOW, Reason.PASSTHROUGH)
    service_policy = policy.services.get(service) if service else None
    if service_policy is None:
        return Decision(Verdict.DENY, Reason.NO_IDENTITY)
    for rules in (service_policy.allow, policy.global_allow):
        matched = rules.match_host(name)
        if matched:
            return Decision(Verdict.ALLOW, Reason.ALLOWED, matched[0])
    effective = mode if mode is not None else service_policy.mode
    if effective is Mode.AUDIT:
        return Decision(Verdict.ALLOW, Reason.NOT_ALLOWLISTED, would_deny=True)
    return Decision(Verdict.DENY, Reason.NOT_ALLOWLISTED)


def passthrough_suffix(name: str, suffixes: tuple[str, ...]) -> str | None:
    """The first suffix that ``name`` equals or lies under on a label boundary, else None (all canonical)."""
    for suffix in suffixes:
        if name == suffix or (name.endswith(suffix) and name[-len(suffix) - 1] == "."):
            return suffix
    return None


def _inspecting(service: RuleSet, global_: RuleSet, dest: Destination) -> Rule | None:
    """The first rule, service file first, that matches ``dest``, lists its port and has ``inspect:``, carrying
    the entries of every such rule; None when there is none."""
    found = [rule for rules in (service, global_) if rules.inspected
             for rule in _match(rules, dest) if rule.inspect is not None and rule.allows_port(dest.port)]
    if len(found) < 2:
        return found[0] if found else None
    first = found[0]
    assert first.inspect is not None
    return dataclasses.replace(first, inspect=first.inspect.joined(rule.inspect for rule in found[1:]
                                                                   if rule.inspect is not None))


def _match(rules: RuleSet, dest: Destination) -> tuple[Rule, ...]:
    return rules.match_ip(dest.ip) if dest.ip is not None else rules.match_host(dest.host)
