"""Host patterns: each pattern with the names it must match and the names it must not (Cilium-style)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.hostport import normalize_host
from egressd.policy.match import RuleSet, covers, parse_pattern
from egressd.policy.model import Rule

PATTERNS = {
    "api.example.com": (
        ["api.example.com", "API.Example.COM.", "api.example.com."],
        ["example.com", "x.api.example.com", "api.example.com.evil.net", "apiexample.com", "api.example.co"],
    ),
    "*.example.com": (
        ["a.example.com", "WWW.EXAMPLE.COM", "xn--bcher-kva.example.com", "bücher.example.com"],
        ["example.com", "a.b.example.com", "example.com.evil.net", "aexample.com", "a.example.com.evil.net"],
    ),
    "**.example.com": (
        ["a.example.com", "a.b.c.example.com", "_acme.x.example.com"],
        ["example.com", "badexample.com", "a.badexample.com", "example.com.evil.net", "example.co"],
    ),
    "bücher.example": (
        ["bücher.example", "BÜCHER.example.", "xn--bcher-kva.example"],
        ["bucher.example", "a.xn--bcher-kva.example"],
    ),
    "*.xn--bcher-kva.example": (
        ["shop.bücher.example", "a.xn--bcher-kva.example"],
        ["bücher.example", "a.b.bücher.example", "a.bucher.example"],
    ),
}

CASES = [(pattern, host, True) for pattern, (accept, _) in PATTERNS.items() for host in accept] + [
    (pattern, host, False) for pattern, (_, reject) in PATTERNS.items() for host in reject
]


def _rule(pattern: str, line: int = 1) -> Rule:
    return Rule(source=f"test.yaml:{line}", host=parse_pattern(pattern))


def _cidr(text: str, line: int = 1) -> Rule:
    return Rule(source=f"test.yaml:{line}", cidr=ipaddress.ip_network(text))


@pytest.mark.parametrize(("pattern", "host", "matches"), CASES)
def test_pattern_table(pattern: str, host: str, matches: bool) -> None:
    """A pattern matches exactly its accept list and none of its reject list, on label boundaries."""
    rules = RuleSet([_rule(pattern)])
    assert bool(rules.match_host(normalize_host(host))) is matches


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("API.Example.COM.", "api.example.com"),
        ("*.Bücher.Example.", "*.xn--bcher-kva.example"),
        ("**.EXAMPLE.co.jp", "**.example.co.jp"),
        ("*.example.co.jp", "*.example.co.jp"),
        ("github.io", "github.io"),
        ("my-site.github.io", "my-site.github.io"),
        ("*.my-site.github.io", "*.my-site.github.io"),
        ("**.cluster.local", "**.cluster.local"),
    ],
)
def test_parse_pattern_canonical(text: str, canonical: str) -> None:
    """Patterns are normalised like host names after the wildcard prefix."""
    assert parse_pattern(text) == canonical


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("*", "would match every host"),
        ("**", "would match every host"),
        ("api*.example.com", '"*" is allowed only as the whole first label'),
        ("a.*.example.com", '"*" is allowed only as the whole first label'),
        ("*.*.example.com", '"*" is allowed only as the whole first label'),
        ("***.example.com", '"*" is allowed only as the whole first label'),
        ("*.com", 'wildcard directly over public suffix "com"'),
        ("**.co.jp", 'wildcard directly over public suffix "co.jp"'),
        ("*.github.io", 'wildcard directly over public suffix "github.io"'),
        ("**.s3.eu-west-1.amazonaws.com", 'public suffix "s3.eu-west-1.amazonaws.com"'),
        ("*.internal", 'public suffix "internal"'),
        ("10.0.0.1", "write cidr: 10.0.0.1/32"),
        ("[2001:db8::1]", "write cidr: 2001:db8::1/128"),
        ("*.10.0.0.1", "write cidr: 10.0.0.1/32"),
        ("a..example.com", "invalid host:"),
        ("127.1", "invalid host:"),
    ],
)
def test_parse_pattern_rejects(text: str, fragment: str) -> None:
    """Bare or inner wildcards, wildcards over public suffixes and IP literals are refused with a fix."""
    with pytest.raises(ValueError) as info:
        parse_pattern(text)
    assert fragment in str(info.value)


def test_ip_literal_never_matches_host_rules() -> None:
    """An IP destination is looked up with match_ip, which ignores host rules, and vice versa."""
    rules = RuleSet([_rule("api.example.com"), _cidr("203.0.113.0/24", 2)])
    assert rules.match_ip(ipaddress.ip_address("203.0.113.7")) == (rules.rules[1],)
    assert rules.match_ip(ipaddress.ip_address("198.51.100.1")) == ()
    assert rules.match_host("api.example.com") == (rules.rules[0],)


@pytest.mark.parametrize(
    ("network", "address", "matches"),
    [
        ("203.0.113.0/24", "203.0.113.0", True),
        ("203.0.113.0/24", "203.0.113.255", True),
        ("203.0.113.0/24", "203.0.114.0", False),
        ("192.0.2.1/32", "192.0.2.1", True),
        ("192.0.2.1/32", "192.0.2.2", False),
        ("2001:db8::/32", "2001:db8:1::5", True),
        ("2001:db8::/32", "2001:db9::1", False),
        ("203.0.113.0/24", "::ffff:203.0.113.7", False),
        ("2001:db8::/32", "203.0.113.7", False),
    ],
)
def test_cidr_table(network: str, address: str, matches: bool) -> None:
    """A cidr rule matches the addresses of its own family inside its network, and nothing else."""
    rules = RuleSet([_cidr(network)])
    assert bool(rules.match_ip(ipaddress.ip_address(address))) is matches


def test_matches_in_file_order() -> None:
    """Several matching rules come back in the order they were given, whatever index they sit in."""
    patterns = ["**.example.com", "a.b.example.com", "*.b.example.com", "**.b.example.com"]
    rules = RuleSet([_rule(pattern, line) for line, pattern in enumerate(patterns, start=1)])
    assert [rule.source for rule in rules.match_host("a.b.example.com")] == [
        "test.yaml:1",
        "test.yaml:2",
        "test.yaml:3",
        "test.yaml:4",
    ]


def test_ruleset_is_immutable_and_sized() -> None:
    """A RuleSet has a length, iterates its rules, compares by them, and refuses attribute assignment."""
    rules = RuleSet([_rule("a.example.com"), _cidr("10.0.0.0/8")])
    assert len(rules) == 2 and list(rules) == list(rules.rules)
    assert rules == RuleSet(rules.rules) and len(RuleSet()) == 0
    with pytest.raises(AttributeError):
        rules.rules = ()  # type: ignore[misc]


# --- property: the index agrees with a naive label-list comparison ----------------

_LABELS = st.sampled_from(["a", "b", "c"])
_FORMS = st.tuples(st.sampled_from(["", "*.", "**."]), st.lists(st.sampled_from(["a", "b"]), max_size=2))


@given(wide=_FORMS, narrow=_FORMS, names=st.lists(st.lists(_LABELS, min_size=1, max_size=5), max_size=30))
def test_covers_agrees_with_the_index_on_sample_names(wide, narrow, names) -> None:
    """When covers(wide, narrow) holds, every sample name the index matches for narrow it matches for wide too."""
    patterns = [prefix + ".".join([*labels, "example", "com"]) for prefix, labels in (wide, narrow)]
    wide_set, narrow_set = (RuleSet([Rule(source="t.yaml:1", host=p)]) for p in patterns)
    hosts = [".".join([*labels, "example", "com"]) for labels in names]
    if covers(*patterns):
        assert all(wide_set.match_host(h) for h in hosts if narrow_set.match_host(h)), patterns
