"""Host patterns: each pattern with the names it must match and the names it must not (Cilium-style)."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import re
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from publicsuffixlist import PublicSuffixList

from egressd.hostport import normalize_host
from egressd.policy import match, suffixes
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
    "ec2.*.amazonaws.com": (
        ["ec2.us-east-1.amazonaws.com", "EC2.EU-West-1.amazonaws.com.", "ec2.compute.amazonaws.com"],
        [
            "ec2.amazonaws.com", "ec2.a.b.amazonaws.com", "x.ec2.us-east-1.amazonaws.com",
            "ec2-us-east-1.amazonaws.com", "ec2.us-east-1.amazonaws.com.evil.net", "ec2.us-east-1.amazonaws.co",
            "ec2.us-east-1.xamazonaws.com",
        ],
    ),
    "api.*.example.com": (
        ["api.eu.example.com", "api.bücher.example.com", "api._x.example.com"],
        ["api.example.com", "api.a.b.example.com", "x.api.eu.example.com", "eu.api.example.com", "apix.eu.example.com"],
    ),
    "*.*.example.com": (
        ["a.b.example.com", "www.eu.example.com"],
        ["a.example.com", "a.b.c.example.com", "example.com", "a.b.example.com.evil.net"],
    ),
    "**.*.example.com": (
        ["a.b.example.com", "a.b.c.d.example.com"],
        ["a.example.com", "example.com", "a.b.badexample.com"],
    ),
    "**.api.*.example.com": (
        ["x.api.eu.example.com", "x.y.api.eu.example.com"],
        ["api.eu.example.com", "x.api.example.com", "x.web.eu.example.com", "x.api.eu.b.example.com"],
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
        ("EC2.*.AmazonAWS.com.", "ec2.*.amazonaws.com"),
        ("api.*.Bücher.Example", "api.*.xn--bcher-kva.example"),
        ("a.*.example\u3002com", "a.*.example.com"),
        ("*\uff0eexample.com", "*.example.com"),
        ("*.*.example.co.uk", "*.*.example.co.uk"),
        ("**.api.*.example.com", "**.api.*.example.com"),
        ("my-bucket.s3.*.amazonaws.com", "my-bucket.s3.*.amazonaws.com"),
        ("sqs.*.amazonaws.com", "sqs.*.amazonaws.com"),
        ("i-1.*.compute.amazonaws.com", "i-1.*.compute.amazonaws.com"),
    ],
)
def test_parse_pattern_canonical(text: str, canonical: str) -> None:
    """Fixed labels are normalised like host names (IDNA dots too) and wildcard labels are kept, in any place."""
    assert parse_pattern(text) == canonical


_PSL = "would match every site registered under it; name a registrable domain, e.g."
_WHOLE = '"*" stands for a whole label, never part of one'
_TLD = "the last label (the top-level domain) is never a wildcard; name it, e.g."
_MINE = "anyone can register names under"
_PUBLIC = "itself a public suffix (anyone can register names under it)"

REJECTS = {
    "bare *": ("*", 'host "*" would match every host; name a domain, e.g. "*.example.com"'),
    "bare **": ("**", 'host "**" would match every host; name a domain, e.g. "*.example.com"'),
    "part of a label": (
        "api-*.example.com",
        f'host "api-*.example.com": {_WHOLE} ("api-*"); write "*" for any one label there, e.g. "*.example.com", '
        "or list the names",
    ),
    "part of the first label": (
        "*foo.example.com",
        f'host "*foo.example.com": {_WHOLE} ("*foo"); write "*" for any one label there, e.g. "*.example.com", '
        "or list the names",
    ),
    "three stars": (
        "a.***.example.com",
        f'host "a.***.example.com": {_WHOLE} ("***"); write "*" for any one label there, e.g. "a.*.example.com", '
        "or list the names",
    ),
    "** below the first label": (
        "a.**.example.com",
        'host "a.**.example.com": "**" is allowed only as the whole first label ("**.example.com"); '
        'write "*" for exactly one label here, e.g. "a.*.example.com"',
    ),
    "wildcard top-level domain": ("*.co.*", f'host "*.co.*": {_TLD} "*.co.com"'),
    "wildcard last label": ("example.*", f'host "example.*": {_TLD} "example.com"'),
    "over com": ("*.com", f'host "*.com": wildcard directly over public suffix "com" {_PSL} "*.example.com"'),
    "over co.jp": (
        "**.co.jp",
        f'host "**.co.jp": wildcard directly over public suffix "co.jp" {_PSL} "**.example.co.jp"',
    ),
    "over github.io": (
        "*.github.io",
        f'host "*.github.io": wildcard directly over public suffix "github.io" {_PSL} "*.example.github.io"',
    ),
    "** over github.io": (
        "**.github.io",
        f'host "**.github.io": wildcard directly over public suffix "github.io" {_PSL} "**.example.github.io"',
    ),
    "over herokuapp.com": (
        "*.herokuapp.com",
        f'host "*.herokuapp.com": wildcard directly over public suffix "herokuapp.com" {_PSL} '
        '"*.example.herokuapp.com"',
    ),
    "over an S3 region": (
        "**.s3.eu-west-1.amazonaws.com",
        'host "**.s3.eu-west-1.amazonaws.com": wildcard directly over public suffix "s3.eu-west-1.amazonaws.com" '
        f'{_PSL} "**.example.s3.eu-west-1.amazonaws.com"',
    ),
    "over an unknown top-level label": (
        "*.internal",
        f'host "*.internal": wildcard directly over public suffix "internal" {_PSL} "*.example.internal"',
    ),
    "over a wildcard rule's root": (
        "*.nom.br",
        f'host "*.nom.br": wildcard directly over public suffix "nom.br" {_PSL} "*.example.nom.br"',
    ),
    "registrable under com": (
        "api.*.com",
        f'host "api.*.com": the "*" in label 2 can be the registrable label of "api.x.com" ({_MINE} "com"); '
        'write that label out, e.g. "api.example.com"',
    ),
    "two labels under com": (
        "*.*.com",
        f'host "*.*.com": the "*" in label 2 can be the registrable label of "x.x.com" ({_MINE} "com"); '
        'write that label out, e.g. "*.example.com"',
    ),
    "any bucket in any region": (
        "*.s3.*.amazonaws.com",
        'host "*.s3.*.amazonaws.com": the "*" in label 1 can be the registrable label of '
        f'"x.s3.af-south-1.amazonaws.com" ({_MINE} "s3.af-south-1.amazonaws.com"); '
        'write that label out, e.g. "*.example.s3.*.amazonaws.com"',
    ),
    "a bucket as a region's child": (
        "app.*.*.amazonaws.com",
        'host "app.*.*.amazonaws.com": the "*" in label 2 can be the registrable label of "app.x.s3.amazonaws.com" '
        f'({_MINE} "s3.amazonaws.com"); write that label out, e.g. "app.example.*.amazonaws.com"',
    ),
    "any API gateway": (
        "*.execute-api.*.amazonaws.com",
        'host "*.execute-api.*.amazonaws.com": the "*" in label 1 can be the registrable label of '
        f'"x.execute-api.af-south-1.amazonaws.com" ({_MINE} "execute-api.af-south-1.amazonaws.com"); '
        'write that label out, e.g. "*.example.execute-api.*.amazonaws.com"',
    ),
    "exception of a wildcard rule": (
        "api.*.kawasaki.jp",
        'host "api.*.kawasaki.jp": the "*" in label 2 can be the registrable label of "api.city.kawasaki.jp" '
        f'({_MINE} "kawasaki.jp"); write that label out, e.g. "api.example.kawasaki.jp"',
    ),
    "exception under ck": (
        "api.*.ck",
        f'host "api.*.ck": the "*" in label 2 can be the registrable label of "api.www.ck" ({_MINE} "ck"); '
        'write that label out, e.g. "api.example.ck"',
    ),
    "a wildcard rule that lengthens the suffix": (
        "a.*.*.ck",
        f'host "a.*.*.ck": the "*" in label 2 can be the registrable label of "a.x.x.ck" ({_MINE} "x.ck"); '
        'write that label out, e.g. "a.example.*.ck"',
    ),
    "registrable under a private suffix": (
        "app.*.github.io",
        'host "app.*.github.io": the "*" in label 2 can be the registrable label of "app.x.github.io" '
        f'({_MINE} "github.io"); write that label out, e.g. "app.example.github.io"',
    ),
    "** over a parent of suffixes": (
        "**.amazonaws.com",
        f'host "**.amazonaws.com": the "**" in label 1 can be the first label of "compute.amazonaws.com", {_PUBLIC}; '
        'write that label out, e.g. "**.example.amazonaws.com"',
    ),
    "* standing for a whole suffix": (
        "*.amazonaws.com",
        f'host "*.amazonaws.com": the "*" in label 1 can be the first label of "compute.amazonaws.com", {_PUBLIC}; '
        'write that label out, e.g. "*.example.amazonaws.com"',
    ),
    "* standing for a wildcard rule's suffixes": (
        "*.rds.amazonaws.com",
        'host "*.rds.amazonaws.com": the "*" in label 1 can be the first label of "af-south-1.rds.amazonaws.com", '
        f'{_PUBLIC}; write that label out, e.g. "*.example.rds.amazonaws.com"',
    ),
    "IPv4 literal": ("10.0.0.1", 'host "10.0.0.1" is an IP address, and IP destinations never match host rules; '
                     "write cidr: 10.0.0.1/32"),
    "IPv6 literal": ("[2001:db8::1]", 'host "[2001:db8::1]" is an IP address, and IP destinations never match host '
                     "rules; write cidr: 2001:db8::1/128"),
    "wildcard over an IP": ("*.10.0.0.1", 'host "*.10.0.0.1" is an IP address, and IP destinations never match host '
                            "rules; write cidr: 10.0.0.1/32"),
    "empty label": ("a..example.com", "invalid host: 'a..example.com': label '' is not a DNS label "
                    "(letters, digits, '-', '_'; 1-63 characters)"),
    "empty label beside a wildcard": ("a.*..example.com", "invalid host: 'a.*..example.com': label '' is not a DNS "
                                      "label (letters, digits, '-', '_'; 1-63 characters)"),
    "short IPv4": ("127.1", "invalid host: '127.1' looks like an IP address in a non-canonical form; write IPv4 as "
                   "four decimal parts (1.2.3.4)"),
    "numeric last label after a wildcard": (
        "a.*.0x7f",
        "invalid host: 'a.*.0x7f' looks like an IP address in a non-canonical form; write IPv4 as four decimal parts "
        "(1.2.3.4)",
    ),
    "too long for any name": (
        "api.*." + ".".join(["b" * 61] * 4) + ".com",
        "invalid host: host name of 257 characters is longer than 253",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTS))
def test_parse_pattern_rejects(case: str) -> None:
    """Bare, partial or misplaced wildcards, wildcards that reach a registrable label, and IP literals are refused
    with this exact message, naming the fix."""
    text, message = REJECTS[case]
    with pytest.raises(ValueError) as info:
        parse_pattern(text)
    assert str(info.value) == message


# Mid-name wildcards that load: whatever fills a "*", the registrable label is fixed text.
ACCEPTED = [
    "ec2.*.amazonaws.com",
    "sqs.*.amazonaws.com",
    "my-bucket.s3.*.amazonaws.com",
    "i-1.*.compute.amazonaws.com",
    "api.*.example.com",
    "api.*.example.co.jp",
    "*.*.example.com",
    "**.*.example.com",
    "**.api.*.example.com",
    "*.api.*.example.co.uk",
    "**.cluster.local",
    "a.*.cluster.local",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_mid_name_wildcards_load(text: str) -> None:
    """A pattern whose every match has a fixed registrable label loads, in its canonical form."""
    assert parse_pattern(text) == text


@pytest.mark.parametrize(
    "text", ["*.s3.*.amazonaws.com", "**.amazonaws.com", "api.*.com", "*.*.com", "**.ngrok.io", "*.com", "a.*.ck"]
)
def test_deny_patterns_may_be_broad(text: str) -> None:
    """The safety rule is for allow rules: a deny pattern may reach registrable labels, grammar still applies."""
    assert parse_pattern(text, deny=True) == text
    with pytest.raises(ValueError, match="never part of one"):
        parse_pattern("api-*.example.com", deny=True)


def _readme_table() -> list[tuple[str, list[str], list[str]]]:
    readme = (Path(__file__).resolve().parent.parent / "allowlists" / "README.md").read_text()
    section = readme.split("\n## Host patterns\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    quoted = re.compile(r"`([^`]+)`").findall
    return [(quoted(pattern)[0], quoted(matches), quoted(misses)) for pattern, matches, misses in rows]


@pytest.mark.parametrize(("pattern", "matches", "misses"), _readme_table())
def test_readme_grammar_table_is_true(pattern: str, matches: list[str], misses: list[str]) -> None:
    """Each row of the host pattern table in allowlists/README.md loads and matches exactly as it says."""
    rules = RuleSet([_rule(pattern)])
    assert matches and misses
    assert [host for host in matches if not rules.match_host(normalize_host(host))] == []
    assert [host for host in misses if rules.match_host(normalize_host(host))] == []


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


def test_mid_name_matches_in_file_order() -> None:
    """Rules with a mid-name "*" come back in file order together with exact and first-label wildcard rules."""
    patterns = ["a.*.example.com", "**.example.com", "*.*.example.com", "a.b.example.com", "**.*.example.com"]
    rules = RuleSet([_rule(pattern, line) for line, pattern in enumerate(patterns, start=1)])
    assert [rule.source for rule in rules.match_host("a.b.example.com")] == [f"test.yaml:{n}" for n in range(1, 6)]
    assert [rule.source for rule in rules.match_host("c.b.example.com")] == [f"test.yaml:{n}" for n in (2, 3, 5)]


def test_mid_name_lookup_compares_only_the_rules_under_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup compares the rest of the host only with mid-name rules filed under one of its ancestors."""
    rules = [Rule(source=f"t.yaml:{n}", host=f"api.*.svc{n}.example.com") for n in range(5000)]
    rules.append(Rule(source="t.yaml:x", host="*.*.svc7.example.com"))
    index = RuleSet(rules)
    compared: list[tuple[str, ...]] = []
    real = match._labels_match
    monkeypatch.setattr(match, "_labels_match", lambda want, labels: compared.append(want) or real(want, labels))
    assert [rule.source for rule in index.match_host("api.eu.svc7.example.com")] == ["t.yaml:7", "t.yaml:x"]
    assert compared == [("api", "*"), ("*", "*")]


