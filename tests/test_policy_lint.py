"""The linter: each fixture under tests/allowlist_warnings yields exactly its warnings, and redundancy is sound."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.policy import Mode, Rule, RuleSet, ServicePolicy, load_policy
from egressd.policy.lint import CODES, LintWarning, lint, private_suffixes

ROOT = Path(__file__).resolve().parent.parent
WARNINGS = "tests/allowlist_warnings"

_ANY = '("**" is one or more labels); write "*.example.com" if one label is enough, or list the exact names'
_SHARED = (
    "a suffix from the private section of the Public Suffix List (shared hosting or tunnelling: anyone can get a "
    "name under it); check that the name belongs to whom you mean to reach"
)
_NARROW = "those destinations stay denied: narrow the rule if it was meant to reach them"
_DEAD = "blocks every destination it matches; remove the rule, or the deny if that is what is wrong"
_USUAL = "not the usual 80 or 443; check that the destination needs"

# case directory -> every warning as (file:line:column, code, message), file relative to the case directory
CASES: dict[str, list[tuple[str, str, str]]] = {
    "clean": [],
    "any_labels_wildcard": [
        ("shop.yaml:4:5", "redundant-rule", 'host "*.cdn.example.com" is redundant: the rule on line 5 '
         '(host "**.example.com") already allows every name and port it does; remove it'),
        ("shop.yaml:5:5", "any-labels-wildcard", f'host "**.example.com" matches names at any depth {_ANY}'),
    ],
    "unusual_port": [
        ("shop.yaml:4:5", "unusual-port", f'host "api.example.com" allows ports 22 and 8443, {_USUAL} them, '
         "or remove them"),
        ("shop.yaml:8:5", "unusual-port", f"cidr 198.51.100.0/24 allows port 5432, {_USUAL} it, or remove it"),
    ],
    "redundant_wildcard": [
        ("shop.yaml:4:5", "redundant-rule", 'host "api.example.com" is redundant: the rule on line 5 '
         '(host "*.example.com") already allows every name and port it does; remove it'),
        ("shop.yaml:7:5", "redundant-rule", 'host "deep.api.example.com" is redundant: the rule on line 8 '
         '(host "**.example.com") already allows every name and port it does; remove it'),
        ("shop.yaml:8:5", "any-labels-wildcard", f'host "**.example.com" matches names at any depth {_ANY}'),
        ("shop.yaml:9:5", "redundant-rule", 'host "www.example.com" is redundant: the rule on line 5 '
         '(host "*.example.com") already allows every name and port it does; remove it'),
    ],
    "redundant_ports": [
        ("shop.yaml:6:5", "redundant-rule", 'host "api.example.com" is redundant: the rule on line 4 '
         '(host "api.example.com") already allows every name and port it does; remove it'),
    ],
    "redundant_identical": [
        ("shop.yaml:5:5", "redundant-rule", 'host "api.example.com" is redundant: the rule on line 4 '
         '(host "api.example.com") already allows every name and port it does; remove it'),
    ],
    "redundant_cidr": [
        ("shop.yaml:6:5", "redundant-rule", "cidr 198.51.100.128/25 is redundant: the rule on line 4 "
         "(cidr 198.51.100.0/24) already allows every address and port it does; remove it"),
        ("shop.yaml:8:5", "redundant-rule", "cidr 2001:db8::7/128 is redundant: the rule on line 7 "
         "(cidr 2001:db8::/48) already allows every address and port it does; remove it"),
    ],
    "redundant_deny": [
        ("_global.yaml:5:5", "redundant-rule", 'host "www.pastebin.com" is redundant: the rule on line 4 '
         '(host "**.pastebin.com") already denies every name it does; remove it'),
        ("_global.yaml:7:5", "redundant-rule", "cidr 192.0.2.7/32 is redundant: the rule on line 6 "
         "(cidr 192.0.2.0/24) already denies every address it does; remove it"),
    ],
    "denied_by_global": [
        ("shop.yaml:4:5", "denied-by-global", 'host "raw.pastebin.com" never allows anything: the global deny '
         f'host "**.pastebin.com" ({WARNINGS}/denied_by_global/_global.yaml:4) {_DEAD}'),
        ("shop.yaml:5:5", "denied-by-global", "cidr 192.0.2.0/28 never allows anything: the global deny "
         f"cidr 192.0.2.0/24 ({WARNINGS}/denied_by_global/_global.yaml:5) {_DEAD}"),
    ],
    "partly_denied_by_global": [
        ("shop.yaml:4:5", "partly-denied-by-global", 'host "*.example.com" also matches host "upload.example.com", '
         f"which the global deny ({WARNINGS}/partly_denied_by_global/_global.yaml:4) blocks; {_NARROW}"),
        ("shop.yaml:4:5", "partly-denied-by-global", 'host "*.example.com" also matches host "files.example.com", '
         f"which the global deny ({WARNINGS}/partly_denied_by_global/_global.yaml:5) blocks; {_NARROW}"),
        ("shop.yaml:5:5", "partly-denied-by-global", "cidr 198.51.100.0/24 also matches cidr 198.51.100.7/32, "
         f"which the global deny ({WARNINGS}/partly_denied_by_global/_global.yaml:6) blocks; {_NARROW}"),
    ],
    "wide_cidr": [
        ("shop.yaml:4:5", "wide-cidr", "cidr 10.20.0.0/16 is wider than /24 (65536 addresses); allow only the "
         "networks the service needs, each /24 or narrower"),
        ("shop.yaml:5:5", "wide-cidr", "cidr 2001:db8::/32 is wider than /48; allow only the networks the service "
         "needs, each /48 or narrower"),
    ],
    "shared_hosting_suffix": [
        ("shop.yaml:4:5", "shared-hosting-suffix", f'host "myapp.herokuapp.com" is under "herokuapp.com", {_SHARED}'),
        ("shop.yaml:5:5", "shared-hosting-suffix", f'host "*.myorg.github.io" is under "github.io", {_SHARED}'),
        ("shop.yaml:6:5", "shared-hosting-suffix", f'host "demo.ngrok.io" is under "ngrok.io", {_SHARED}'),
    ],
    "global_allow": [
        ("_global.yaml:4:5", "any-labels-wildcard", f'host "**.example.com" matches names at any depth {_ANY}'),
        ("_global.yaml:4:5", "partly-denied-by-global", 'host "**.example.com" also matches host '
         f'"login.example.com", which the global deny ({WARNINGS}/global_allow/_global.yaml:9) blocks; {_NARROW}'),
        ("_global.yaml:4:5", "unusual-port", f'host "**.example.com" allows port 8443, {_USUAL} it, or remove it'),
        ("_global.yaml:6:5", "denied-by-global", 'host "login.example.com" never allows anything: the global deny '
         f'host "login.example.com" ({WARNINGS}/global_allow/_global.yaml:9) {_DEAD}'),
        ("_global.yaml:6:5", "redundant-rule", 'host "login.example.com" is redundant: the rule on line 4 '
         '(host "**.example.com") already allows every name and port it does; remove it'),
        ("_global.yaml:6:5", "unusual-port", f'host "login.example.com" allows port 8443, {_USUAL} it, or remove it'),
    ],
}


def _shown(warnings: list[LintWarning], prefix: str) -> list[tuple[str, str, str]]:
    return [(f"{w.file.removeprefix(prefix)}:{w.line}:{w.column}", w.code, w.message) for w in warnings]


def test_every_fixture_directory_has_a_case() -> None:
    """Each directory under tests/allowlist_warnings is asserted by exactly one case below, and each code by one."""
    assert sorted(p.name for p in (ROOT / WARNINGS).iterdir()) == sorted(CASES)
    assert {code for expected in CASES.values() for _, code, _ in expected} == set(CODES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixture_yields_exactly_its_warnings(case: str) -> None:
    """A fixture's allowlists load and lint to exactly these warnings, in file, line, column and code order."""
    prefix = f"{WARNINGS}/{case}/"
    assert _shown(lint(load_policy(prefix)), prefix) == CASES[case]


