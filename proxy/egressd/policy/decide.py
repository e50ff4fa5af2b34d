"""The policy decision: a pure function from (policy, service, destination) to a Decision."""

from __future__ import annotations

from egressd.hostport import Destination
from egressd.policy.match import RuleSet
from egressd.policy.model import AUDITABLE_REASONS, TLS_PORT, Decision, Mode, Policy, Reason, Rule, Verdict

__all__ = ["decide"]


def decide(policy: Policy, service: str | None, dest: Destination, mode: Mode | None = None) -> Decision:
    """Decide whether ``service`` may connect to ``dest``; the first step that applies wins.

    1. No service identity, or a service with no allowlist file -> DENY ``no_identity``.
    2. (A malformed destination never gets here: :mod:`egressd.hostport` rejects
       it at the edge, and the caller records ``bad_request``.)
    3. A global deny rule matches -> DENY ``denylisted``. Audit mode does not soften this.
    4. A rule of the service, then of the global file, matches the destination and
       lists its port -> ALLOW ``allowed`` with that rule; ``tls_required`` is
       ``rule.requires_tls(port)``.
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
    for rules in (service_policy.allow, policy.global_allow):
        for rule in _match(rules, dest):
            if rule.allows_port(dest.port):
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


def _match(rules: RuleSet, dest: Destination) -> tuple[Rule, ...]:
    return rules.match_ip(dest.ip) if dest.ip is not None else rules.match_host(dest.host)