def test_rulesets_without_mid_name_rules_never_look_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact, "*." and "**." lookups do not pay for mid-name rules when a RuleSet has none."""

    def fail(self: RuleSet, host: str) -> tuple[Rule, ...]:
        raise AssertionError("mid-name lookup on a RuleSet without mid-name rules")

    monkeypatch.setattr(RuleSet, "_match_mid", fail)
    rules = RuleSet([_rule("api.example.com", 1), _rule("*.example.com", 2), _rule("**.example.org", 3)])
    assert [rule.source for rule in rules.match_host("api.example.com")] == ["test.yaml:1", "test.yaml:2"]
    assert [rule.source for rule in rules.match_host("a.b.example.org")] == ["test.yaml:3"]


# --- properties: the index against a slow matcher, the safety rule against brute force, covers() exactly ------


def _slow_match(pattern: tuple[str, ...], host: tuple[str, ...]) -> bool:
    """Label by label from the left: a fixed label is itself, "*" any one label, "**" one or more."""
    if not pattern:
        return not host
    if pattern[0] == "**":
        return any(_slow_match(pattern[1:], host[n:]) for n in range(1, len(host) + 1))
    return bool(host) and pattern[0] in ("*", host[0]) and _slow_match(pattern[1:], host[1:])


_LABELS = st.sampled_from(["a", "b", "c"])
_PATTERN = st.builds(
    lambda first, labels: ".".join([*first, *labels, "com"]),
    st.sampled_from([(), ("*",), ("**",)]),
    st.lists(st.sampled_from(["a", "b", "*"]), max_size=3),
)


@given(patterns=st.lists(_PATTERN, min_size=1, max_size=8), names=st.lists(st.lists(_LABELS, max_size=5), max_size=20))
def test_index_agrees_with_a_slow_matcher(patterns: list[str], names: list[list[str]]) -> None:
    """RuleSet.match_host returns exactly the rules a label-by-label matcher accepts, in file order."""
    rules = [Rule(source=f"t.yaml:{line}", host=pattern) for line, pattern in enumerate(patterns, start=1)]
    index = RuleSet(rules)
    for labels in names:
        host = (*labels, "com")
        expected = tuple(rule for rule in rules if _slow_match(tuple(rule.pattern.split(".")), host))
        assert index.match_host(".".join(host)) == expected, (patterns, host)


@given(wide=_PATTERN, narrow=_PATTERN)
def test_covers_is_exact(wide: str, narrow: str) -> None:
    """covers(wide, narrow) holds exactly when wide matches every name narrow does: its wildcards filled with a label
    wide never names ("z"), "**" with one label up to one more than wide has."""
    filled = tuple("z" if label == "*" else label for label in narrow.split("."))
    if filled[0] == "**":
        names = [("z",) * n + filled[1:] for n in range(1, len(wide.split(".")) + 2)]
    else:
        names = [filled]
    assert covers(wide, narrow) is all(_slow_match(tuple(wide.split(".")), name) for name in names)


@pytest.mark.parametrize(
    ("wide", "narrow", "expected"),
    [
        ("ec2.*.amazonaws.com", "ec2.us-east-1.amazonaws.com", True),
        ("ec2.us-east-1.amazonaws.com", "ec2.*.amazonaws.com", False),
        ("**.amazonaws.com", "ec2.*.amazonaws.com", True),
        ("*.*.amazonaws.com", "ec2.*.amazonaws.com", True),
        ("*.amazonaws.com", "ec2.*.amazonaws.com", False),
        ("api.*.example.com", "*.*.example.com", False),
        ("**.*.example.com", "*.*.example.com", True),
        ("**.*.example.com", "**.example.com", False),
        ("**.example.com", "**.*.example.com", True),
        ("*.*.example.com", "**.example.com", False),
        ("**.api.*.example.com", "x.api.*.example.com", True),
        ("**.api.*.example.com", "**.api.eu.example.com", True),
        ("a.*.example.com", "a.*.example.com", True),
    ],
)
def test_covers_mid_name_wildcards(wide: str, narrow: str, expected: bool) -> None:
    """covers() compares mid-name "*" label by label: "*" covers one label of any kind, a fixed label only itself."""
    assert covers(wide, narrow) is expected


# A small list with each kind of rule: a multi-label suffix, a wildcard rule and its exception, a suffix under a
# name that is none (aws.com), a wildcard rule whose root is no rule, and a deep rule whose parents are no rules.
_MINI_LIST = """
com
uk
co.uk
*.ck
!www.ck
r1.aws.com
*.compute.com
a.deep.er.com
"""
_MINI_LABELS = ("com", "uk", "co", "ck", "www", "r1", "aws", "compute", "a", "deep", "er", "z")


def _open_by_brute_force(pattern: list[str], suffixes: PublicSuffixList) -> bool:
    """Whether some name the pattern matches, its wildcards filled from every label of the small list and one
    label it lacks ("z"), "**" with one or more labels up to 5 in all (the list reads 4 at most), has a wildcard
    as its deciding label: the one left of its public suffix, or its first label when it is a suffix itself."""
    shapes = [["*"] * n + pattern[1:] for n in range(1, 7 - len(pattern))] if pattern[0] == "**" else [pattern]
    for shape in shapes:
        wild = [at for at, label in enumerate(shape) if label == "*"]
        for fills in itertools.product(_MINI_LABELS, repeat=len(wild)):
            name = list(shape)
            for at, fill in zip(wild, fills, strict=True):
                name[at] = fill
            deciding = max(len(name) - suffixes.publicsuffix(".".join(name)).count(".") - 2, 0)
            if shape[deciding] == "*":
                return True
    return False


_MINI_PATTERN = st.tuples(
    st.sampled_from([[], ["*"], ["**"]]),
    st.lists(st.sampled_from([*_MINI_LABELS, "*"]), max_size=2),
    st.sampled_from(["com", "uk", "ck", "z"]),
)


@settings(max_examples=150, deadline=None)
@given(parts=_MINI_PATTERN)
@example(parts=(["**"], ["er"], "com"))  # refused only with "**" as two labels: a.deep.er.com is a suffix
@example(parts=(["*"], ["deep", "er"], "com"))  # a.deep.er.com: the "*" is the first label of a suffix
@example(parts=(["*"], ["aws"], "com"))  # r1.aws.com, a suffix under aws.com, which is none
@example(parts=([], ["a", "*"], "ck"))  # the exception !www.ck: "www" is registrable
@example(parts=([], ["a", "*", "compute"], "com"))  # a.x.compute.com under x.compute.com (*.compute.com): loads
def test_safety_rule_agrees_with_brute_force(parts: tuple[list[str], list[str], str]) -> None:
    """Against a small list, a wildcard pattern loads exactly when no filling of its wildcards makes a wildcard the
    deciding label, as found by trying every label the list has."""
    first, middle, last = parts
    pattern = [*first, *middle, last]
    assume("*" in pattern or first == ["**"])
    mini = PublicSuffixList(source=_MINI_LIST)
    with pytest.MonkeyPatch.context() as patch:
        suffixes.forget_public_suffixes()
        patch.setattr(suffixes, "public_suffixes", functools.cache(lambda: mini))
        try:
            try:
                parse_pattern(".".join(pattern))
                refused = False
            except ValueError:
                refused = True
        finally:
            suffixes.suffix_labels.cache_clear()
    assert refused is _open_by_brute_force(pattern, mini), pattern
