"""Inspect mode's rules: the ``inspect:`` grammar, path normalisation, glob matching, the request check, how decide
picks inspection when several rules match, and what validate, check, lint and diff say about it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.cli import main as cli_main
from egressd.hostport import Destination
from egressd.inspect import rules
from egressd.inspect.rules import (
    Inspect,
    InspectEntry,
    Refusal,
    check_request,
    match_path,
    normalize_path,
    parse_method,
    parse_path,
    path_covers,
)
from egressd.policy import PolicyError, Rule, load_policy, validate
from egressd.policy.decide import decide, decide_name
from egressd.policy.diff import diff_policies
from egressd.policy.lint import lint
from egressd.policy.model import Mode, Reason, Verdict

ROOT = Path(__file__).resolve().parents[1]
GITHUB = """\
  - host: api.github.com
    inspect:
      - methods: [GET]
        paths: ["/repos/acme/**", "/orgs/acme"]
      - methods: [POST]
        paths: ["/repos/acme/*/issues"]
"""


@pytest.fixture(autouse=True)
def inspect_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grammar is tested on every Python: the one check for Python 3.12+ and mitmproxy says yes."""
    monkeypatch.setattr(rules, "inspect_unavailable", lambda: None)


def entry(methods: str, *paths: str, source: str = "svc.yaml:1") -> InspectEntry:
    return InspectEntry(frozenset(methods.split()), paths, tuple(parse_path(p) for p in paths), source)


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def service(rules_text: str, name: str = "svc") -> str:
    return f"version: v1\nservice: {name}\nallow:\n{rules_text}"


def errors(tmp_path: Path, rules_text: str, files: dict[str, str] | None = None) -> list[str]:
    directory = write(tmp_path / "lists", files or {"svc.yaml": service(rules_text)})
    return [str(error).removeprefix(f"{directory}/") for error in validate(directory)]


# --- normalize_path -----------------------------------------------------------------------------------------------

