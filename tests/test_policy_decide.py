"""decide(): named cases of (service, destination, mode) -> (verdict, reason, rule), one per precedence step."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from egressd.hostport import parse_authority
from egressd.policy import Decision, Mode, Policy, Reason, Verdict, decide, load_policy
from harness import write_allowlists

GLOBAL = """\
version: v1
global: true
allow:
  - host: oauth2.googleapis.com       # line 4
  - host: "**.shared.example"         # line 5
    ports: [443, 8443]
deny:
  - host: "**.pastebin.com"           # line 8
  - cidr: 192.0.2.66/32               # line 9
"""

SHOP = """\
version: v1
service: shop
mode: enforce
allow:
  - host: api.stripe.com              # line 5
  - host: "*.stripe.com"              # line 6
    ports: [8443]
    tls: true
  - host: "**.cdn.example.com"        # line 9
    ports: [80, 443]
  - host: www.pastebin.com            # line 11 (denied globally)
  - host: plain.example.com           # line 12
    tls: false
  - cidr: 203.0.113.0/24              # line 14
    ports: [443, 5432]
  - cidr: 2001:db8::/32               # line 16
  - host: oauth2.googleapis.com       # line 17 (also in the global file)
"""

LEGACY = """\
version: v1
service: legacy
mode: audit
allow:
  - host: api.legacy.example          # line 5
