"""decide_name(): named cases of (service, name, mode) -> (verdict, reason, rule) for the DNS filter."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from egressd.hostport import normalize_host
from egressd.policy import Mode, Policy, Reason, Verdict, load_policy
from egressd.policy.decide import decide_name, passthrough_suffix
from harness import write_allowlists

GLOBAL = """\
version: v1
global: true
allow:
  - host: oauth2.googleapis.com       # line 4
deny:
  - host: "**.pastebin.com"           # line 6
  - host: secret.svc.cluster.local    # line 7
"""

SHOP = """\
version: v1
service: shop
mode: enforce
allow:
  - host: api.stripe.com              # line 5
  - host: "*.stripe.com"              # line 6
    ports: [8443]
  - host: "**.cdn.example.com"        # line 8
    ports: [80]
  - host: www.pastebin.com            # line 10 (denied globally)
  - cidr: 203.0.113.0/24              # line 11
"""

LEGACY = """\
version: v1
service: legacy
mode: audit
allow:
  - host: api.legacy.example          # line 5
"""

PASSTHROUGH = ("cluster.local", "corp.internal")


class Case(NamedTuple):
    service: str | None
    name: str
    verdict: Verdict
    reason: Reason
    source: str | None
    would_deny: bool = False
    mode: Mode | None = None


A, D = Verdict.ALLOW, Verdict.DENY
R = Reason

CASES = {
    # 1. global deny, before everything
    "global deny beats service allow": Case("shop", "www.pastebin.com", D, R.DENYLISTED, "_global.yaml:6"),
    "global deny beats pass-through": Case("shop", "secret.svc.cluster.local", D, R.DENYLISTED, "_global.yaml:7"),
    "global deny in audit mode": Case("legacy", "x.pastebin.com", D, R.DENYLISTED, "_global.yaml:6"),
    "global deny without identity": Case(None, "x.pastebin.com", D, R.DENYLISTED, "_global.yaml:6"),
    # 2. pass-through suffixes, on label boundaries
    "under a pass-through suffix": Case("shop", "db.ns.svc.cluster.local", A, R.PASSTHROUGH, None),
    "the suffix itself": Case("shop", "cluster.local", A, R.PASSTHROUGH, None),
    "second suffix": Case("shop", "git.corp.internal", A, R.PASSTHROUGH, None),
    "pass-through without a service file": Case("ghost", "db.cluster.local", A, R.PASSTHROUGH, None),
    "suffix without the label boundary": Case("shop", "evilcluster.local", D, R.NOT_ALLOWLISTED, None),
    "suffix in the middle": Case("shop", "cluster.local.evil.net", D, R.NOT_ALLOWLISTED, None),
    # 3. identity
    "no identity": Case(None, "api.stripe.com", D, R.NO_IDENTITY, None),
    "service without a file": Case("ghost", "api.stripe.com", D, R.NO_IDENTITY, None),
    # 4. any host rule, whatever its ports
    "exact name": Case("shop", "api.stripe.com", A, R.ALLOWED, "shop.yaml:5"),
    "one-label wildcard on another port": Case("shop", "files.stripe.com", A, R.ALLOWED, "shop.yaml:6"),
    "any-labels wildcard on port 80": Case("shop", "a.b.cdn.example.com", A, R.ALLOWED, "shop.yaml:8"),
    "global allow": Case("shop", "oauth2.googleapis.com", A, R.ALLOWED, "_global.yaml:4"),
    # 5. not allowlisted, and audit mode
    "wildcard never matches the apex": Case("shop", "cdn.example.com", D, R.NOT_ALLOWLISTED, None),
    "one-label wildcard, two labels": Case("shop", "a.b.stripe.com", D, R.NOT_ALLOWLISTED, None),
    "suffix trick": Case("shop", "api.stripe.com.evil.net", D, R.NOT_ALLOWLISTED, None),
    "ip literal matches no host rule": Case("shop", "203.0.113.9", D, R.NOT_ALLOWLISTED, None),
    "audit mode forwards": Case("legacy", "evil.example", A, R.NOT_ALLOWLISTED, None, True),
    "audit override": Case("shop", "evil.example", A, R.NOT_ALLOWLISTED, None, True, Mode.AUDIT),
    "enforce override": Case("legacy", "evil.example", D, R.NOT_ALLOWLISTED, None, mode=Mode.ENFORCE),
    "audit, allowed": Case("legacy", "api.legacy.example", A, R.ALLOWED, "legacy.yaml:5"),
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    files = {"_global.yaml": GLOBAL, "shop.yaml": SHOP, "legacy.yaml": LEGACY}
    return load_policy(write_allowlists(tmp_path_factory.mktemp("allowlists"), files))


@pytest.mark.parametrize("name", list(CASES))
def test_decide_name_table(policy: Policy, name: str) -> None:
    """Each case gets the verdict, reason, rule and would_deny of the precedence step it exercises."""
    case = CASES[name]
    decision = decide_name(policy, case.service, normalize_host(case.name), PASSTHROUGH, case.mode)
    source = Path(decision.source).name if decision.source else None
    assert (decision.verdict, decision.reason, source, decision.would_deny) == (
        case.verdict, case.reason, case.source, case.would_deny
    )


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("cluster.local", "cluster.local"),
        ("a.cluster.local", "cluster.local"),
        ("a.b.corp.internal", "corp.internal"),
        ("acluster.local", None),
        ("cluster.local.evil", None),
        ("local", None),
        ("", None),
    ],
)
def test_passthrough_suffix(name: str, suffix: str | None) -> None:
    """A name is under a suffix when it equals it or ends with '.' and the suffix; never mid-label."""
    assert passthrough_suffix(name, PASSTHROUGH) == suffix


def test_no_passthrough_means_the_allowlist_decides(policy: Policy) -> None:
    """With no pass-through suffixes, a cluster name is decided like any other."""
    assert decide_name(policy, "shop", "db.cluster.local").reason is Reason.NOT_ALLOWLISTED