NORMALISED = [
    ("/repos/acme/x", "/repos/acme/x"),
    ("/repos/acme/x?page=2&q=../../x", "/repos/acme/x"),
    ("/repos/acme/x#frag", "/repos/acme/x"),
    ("/a?b#c", "/a"),
    ("/", "/"),
    ("/a/", "/a/"),
    ("//a//b//", "/a/b/"),
    ("/repos/acme/../other", "/repos/other"),
    ("/repos/acme/%2e%2e/other", "/repos/other"),
    ("/repos/acme/%2E%2E/other", "/repos/other"),
    ("/repos/acme/.%2e/other", "/repos/other"),
    ("/a/./b", "/a/b"),
    ("/a/%2e/b", "/a/b"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/a/..", "/"),
    ("/a//../b", "/b"),  # doubled slashes collapse first, then ".." climbs over "a"
    ("/REPOS/Acme", "/REPOS/Acme"),  # case is kept
    ("/%41%62c", "/Abc"),
    ("/caf%C3%A9", "/café"),
    ("/a%20b", "/a b"),
    ("/a%3Fb", "/a?b"),  # an encoded "?" is data, not a query
    ("/...", "/..."),
    ("https://api.github.com/repos/acme/x?y", "/repos/acme/x"),
    ("HTTP://api.github.com", "/"),
    ("http://api.github.com?x=1", "/"),
    (b"/repos/acme/x", "/repos/acme/x"),
]

REFUSED = [
    ("/..", '".."'),
    ("/a/../..", '".."'),
    ("/%2e%2e/etc", '".."'),
    ("/repos/acme%2Fother", "%2F"),
    ("/repos/acme%2fother", "%2F"),
    ("/a%5Cb", "%5C"),
    ("/a\\b", '"\\"'),
    ("/a;b=1/c", '";"'),
    ("/repos/acme/..;/other", '";"'),
    ("/a%3Bb", "%3B"),
    ("/a%00b", "%00"),
    ("/a%0Ab", "%0A"),
    ("/a%zz", '"%zz"'),
    ("/a%4", '"%4"'),
    ("/a%", '"%"'),
    ("/a%252e%252e", "%25"),
    ("/a%FFb", "not UTF-8"),
    ("/a b", "space"),
    ("/a\tb", "control"),
    ("/caf\u00e9", "outside ASCII"),
    (b"/caf\xc3\xa9", "outside ASCII"),
    ("*", "asterisk-form"),
    ("api.github.com:443", "authority"),
    ("ftp://host/x", "authority"),
    ("", "authority"),
]


@pytest.mark.parametrize(("raw", "path"), NORMALISED)
def test_normalize_path(raw: str | bytes, path: str) -> None:
    """A request-target's path is normalised as matching sees it: query dropped, decoded, slashes and dots resolved."""
    assert normalize_path(raw) == path


@pytest.mark.parametrize(("raw", "words"), REFUSED)
def test_normalize_path_refuses_ambiguous_paths(raw: str | bytes, words: str) -> None:
    """A path that servers could read differently, or that has no path, is refused with a reason, never passed."""
    refusal = normalize_path(raw)
    assert isinstance(refusal, Refusal) and words in refusal.message


@given(st.text(alphabet="/.%2eEfF;ab?#\\", max_size=24))
def test_normalized_paths_have_no_dot_or_empty_segments(raw: str) -> None:
    """Whatever the input, a normalised path starts with "/" and has no ".", ".." or empty segment but a last one."""
    path = normalize_path(raw)
    if isinstance(path, str):
        segments = path[1:].split("/")
        assert path.startswith("/") and "" not in segments[:-1] and not {".", ".."} & set(segments)


# --- the glob -----------------------------------------------------------------------------------------------------

GLOBS = [
    ("/orgs/acme", ["/orgs/acme"], ["/orgs/acme/", "/orgs/acme/repos", "/orgs/acmex", "/orgs", "/ORGS/acme"]),
    ("/repos/acme/*/issues", ["/repos/acme/web/issues", "/repos/acme/*/issues"],
     ["/repos/acme/issues", "/repos/acme/a/b/issues", "/repos/acme/web/issues/1", "/x/repos/acme/web/issues"]),
    ("/repos/acme/**", ["/repos/acme", "/repos/acme/", "/repos/acme/web", "/repos/acme/web/pulls/1/"],
     ["/repos/acmex", "/repos/other", "/repos", "/REPOS/acme"]),
    ("/**/issues", ["/issues", "/a/issues", "/a/b/c/issues"], ["/issues/1", "/a/issuesx"]),
    ("/a/**/b/**/c", ["/a/b/c", "/a/x/b/y/z/c", "/a/b/b/c"], ["/a/c", "/a/b/x", "/a/b/c/d"]),
    ("/*", ["/x"], ["/", "/x/", "/x/y"]),
    ("/*/", ["/x/"], ["/x", "//"]),
    ("/", ["/"], ["/x", "/x/"]),
    ("/**", ["/", "/x", "/x/y/", "/a/b/c"], []),
    ("/a/", ["/a/"], ["/a", "/a/b"]),
]


@pytest.mark.parametrize(("pattern", "accept", "reject"), GLOBS)
def test_glob_matches_whole_segments_anchored(pattern: str, accept: list[str], reject: list[str]) -> None:
    """"*" is one non-empty segment, "**" zero or more, literals equal; the whole path must match."""
    compiled = parse_path(pattern)
    for path in accept:
        assert match_path(compiled, tuple(path[1:].split("/"))), path
    for path in reject:
        assert not match_path(compiled, tuple(path[1:].split("/"))), path


@pytest.mark.parametrize(
    ("wide", "narrow", "covers"),
    [
        ("/repos/acme/**", "/repos/acme/*/issues", True),
        ("/repos/acme/**", "/repos/acme", True),
        ("/repos/*/issues", "/repos/acme/issues", True),
        ("/repos/acme/*/issues", "/repos/acme/**", False),
        ("/repos/acme/web", "/repos/acme/*", False),
        ("/**", "/", True),
        ("/*", "/", False),
        ("/a/**/c", "/a/b/**/c", True),
        ("/a/*/c", "/a/**/c", False),
    ],
)
def test_path_covers(wide: str, narrow: str, covers: bool) -> None:
    """The review diff's judgement: whether every path ``narrow`` matches is matched by ``wide``."""
    assert path_covers(parse_path(wide), parse_path(narrow)) is covers


@given(st.lists(st.sampled_from(["a", "b", "*", "**"]), min_size=1, max_size=4),
       st.lists(st.sampled_from(["a", "b", "*", "**"]), min_size=1, max_size=4),
       st.lists(st.sampled_from(["a", "b", "c", "*"]), min_size=1, max_size=5))
def test_covered_patterns_match_what_the_narrow_one_matches(wide: list[str], narrow: list[str], path: list[str]) \
        -> None:
    """If path_covers(wide, narrow), every path narrow matches is matched by wide."""
    w, n = (tuple(parts) for parts in (wide, narrow))
    if any(a == b == "**" for a, b in zip(w, w[1:], strict=False)):
        return
    if path_covers(w, n) and match_path(n, tuple(path)):
        assert match_path(w, tuple(path))


# --- the grammar of one method and one path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("get", 'method "get" must be upper case (HTTP methods are case-sensitive); write GET'),
        ("*", 'method "*" is not a wildcard; list the methods the service needs, e.g. [GET, HEAD]'),
        ("ANY", 'method "ANY" is not a wildcard; list the methods the service needs, e.g. [GET, HEAD]'),
        ("GE T", 'method "GE T" is not an HTTP method (upper-case letters, digits, "-" and "_"), e.g. GET'),
        ("CONNECT", 'method "CONNECT" would open a tunnel inside the inspected one, which nothing inspects; '
         "remove it"),
    ],
)
def test_bad_methods(text: str, message: str) -> None:
    """A method that is not an upper-case token, a wildcard or CONNECT is refused with the fix."""
    with pytest.raises(ValueError) as exc:
        parse_method(text)
    assert str(exc.value) == message