def test_shipped_allowlists_warn_about_two_rules() -> None:
    """The example allowlists load with two warnings: the "**." sentry rule and Google's shared API domain."""
    assert [str(w) for w in lint(load_policy("allowlists"))] == [
        f'allowlists/_global.yaml:5:5: host "oauth2.googleapis.com" is under "googleapis.com", {_SHARED}',
        'allowlists/payments-api.yaml:12:5: host "**.sentry.io" matches names at any depth ("**" is one or more '
        'labels); write "*.sentry.io" if one label is enough, or list the exact names',
    ]


def test_warning_prints_file_line_column_and_message() -> None:
    """str() of a warning is file:line:column: message, or file:line: message when the column is unknown."""
    assert str(LintWarning("a.yaml", 4, 5, "wide-cidr", "m")) == "a.yaml:4:5: m"
    assert str(LintWarning("a.yaml", 4, None, "wide-cidr", "m")) == "a.yaml:4: m"


@pytest.mark.parametrize(
    ("pattern", "suffixes"),
    [
        pytest.param("myapp.herokuapp.com", ("herokuapp.com",), id="exact-under-private"),
        pytest.param("*.myorg.github.io", ("github.io",), id="wildcard-under-private"),
        pytest.param("**.team.ngrok.io", ("ngrok.io",), id="any-labels-under-private"),
        pytest.param("eu.ngrok.io", (), id="private-suffix-itself"),
        pytest.param("x.eu.ngrok.io", ("eu.ngrok.io",), id="longest-private-suffix"),
        pytest.param("ec2.us-east-1.amazonaws.com", ("us-east-1.amazonaws.com",), id="aws-region"),
        pytest.param("a.b.compute.amazonaws.com", ("b.compute.amazonaws.com",), id="private-wildcard-rule"),
        pytest.param("a.*.compute.amazonaws.com", ("*.compute.amazonaws.com",), id="mid-wildcard-in-suffix"),
        pytest.param("api.stripe.com", (), id="icann-only"),
        pytest.param("*.example.co.jp", (), id="icann-second-level"),
        pytest.param("github.io", (), id="suffix-as-exact-name"),
        pytest.param("**.sentry.io", (), id="any-labels-icann"),
    ],
)
def test_private_suffixes(pattern: str, suffixes: tuple[str, ...]) -> None:
    """A pattern lies under exactly the private-section suffixes its names can have (none for ICANN ones)."""
    assert private_suffixes(pattern) == suffixes