"""


class Case(NamedTuple):
    service: str | None
    destination: str
    verdict: Verdict
    reason: Reason
    source: str | None
    would_deny: bool = False
    tls: bool = False
    mode: Mode | None = None


A, D = Verdict.ALLOW, Verdict.DENY
R = Reason

CASES = {
    # 1. identity
    "no identity": Case(None, "api.stripe.com:443", D, R.NO_IDENTITY, None),
    "empty identity": Case("", "api.stripe.com:443", D, R.NO_IDENTITY, None),
    "service without a file": Case("ghost", "api.stripe.com:443", D, R.NO_IDENTITY, None),
    "no file, audit override": Case("ghost", "api.stripe.com:443", D, R.NO_IDENTITY, None, mode=Mode.AUDIT),
    # 3. global deny
    "global deny beats service allow": Case("shop", "www.pastebin.com:443", D, R.DENYLISTED, "_global.yaml:8"),
    "global deny on every port": Case("shop", "a.b.pastebin.com:80", D, R.DENYLISTED, "_global.yaml:8"),
    "global deny cidr": Case("shop", "192.0.2.66:443", D, R.DENYLISTED, "_global.yaml:9"),
    "audit does not soften deny": Case("legacy", "x.pastebin.com:443", D, R.DENYLISTED, "_global.yaml:8"),
    "override does not soften deny": Case(
        "shop", "x.pastebin.com:443", D, R.DENYLISTED, "_global.yaml:8", mode=Mode.AUDIT
    ),
    # 4. service allow, then global allow
    "exact name": Case("shop", "api.stripe.com:443", A, R.ALLOWED, "shop.yaml:5", tls=True),
    "exact name, other case and dot": Case("shop", "API.Stripe.COM.:443", A, R.ALLOWED, "shop.yaml:5", tls=True),
    "second rule lists the port": Case("shop", "api.stripe.com:8443", A, R.ALLOWED, "shop.yaml:6", tls=True),
    "one-label wildcard, tls: true": Case("shop", "files.stripe.com:8443", A, R.ALLOWED, "shop.yaml:6", tls=True),
    "any-labels wildcard, plain http": Case("shop", "a.b.cdn.example.com:80", A, R.ALLOWED, "shop.yaml:9"),
    "tls: false on 443": Case("shop", "plain.example.com:443", A, R.ALLOWED, "shop.yaml:12"),
    "cidr rule, listed port": Case("shop", "203.0.113.9:5432", A, R.ALLOWED, "shop.yaml:14"),
    "cidr rule, ipv6": Case("shop", "[2001:db8::5]:443", A, R.ALLOWED, "shop.yaml:16", tls=True),
    "service rule before global": Case("shop", "oauth2.googleapis.com:443", A, R.ALLOWED, "shop.yaml:17", tls=True),
    "global allow": Case("legacy", "oauth2.googleapis.com:443", A, R.ALLOWED, "_global.yaml:4", tls=True),
    "global allow, other port": Case("shop", "a.shared.example:8443", A, R.ALLOWED, "_global.yaml:5"),
    # 5. port_not_allowed / not_allowlisted
    "exact name, wrong port": Case("shop", "api.stripe.com:80", D, R.PORT_NOT_ALLOWED, "shop.yaml:5"),
    "first rule of several is named": Case("shop", "api.stripe.com:22", D, R.PORT_NOT_ALLOWED, "shop.yaml:5"),
    "wildcard, wrong port": Case("shop", "files.stripe.com:443", D, R.PORT_NOT_ALLOWED, "shop.yaml:6"),
    "service miss named before global": Case("shop", "oauth2.googleapis.com:80", D, R.PORT_NOT_ALLOWED, "shop.yaml:17"),
    "global rule, wrong port": Case("shop", "a.shared.example:22", D, R.PORT_NOT_ALLOWED, "_global.yaml:5"),
    "cidr rule, wrong port": Case("shop", "203.0.113.9:22", D, R.PORT_NOT_ALLOWED, "shop.yaml:14"),
    "one-label wildcard, two labels": Case("shop", "a.b.stripe.com:8443", D, R.NOT_ALLOWLISTED, None),
    "wildcard never matches apex": Case("shop", "cdn.example.com:443", D, R.NOT_ALLOWLISTED, None),
    "suffix trick": Case("shop", "api.stripe.com.evil.net:443", D, R.NOT_ALLOWLISTED, None),
    "ip outside every cidr": Case("shop", "198.51.100.1:443", D, R.NOT_ALLOWLISTED, None),
    "v4 cidr never matches v6": Case("shop", "[::ffff:203.0.113.9]:443", D, R.NOT_ALLOWLISTED, None),
    # 6. audit mode
    "audit, allowed": Case("legacy", "api.legacy.example:443", A, R.ALLOWED, "legacy.yaml:5", tls=True),
    "audit, not allowlisted": Case("legacy", "evil.example:443", A, R.NOT_ALLOWLISTED, None, True, True),
    "audit, wrong port": Case("legacy", "api.legacy.example:80", A, R.PORT_NOT_ALLOWED, "legacy.yaml:5", True),
    "audit, global wrong port": Case("legacy", "a.shared.example:22", A, R.PORT_NOT_ALLOWED, "_global.yaml:5", True),
    "override to audit": Case("shop", "evil.example:443", A, R.NOT_ALLOWLISTED, None, True, True, Mode.AUDIT),
    "override to enforce": Case("legacy", "evil.example:443", D, R.NOT_ALLOWLISTED, None, mode=Mode.ENFORCE),
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    files = {"_global.yaml": GLOBAL, "shop.yaml": SHOP, "legacy.yaml": LEGACY}
    return load_policy(write_allowlists(tmp_path_factory.mktemp("allowlists"), files))


@pytest.mark.parametrize("name", list(CASES))
def test_decide_table(policy: Policy, name: str) -> None:
    """Each case gets the verdict, reason, rule, would_deny and tls_required of the precedence step it exercises."""
    case = CASES[name]
    decision = decide(policy, case.service, parse_authority(case.destination), case.mode)
    source = Path(decision.source).name if decision.source else None
    assert (decision.verdict, decision.reason, source) == (case.verdict, case.reason, case.source)
    assert (decision.would_deny, decision.tls_required) == (case.would_deny, case.tls)


def test_decide_is_pure(policy: Policy) -> None:
    """The same inputs give equal decisions, and deciding changes nothing in the policy."""
    dest = parse_authority("api.stripe.com:443")
    version, rules = policy.version, policy.services["shop"].allow.rules
    assert decide(policy, "shop", dest) == decide(policy, "shop", dest)
    assert (policy.version, policy.services["shop"].allow.rules) == (version, rules)


def test_without_a_global_file(tmp_path: Path) -> None:
    """With no _global.yaml there are no global rules: only the service's allowlist decides."""
    (tmp_path / "legacy.yaml").write_text(LEGACY)
    policy = load_policy(tmp_path)
    assert decide(policy, "legacy", parse_authority("oauth2.googleapis.com:443"), Mode.ENFORCE) == Decision(
        Verdict.DENY, Reason.NOT_ALLOWLISTED
    )
    allowed = decide(policy, "legacy", parse_authority("api.legacy.example:443"))
    assert allowed.allowed and allowed.rule is policy.services["legacy"].allow.rules[0]


@pytest.mark.parametrize(
    ("service", "destination", "reason", "would_deny"),
    [
        ("payments-api", "api.stripe.com:443", Reason.ALLOWED, False),
        ("payments-api", "o123.ingest.us.sentry.io:443", Reason.ALLOWED, False),
        ("payments-api", "api.paypal.com:443", Reason.NOT_ALLOWLISTED, False),
        ("payments-api", "pastebin.com:443", Reason.DENYLISTED, False),
        ("checkout-web", "ocsp.digicert.com:80", Reason.ALLOWED, False),
        ("checkout-web", "ocsp.digicert.com:443", Reason.PORT_NOT_ALLOWED, True),
        ("checkout-web", "oauth2.googleapis.com:443", Reason.ALLOWED, False),
    ],
)
def test_shipped_allowlists(service: str, destination: str, reason: Reason, would_deny: bool) -> None:
    """The example allowlists in the repository decide as their comments and README say."""
    policy = load_policy(Path(__file__).resolve().parent.parent / "allowlists")
    decision = decide(policy, service, parse_authority(destination))
    assert (decision.reason, decision.would_deny) == (reason, would_deny)