def test_good_methods() -> None:
    """Upper-case tokens are methods as written."""
    assert [parse_method(m) for m in ("GET", "POST", "PROPFIND", "M-SEARCH")] == ["GET", "POST", "PROPFIND",
                                                                                "M-SEARCH"]


_CHARS = "letters, digits and -._~!$&'()+,=:@"
BAD_PATHS = [
    ("repos/acme", 'path "repos/acme" must start with "/" (patterns are anchored at the root); write "/repos/acme"'),
    ("https://api.github.com/repos", 'path "https://api.github.com/repos" is a URL; write only its path, "/repos"'),
    ("/a?x=1", 'path "/a?x=1" has a query ("?"), which matching ignores; write "/a"'),
    ("/a#top", 'path "/a#top" has a fragment ("#"), which matching ignores; write "/a"'),
    ("/a%2Fb", 'path "/a%2Fb" has a percent escape; patterns match the decoded path and take none: write the '
     f'character itself ({_CHARS}), or "*" for that segment'),
    ("/a;v=1", 'path "/a;v=1" has ";", which requests may not have (servers read parameters differently), so it '
     "would never match; remove it"),
    ("/a//b", 'path "/a//b" has an empty segment ("//"); doubled slashes are collapsed before matching: write "/a/b"'),
    ("/a/../b", 'path "/a/../b" has a dot segment (".."); dot segments are resolved before matching, so write the '
     'path they resolve to: "/b"'),
    ("/a/./b", 'path "/a/./b" has a dot segment ("."); dot segments are resolved before matching, so write the '
     'path they resolve to: "/a/b"'),
    ("/repos/a*", 'path "/repos/a*": "*" stands for a whole segment, never part of one ("a*"); write "*" for any '
     'one segment there, e.g. "/repos/*"'),
    ("/repos/***", 'path "/repos/***": "*" stands for a whole segment, never part of one ("***"); write "*" for any '
     'one segment there, e.g. "/repos/*"'),
    ("/a/**/**", 'path "/a/**/**" has "**" twice in a row; one matches any number of segments: write "/a/**"'),
    ("/a b", f"path \"/a b\" has ' ', which a pattern cannot match literally (it takes {_CHARS}); write \"*\" for "
     'that segment, e.g. "/*"'),
    ("/caf\u00e9", f"path \"/caf\u00e9\" has '\u00e9', which a pattern cannot match literally (it takes {_CHARS}); "
     'write "*" for that segment, e.g. "/*"'),
    ("/a\\b", f"path \"/a\\b\" has '\\\\', which a pattern cannot match literally (it takes {_CHARS}); write \"*\" "
     'for that segment, e.g. "/*"'),
]


@pytest.mark.parametrize(("text", "message"), BAD_PATHS)
def test_bad_path_patterns(text: str, message: str) -> None:
    """Each pattern outside the grammar is refused with what is wrong and an example fix."""
    with pytest.raises(ValueError) as exc:
        parse_path(text)
    assert str(exc.value) == message