def test_mid_name_wildcard_can_fall_under_many_private_suffixes() -> None:
    """ec2.*.amazonaws.com is under a private suffix for some values of "*" (s3, us-east-1): the warning counts them."""
    suffixes = private_suffixes("ec2.*.amazonaws.com")
    assert {"us-east-1.amazonaws.com", "s3.amazonaws.com"} <= set(suffixes) and "amazonaws.com" not in suffixes
    base = load_policy(f"{WARNINGS}/clean")
    rule = Rule(source="x/shop.yaml:4", host="ec2.*.amazonaws.com", column=5)
    policy = dataclasses.replace(base, services=_one_service([rule]))
    assert [str(w) for w in lint(policy)] == [
        f'x/shop.yaml:4:5: host "ec2.*.amazonaws.com" can fall under {len(suffixes)} suffixes from the private '
        "section of the Public Suffix List (shared hosting or tunnelling: anyone can get a name under it), e.g. "
        '"s3.amazonaws.com"; check that the name belongs to whom you mean to reach for every value of the wildcard'
    ]


def _one_service(rules: list[Rule]) -> MappingProxyType[str, ServicePolicy]:
    service = ServicePolicy(name="shop", mode=Mode.ENFORCE, allow=RuleSet(rules), source="x/shop.yaml")
    return MappingProxyType({"shop": service})


# --- property: a rule reported redundant adds nothing the named rule does not already allow --------------------

# "*" below the first label too (a.*.example.com); "**." is not combined with it
_LABELS = st.lists(st.sampled_from(["a", "b", "*"]), max_size=2)
_PATTERNS = st.tuples(st.sampled_from(["", "*.", "**."]), _LABELS).filter(lambda p: not (p[0] == "**." and "*" in p[1]))
_RULES = st.lists(
    st.tuples(_PATTERNS, st.sets(st.sampled_from([80, 443, 8443]), min_size=1), st.sampled_from([None, True, False])),
    min_size=1, max_size=6,
)
_NAMES = [
    ".".join([*labels, "example", "com"])
    for labels in ([], ["a"], ["b"], ["a", "a"], ["a", "b"], ["b", "a"], ["b", "b"], ["c", "a"], ["a", "b", "a"])
]


@given(specs=_RULES)
def test_redundant_rule_adds_nothing(specs) -> None:
    """A rule reported redundant matches no sample name and port that the rule it names does not, and of two equal
    rules only the later is reported."""
    rules = [
        Rule(source=f"x/shop.yaml:{i + 1}", host=prefix + ".".join([*labels, "example", "com"]),
             ports=frozenset(ports), tls=tls, column=3)
        for i, ((prefix, labels), ports, tls) in enumerate(specs)
    ]
    base = load_policy(f"{WARNINGS}/clean")
    policy = dataclasses.replace(base, services=_one_service(rules), global_deny=RuleSet())
    for warning in lint(policy):
        if warning.code != "redundant-rule":
            continue
        named = int(warning.message.split("the rule on line ")[1].split(" ")[0]) - 1
        narrow, wide = rules[warning.line - 1], rules[named]
        assert narrow.ports <= wide.ports
        assert all(RuleSet([wide]).match_host(n) for n in _NAMES if RuleSet([narrow]).match_host(n)), (narrow, wide)
        if (wide.host, wide.ports) == (narrow.host, narrow.ports):
            assert named < warning.line - 1
