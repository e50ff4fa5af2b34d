"""Policy: which service may reach which destination, and why.

    allowlists/*.yaml --loader--> Policy (frozen; RuleSets per service + global, IdentityIndex)
                                      |
    Identity, client address --service_for, cidr_identity--> service
    (service, Destination) --decide--> Decision(verdict, reason, rule file:line)

* :mod:`~egressd.policy.model`: the frozen values (Rule, ServiceIdentity, Policy, Decision, Reason).
* :mod:`~egressd.policy.loader`: YAML format v1 -> Policy, or PolicyError with every file:line error.
* :mod:`~egressd.policy.match`: the pattern grammar and the no-scan index (RuleSet); ``covers()``.
* :mod:`~egressd.policy.suffixes`: the Public Suffix List and the safety rule wildcards must meet.
* :mod:`~egressd.policy.identities`: who a service is for (``identities:``), checked across files, indexed.
* :mod:`~egressd.policy.decide`: the numbered precedence, a pure function.

The allowlists-as-code tools read the policy through the same loader and decide with the same ``decide()``:

* :mod:`~egressd.policy.lint`: warnings for legal but risky rules (``egressd validate``).
* :mod:`~egressd.policy.diff` over :mod:`~egressd.policy.revision` (directories or git revisions): what a
  change opens up, per service (``egressd diff``).
* :mod:`~egressd.policy.policytest`: the expectations of ``allowlists/tests/`` (``egressd test``).
* :mod:`~egressd.policy.suggest`: additions proposed from audit records (``egressd suggest``).

The format and its semantics are documented for authors in ``allowlists/README.md``.
"""

from egressd.policy.decide import decide
from egressd.policy.identities import IdentityIndex
from egressd.policy.loader import LoadError, PolicyError, load_policy, validate
from egressd.policy.match import RuleSet, parse_pattern
from egressd.policy.model import (
    AUDITABLE_REASONS,
    DEFAULT_PORTS,
    Decision,
    Mode,
    Policy,
    Reason,
    Rule,
    ServiceIdentity,
    ServicePolicy,
    Verdict,
)

__all__ = [
    "AUDITABLE_REASONS",
    "DEFAULT_PORTS",
    "Decision",
    "IdentityIndex",
    "LoadError",
    "Mode",
    "Policy",
    "PolicyError",
    "Reason",
    "Rule",
    "RuleSet",
    "ServiceIdentity",
    "ServicePolicy",
    "Verdict",
    "decide",
    "load_policy",
    "parse_pattern",
    "validate",
]