# --- check_request ------------------------------------------------------------------------------------------------

GITHUB_RULES = Inspect((entry("GET", "/repos/acme/**", "/orgs/acme", source="svc.yaml:6"),
                        entry("POST", "/repos/acme/*/issues", source="svc.yaml:8")))


@pytest.mark.parametrize(
    ("method", "target", "allowed", "source", "path"),
    [
        ("GET", "/repos/acme/web/pulls?state=open", True, "svc.yaml:6", "/repos/acme/web/pulls"),
        ("GET", "/orgs/acme", True, "svc.yaml:6", "/orgs/acme"),
        ("POST", "/repos/acme/web/issues", True, "svc.yaml:8", "/repos/acme/web/issues"),
        ("GET", "https://api.github.com/repos/acme", True, "svc.yaml:6", "/repos/acme"),
        ("POST", "/gists", False, None, "/gists"),
        ("DELETE", "/repos/acme/web", False, None, "/repos/acme/web"),
        ("get", "/repos/acme/web", False, None, "/repos/acme/web"),
        ("HEAD", "/repos/acme/web", False, None, "/repos/acme/web"),
        ("GET", "/repos/acme/../other", False, None, "/repos/other"),
        ("GET", "/repos/acme/%2e%2e/other", False, None, "/repos/other"),
        ("GET", "/repos/acme//../other", False, None, "/repos/other"),
        ("GET", "/REPOS/acme/web", False, None, "/REPOS/acme/web"),
        ("POST", "/repos/acme/web/issues/1", False, None, "/repos/acme/web/issues/1"),
        ("POST", "/repos/acme//issues", False, None, "/repos/acme/issues"),
        ("GET", "/repos/acme%2F..%2Fother", False, None, None),
        ("GET", "/repos/acme;/../other", False, None, None),
        ("GET", "*", False, None, None),
    ],
)
def test_check_request(method: str, target: str, allowed: bool, source: str | None, path: str | None) -> None:
    """A request passes when one entry lists its method and a path of it matches the normalised path."""
    verdict = check_request(GITHUB_RULES, method, target)
    assert (verdict.allowed, verdict.source, verdict.path) == (allowed, source, path)
    assert verdict.reason is (Reason.ALLOWED if allowed else Reason.REQUEST_NOT_ALLOWED)
    assert (verdict.refusal is not None) == (path is None)


def test_inspect_values_compare_by_content() -> None:
    """Entries and rules with inspect: are hashable, equal when they allow the same requests as written."""
    one, two = entry("GET", "/a", source="x.yaml:1"), entry("GET", "/a", source="y.yaml:9")
    assert one == two and hash(one) == hash(two) and entry("GET", "/b") != one
    rule = Rule("svc.yaml:4", host="api.github.com", inspect=Inspect((one,)))
    assert rule == Rule("svc.yaml:4", host="api.github.com", inspect=Inspect((two,))) and hash(rule)
    assert rule != Rule("svc.yaml:4", host="api.github.com")
    with pytest.raises(ValueError):
        Inspect(())


# --- loading ------------------------------------------------------------------------------------------------------


def test_loaded_inspect_rule(tmp_path: Path) -> None:
    """A host rule's inspect: loads into entries with their file:line; the rule without one is not inspected."""
    directory = write(tmp_path / "lists", {"svc.yaml": service(GITHUB + '  - host: "*.github.com"\n')})
    allow = load_policy(directory).services["svc"].allow
    inspected, blind = allow.rules
    assert inspected.inspect is not None and blind.inspect is None and allow.inspected
    assert [(str(e), e.source.removeprefix(f"{directory}/"), e.column) for e in inspected.inspect.entries] == [
        ("GET /repos/acme/**, /orgs/acme", "svc.yaml:6", 9), ("POST /repos/acme/*/issues", "svc.yaml:8", 9)]


_ENTRY_FIX = 'write e.g. {methods: [GET], paths: ["/repos/acme/**"]}'
LOAD_ERRORS = [
    ("cidr", "  - cidr: 198.51.100.0/24\n    inspect: [{methods: [GET], paths: [/]}]\n",
     ["svc.yaml:5: inspect: needs a host: rule (an inspected connection is bound to a name); a cidr: rule is never "
      "inspected: remove inspect:, or write the rule with host:"]),
    ("empty", "  - host: api.github.com\n    inspect: []\n",
     ["svc.yaml:5: inspect is empty, which would allow no request; list the requests the service may make, or "
      "remove inspect: to allow the whole name uninspected"]),
    ("not a list", "  - host: api.github.com\n    inspect: GET\n",
     ['svc.yaml:5: inspect must be a list; write inspect: [{methods: [GET], paths: ["/repos/acme/**"]}]']),
    ("no paths", "  - host: api.github.com\n    inspect:\n      - methods: [GET]\n",
     [f"svc.yaml:6: an inspect entry needs paths:; {_ENTRY_FIX}"]),
    ("neither", "  - host: api.github.com\n    inspect: [{}]\n",
     [f"svc.yaml:5: an inspect entry needs methods: and paths:; {_ENTRY_FIX}"]),
    ("unknown key", "  - host: api.github.com\n    inspect: [{methods: [GET], paths: [/], path: [/x]}]\n",
     ['svc.yaml:5: unknown key "path" in an inspect entry; allowed keys are: methods, paths']),
    ("empty methods", "  - host: api.github.com\n    inspect: [{methods: [], paths: [/]}]\n",
     ["svc.yaml:5: methods is empty; list at least one, e.g. methods: [GET]"]),
    ("empty paths", "  - host: api.github.com\n    inspect: [{methods: [GET], paths: []}]\n",
     ['svc.yaml:5: paths is empty; list at least one, e.g. paths: ["/repos/acme/**"]']),
    ("lower-case", "  - host: api.github.com\n    inspect: [{methods: [get], paths: [/]}]\n",
     ['svc.yaml:5: method "get" must be upper case (HTTP methods are case-sensitive); write GET']),
    ("twice", "  - host: api.github.com\n    inspect: [{methods: [GET, GET], paths: [/a, /a]}]\n",
     ['svc.yaml:5: method "GET" is listed twice in this entry; remove one',
      'svc.yaml:5: path "/a" is listed twice in this entry; remove one']),
    ("bad path", "  - host: api.github.com\n    inspect:\n      - methods: [GET]\n        paths: ['/a/**x']\n",
     ['svc.yaml:7: path "/a/**x": "*" stands for a whole segment, never part of one ("**x"); write "*" for any one '
      'segment there, e.g. "/a/*"']),
    ("repeated rule", "  - {host: api.github.com, inspect: [{methods: [GET], paths: [/a]}]}\n"
     "  - {host: api.github.com, inspect: [{methods: [GET], paths: [/b]}]}\n",
     ["svc.yaml:5: allow rule api.github.com repeats the rule on line 4; merge their inspect: entries into one rule"]),
]


@pytest.mark.parametrize(("case", "rules_text", "expected"), LOAD_ERRORS, ids=[case[0] for case in LOAD_ERRORS])
def test_inspect_load_errors(tmp_path: Path, case: str, rules_text: str, expected: list[str]) -> None:
    """Each wrong inspect: fails to load with file:line, what is wrong and the fix."""
    assert errors(tmp_path, rules_text) == expected


def test_inspect_on_a_deny_rule_is_refused(tmp_path: Path) -> None:
    """A deny rule refuses the whole name: inspect: there is an error, and a global allow rule may inspect."""
    text = ("version: v1\nglobal: true\nallow:\n" + GITHUB + "deny:\n  - host: pastebin.com\n"
            "    inspect: [{methods: [GET], paths: [/]}]\n")
    assert errors(tmp_path, "", {"_global.yaml": text, "svc.yaml": service("  - host: a.example.com\n")}) == [
        "_global.yaml:12: deny rules refuse the whole name and are never inspected; remove inspect:, or move the rule "
        "to allow:"]


def test_column_points_at_the_pattern(tmp_path: Path) -> None:
    """A bad pattern's error carries the line and column of that pattern, for validate's file:line:column."""
    directory = write(tmp_path / "lists", {"svc.yaml": service(
        "  - host: api.github.com\n    inspect:\n      - methods: [GET]\n        paths: [/ok, '/a b']\n")})
    (error,) = validate(directory)
    assert (error.line, error.column) == (7, 22)


def test_unavailable_inspection_fails_at_each_inspected_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    """When the one availability check says no, every inspected rule fails at its own file:line with that text."""
    monkeypatch.setattr(rules, "inspect_unavailable", lambda: "inspect: cannot run here; fix it")
    text = GITHUB + "  - host: b.example.com\n  - host: c.example.com\n    inspect: [{methods: [GET], paths: [/]}]\n"
    assert errors(tmp_path, text) == ["svc.yaml:4: inspect: cannot run here; fix it",
                                      "svc.yaml:11: inspect: cannot run here; fix it"]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the Python 3.11 refusal; on 3.12+ mitmproxy can run")
def test_python_311_refuses_inspect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.11 a policy with inspect: does not load: mitmproxy needs 3.12 or newer."""
    monkeypatch.undo()
    assert errors(tmp_path, GITHUB) == [
        "svc.yaml:4: inspect: needs Python 3.12 or newer for mitmproxy; this egressd runs on 3.11 (run egressd on "
        "Python 3.12 or newer, or remove inspect:)"]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="on 3.11 the Python version is refused first")
def test_missing_mitmproxy_refuses_inspect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.12+ without mitmproxy, a policy with inspect: does not load and says what to install."""
    monkeypatch.undo()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mitmproxy" else find_spec(name))
    assert errors(tmp_path, GITHUB) == [
        "svc.yaml:4: inspect: needs mitmproxy, which is not installed; pip install 'egressd[inspect]'"]


@pytest.mark.skipif(importlib.util.find_spec("mitmproxy") is None, reason="needs mitmproxy installed (Python 3.12+)")
def test_loading_inspect_rules_never_imports_mitmproxy(tmp_path: Path) -> None:
    """Where mitmproxy is installed, a policy with inspect: loads without importing it (the core stays light)."""
    directory = write(tmp_path / "lists", {"svc.yaml": service(GITHUB)})
    code = ("import sys; from egressd.policy import load_policy; "
            f"assert load_policy({str(directory)!r}).services['svc'].allow.inspected; "
            "assert not [m for m in sys.modules if m.startswith('mitmproxy')], 'mitmproxy imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr


# --- decide: which rule inspects ----------------------------------------------------------------------------------

PRECEDENCE_FILES = {
    "_global.yaml": "version: v1\nglobal: true\nallow:\n  - host: status.github.com\n  - host: uploads.github.com\n"
                    "    inspect: [{methods: [PUT], paths: ['/acme/**']}]\n",
    "svc.yaml": service('  - host: "*.github.com"\n    ports: [443, 8443]\n' + GITHUB +
                        "  - host: status.github.com\n    inspect: [{methods: [GET], paths: [/api/**]}]\n"
                        "  - host: uploads.github.com\n    inspect: [{methods: [POST], paths: ['/acme/**']}]\n"),
}


@pytest.mark.parametrize(
    ("host", "port", "rule_line", "entries"),
    [
        ("www.github.com", 443, ("svc.yaml", 4), None),  # only the wildcard: a blind tunnel
        ("api.github.com", 443, ("svc.yaml", 6), ["svc.yaml:8", "svc.yaml:10"]),  # the wildcard came first
        ("api.github.com", 8443, ("svc.yaml", 4), None),  # inspect: applies on its rule's ports only
        ("status.github.com", 443, ("svc.yaml", 12), ["svc.yaml:13"]),  # global uninspected: no bypass
        ("uploads.github.com", 443, ("svc.yaml", 14), ["svc.yaml:15", "_global.yaml:6"]),  # both inspect: union
    ],
)
def test_any_inspected_rule_inspects_the_connection(tmp_path: Path, host: str, port: int,
                                                    rule_line: tuple[str, int], entries: list[str] | None) -> None:
    """If any allow rule matching (host, port) has inspect:, the connection is inspected with all their entries."""
    directory = write(tmp_path / "lists", PRECEDENCE_FILES)
    decision = decide(load_policy(directory), "svc", Destination(host=host, port=port))
    assert decision.verdict is Verdict.ALLOW and decision.reason is Reason.ALLOWED
    assert decision.source == f"{directory}/{rule_line[0]}:{rule_line[1]}"
    shown = None if decision.inspect is None else [
        e.source.removeprefix(f"{directory}/") for e in decision.inspect.entries]
    assert shown == entries


def test_union_of_inspected_rules_allows_either(tmp_path: Path) -> None:
    """Several inspected rules on one name: a request passes if an entry of any of them allows it."""
    decision = decide(load_policy(write(tmp_path / "lists", PRECEDENCE_FILES)), "svc",
                      Destination(host="uploads.github.com", port=443))
    assert decision.inspect is not None
    assert [check_request(decision.inspect, m, "/acme/x").allowed for m in ("POST", "PUT", "GET")] == [
        True, True, False]


def test_audit_would_deny_and_dns_are_not_inspected(tmp_path: Path) -> None:
    """An audit-mode would_deny carries no inspection, and the DNS filter answers an inspected name as allowed."""
    directory = write(tmp_path / "lists", {"svc.yaml": service(GITHUB).replace("allow:", "mode: audit\nallow:")})
    policy = load_policy(directory)
    assert decide(policy, "svc", Destination(host="api.github.com", port=8443)).inspect is None
    assert decide(policy, "svc", Destination(host="api.github.com", port=443), Mode.ENFORCE).inspect is not None
    assert decide_name(policy, "svc", "api.github.com").allowed


# --- the tools: check, lint, diff ---------------------------------------------------------------------------------


@pytest.fixture
def github(tmp_path: Path) -> Path:
    return write(tmp_path / "lists", {"svc.yaml": service(GITHUB + '  - host: "*.github.com"\n')})


@pytest.mark.parametrize(
    ("args", "code", "lines"),
    [
        (["api.github.com"], 0, ["allow allowed rule={d}/svc.yaml:4 api.github.com:443 service=svc",
                                 "inspected: a request passes only if one of these 2 entries allows it",
                                 "  GET /repos/acme/**, /orgs/acme ({d}/svc.yaml:6)",
                                 "  POST /repos/acme/*/issues ({d}/svc.yaml:8)"]),
        (["api.github.com", "--method", "GET", "--path", "/repos/acme/web?x=1"], 0,
         ["allow allowed rule={d}/svc.yaml:4 api.github.com:443 service=svc",
          "request allow allowed entry={d}/svc.yaml:6 GET path=/repos/acme/web"]),
        (["api.github.com", "--method", "POST", "--path", "/gists"], 1,
         ["allow allowed rule={d}/svc.yaml:4 api.github.com:443 service=svc",
          "request deny request_not_allowed entry=- POST path=/gists (no entry allows it)"]),
        (["api.github.com", "--method", "GET", "--path", "/repos/acme/%2e%2e/other"], 1,
         ["allow allowed rule={d}/svc.yaml:4 api.github.com:443 service=svc",
          "request deny request_not_allowed entry=- GET path=/repos/other (no entry allows it)"]),
        (["api.github.com", "--method", "GET", "--path", "/repos/acme%2fx"], 1,
         ["allow allowed rule={d}/svc.yaml:4 api.github.com:443 service=svc",
          "request deny request_not_allowed entry=- GET path=- (the path has an encoded slash (%2F), which servers "
          "read differently)"]),
        (["www.github.com", "--method", "DELETE", "--path", "/x"], 0,
         ["allow allowed rule={d}/svc.yaml:10 www.github.com:443 service=svc",
          "request not inspected: the rule has no inspect:, so every method and path passes"]),
        (["evil.example", "--method", "GET", "--path", "/"], 1,
         ["deny not_allowlisted rule=- evil.example:443 service=svc"]),
    ],
)
def test_check_method_and_path(github: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int,
                               lines: list[str]) -> None:
    """egressd check --method --path decides one request on an inspected name: exit 0 allow, 1 deny."""
    assert cli_main(["check", "--allowlists", str(github), "--service", "svc", *args]) == code
    assert capsys.readouterr().out.splitlines() == [line.format(d=github) for line in lines]


def test_check_needs_method_and_path_together(github: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--method without --path (or the reverse) is a usage error, exit 2."""
    assert cli_main(["check", "--allowlists", str(github), "--service", "svc", "api.github.com", "--path", "/"]) == 2
    assert "give --method and --path together, or neither" in capsys.readouterr().err


def test_lint_warns_about_inspection(tmp_path: Path) -> None:
    """validate warns about an entry for every path, and about a blind rule whose names another rule inspects."""
    directory = write(tmp_path / "lists", {"svc.yaml": service(
        '  - host: "*.github.com"\n' + GITHUB + "  - host: raw.example.com\n    inspect: [{methods: [GET], paths: "
        "['/**']}]\n")})
    assert [(w.line, w.column, w.code) for w in lint(load_policy(directory))] == [
        (4, 5, "inspected-by-other"), (12, 15, "inspect-any-path")]
    (blind, every) = lint(load_policy(directory))
    assert blind.message == (f'host "*.github.com" has no inspect:, but host "api.github.com" ({directory}/svc.yaml:5) '
                             "inspects the names they share: there only its requests pass; add the same inspect: "
                             "here, or narrow one of the rules")
    assert every.message == ('the inspect: entry for GET on host "raw.example.com" allows every path ("/**"), so it '
                             "checks the method only; list the paths the service needs")


def test_inspected_rule_is_not_redundant_to_a_blind_wildcard(tmp_path: Path) -> None:
    """A rule with inspect: under a wider rule without it is not reported redundant: it adds the inspection."""
    directory = write(tmp_path / "lists", {"svc.yaml": service('  - host: "*.github.com"\n' + GITHUB)})
    assert "redundant-rule" not in [w.code for w in lint(load_policy(directory))]


DIFF_OLD = service(GITHUB + "  - host: hooks.example.com\n    inspect: [{methods: [POST], paths: [/hooks/*]}]\n"
                   "  - host: plain.example.com\n")
DIFF_NEW = service(GITHUB.replace('"/orgs/acme"', '"/orgs/acme", "/gists/**"').replace(
    '"/repos/acme/*/issues"', '"/repos/acme/web/issues"') + "  - host: hooks.example.com\n"
    "  - host: plain.example.com\n    inspect: [{methods: [GET], paths: [/status]}]\n")


def test_diff_shows_inspection_changes(tmp_path: Path) -> None:
    """egressd diff shows paths widened or narrowed, and inspection removed (widens) or added (narrows)."""
    old = load_policy(write(tmp_path / "old", {"svc.yaml": DIFF_OLD}))
    new_dir = write(tmp_path / "new", {"svc.yaml": DIFF_NEW})
    changes = diff_policies(old, load_policy(new_dir)).sections[0].changes
    shown = {(c.effect.value, c.kind.value, c.subject, c.rule.source.removeprefix(f"{new_dir}/")) for c in changes}
    assert shown == {
        ("widens", "requests added", "GET /gists/**", "svc.yaml:4"),
        ("same reach", "requests added", "POST /repos/acme/web/issues", "svc.yaml:4"),
        ("narrows", "requests removed", "POST /repos/acme/*/issues", "svc.yaml:4"),
        ("widens", "inspection removed", "every method and path passes now", "svc.yaml:10"),
        ("narrows", "inspection added", "GET /status", "svc.yaml:11"),
    }


def test_diff_command_prints_the_widened_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The egressd diff report names the new requests on the inspected name and exits 3 (it widens)."""
    write(tmp_path / "old", {"svc.yaml": DIFF_OLD})
    write(tmp_path / "new", {"svc.yaml": DIFF_NEW})
    monkeypatch.chdir(tmp_path)
    assert cli_main(["diff", "old", "new"]) == 3
    out = capsys.readouterr().out
    assert "    requests added on api.github.com port 443: GET /gists/** (new/svc.yaml:4)" in out
    assert "    inspection removed on hooks.example.com port 443: every method and path passes now (new/svc.yaml:10)" \
        in out
    assert ("    requests added on api.github.com port 443: POST /repos/acme/web/issues (new/svc.yaml:4); within the "
            "other requests") in out


def test_added_inspected_rule_shows_its_requests(tmp_path: Path) -> None:
    """A new rule with inspect: is shown with the requests it allows."""
    from egressd.cli.review import describe

    old = load_policy(write(tmp_path / "old", {"svc.yaml": service("  - host: a.example.com\n")}))
    new = load_policy(write(tmp_path / "new", {"svc.yaml": service("  - host: a.example.com\n" + GITHUB)}))
    (change,) = diff_policies(old, new).sections[0].changes
    assert describe(change, lambda source: source.rpartition("/")[2]) == (
        "added api.github.com port 443 (svc.yaml:5), inspected: GET /repos/acme/**, /orgs/acme; "
        "POST /repos/acme/*/issues")


def test_policy_error_lists_inspect_errors_with_the_others(tmp_path: Path) -> None:
    """A wrong inspect: makes the whole directory fail to load, like any other error (fail closed)."""
    with pytest.raises(PolicyError):
        load_policy(write(tmp_path / "lists", {"svc.yaml": service("  - host: a.b.com\n    inspect: []\n")}))
