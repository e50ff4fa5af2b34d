"""egressd diff: what an allowlist change opens up, per service, between two directories or two git revisions."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.cli.review import describe
from egressd.hostport import Destination
from egressd.policy.decide import decide
from egressd.policy.diff import GLOBAL, Effect, PolicyDiff, diff_policies
from egressd.policy.identities import IdentityIndex
from egressd.policy.loader import load_policy
from egressd.policy.match import RuleSet
from egressd.policy.model import Mode, Policy, Rule, ServicePolicy
from egressd.policy.revision import split_range

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


def service(name: str, *rules: str, mode: str = "enforce", identities: tuple[str, ...] = ()) -> str:
    """A service file: rule N (a flow mapping such as ``{host: a.example.com}``) is on line 4 + N."""
    text = f"version: v1\nservice: {name}\nmode: {mode}\n{_block('allow', rules)}"
    if identities:
        text += "identities:\n" + "".join(f"  - {identity}\n" for identity in identities)
    return text


def global_file(allow: tuple[str, ...] = ("{host: oauth2.googleapis.com}",),
                deny: tuple[str, ...] = ('{host: "**.pastebin.com"}',), cidrs: str = "[]") -> str:
    """The global file: allow rule N on line 3 + N, then deny: and its rules, then allow_cidrs."""
    return f"version: v1\nglobal: true\n{_block('allow', allow)}{_block('deny', deny)}allow_cidrs: {cidrs}\n"


def _block(key: str, rules: tuple[str, ...]) -> str:
    return f"{key}:\n" + "".join(f"  - {rule}\n" for rule in rules) if rules else f"{key}: []\n"


ACCOUNT = "{namespace: payments, serviceAccount: pay}"
REFUNDS = "{namespace: payments, serviceAccount: refunds}"
BASE = {"_global.yaml": global_file(), "pay.yaml": service("pay", "{host: api.stripe.com}"),
        "shop.yaml": service("shop", "{host: api.paypal.com}")}


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def lines(root: Path, report: PolicyDiff) -> list[str]:
    """Each change as ``section: effect: description``, paths shown below ``root``."""
    where = lambda source: source.removeprefix(f"{root}/")  # noqa: E731
    return [f"{section.name or 'global'}: {change.effect.value}: {describe(change, where)}"
            for section in report.sections for change in section.changes]


def diff_dirs(tmp_path: Path, old: dict[str, str], new: dict[str, str]) -> PolicyDiff:
    before = load_policy(write(tmp_path / "old", {**BASE, **old}))
    after = load_policy(write(tmp_path / "new", {**BASE, **new}))
    return diff_policies(before, after)


STRIPE2 = ("{host: api.stripe.com}", "{host: files.stripe.com}")
CASES = {
    "nothing changed": ({}, {}, []),
    "rules reordered in their file": (
        {"pay.yaml": service("pay", *STRIPE2)}, {"pay.yaml": service("pay", *reversed(STRIPE2))}, []),
    "added": ({}, {"pay.yaml": service("pay", *STRIPE2)}, [
        "pay: widens: added files.stripe.com port 443 (new/pay.yaml:6)"]),
    "removed": ({"pay.yaml": service("pay", *STRIPE2)}, {}, [
        "pay: narrows: removed files.stripe.com port 443 (was old/pay.yaml:6)"]),
    "widened from *. to **.": (
        {"pay.yaml": service("pay", '{host: "*.stripe.com"}')}, {"pay.yaml": service("pay", '{host: "**.stripe.com"}')},
        ["pay: widens: widened *.stripe.com (was old/pay.yaml:5) to **.stripe.com port 443 (new/pay.yaml:5)"]),
    "new wildcard over exact names": (
        {"pay.yaml": service("pay", *STRIPE2)}, {"pay.yaml": service("pay", *STRIPE2, '{host: "*.stripe.com"}')},
        ["pay: widens: new wildcard *.stripe.com port 443 (new/pay.yaml:7) covers existing "
         "api.stripe.com (new/pay.yaml:5), files.stripe.com (new/pay.yaml:6)"]),
    "widened, replacing one name and covering another": (
        {"pay.yaml": service("pay", *STRIPE2)}, {"pay.yaml": service("pay", '{host: "*.stripe.com"}', STRIPE2[0])},
        ["pay: widens: widened files.stripe.com (was old/pay.yaml:6) to *.stripe.com port 443 (new/pay.yaml:5), "
         "which also covers existing api.stripe.com (new/pay.yaml:6)"]),
    "narrowed from **. to *.": (
        {"pay.yaml": service("pay", '{host: "**.sentry.io"}')}, {"pay.yaml": service("pay", '{host: "*.sentry.io"}')},
        ["pay: narrows: narrowed **.sentry.io port 443 (was old/pay.yaml:5) to *.sentry.io (new/pay.yaml:5)"]),
    "a wildcard replaced by exact names": (
        {"pay.yaml": service("pay", '{host: "*.stripe.com"}')}, {"pay.yaml": service("pay", *STRIPE2)},
        ["pay: narrows: narrowed *.stripe.com port 443 (was old/pay.yaml:5) to api.stripe.com (new/pay.yaml:5), "
         "files.stripe.com (new/pay.yaml:6)"]),
    "ports added": ({}, {"pay.yaml": service("pay", "{host: api.stripe.com, ports: [443, 8443]}")}, [
        "pay: widens: ports added on api.stripe.com: 8443 (new/pay.yaml:5)"]),
    "ports removed": ({"pay.yaml": service("pay", "{host: api.stripe.com, ports: [443, 8443]}")}, {}, [
        "pay: narrows: ports removed on api.stripe.com: 8443 (was old/pay.yaml:5)"]),
    "ports added that another rule already allows": (
        {"pay.yaml": service("pay", "{host: api.stripe.com}", '{host: "*.stripe.com", ports: [8443]}')},
        {"pay.yaml": service("pay", "{host: api.stripe.com, ports: [443, 8443]}", '{host: "*.stripe.com", '
                             "ports: [8443]}")},
        ["pay: same reach: ports added on api.stripe.com: 8443 (new/pay.yaml:5); already allowed by *.stripe.com "
         "(old/pay.yaml:6)"]),
    "added rule opening one of its two ports": (
        {"pay.yaml": service("pay", '{host: "*.stripe.com"}')},
        {"pay.yaml": service("pay", '{host: "*.stripe.com"}', "{host: api.stripe.com, ports: [443, 8443]}")},
        ["pay: widens: added api.stripe.com port 8443 (new/pay.yaml:6); port 443 already allowed by *.stripe.com "
         "(old/pay.yaml:5)"]),
    "added rule that a wildcard already allows": (
        {"pay.yaml": service("pay", '{host: "*.stripe.com"}')},
        {"pay.yaml": service("pay", '{host: "*.stripe.com"}', "{host: api.stripe.com}")},
        ["pay: same reach: added api.stripe.com port 443 (new/pay.yaml:6); already allowed by *.stripe.com "
         "(old/pay.yaml:5)"]),
    "added rule that the global deny blocks": (
        {}, {"pay.yaml": service("pay", *STRIPE2[:1], "{host: a.pastebin.com}")}, [
        "pay: same reach: added a.pastebin.com port 443 (new/pay.yaml:6); blocked by global deny **.pastebin.com "
        "(new/_global.yaml:6)"]),
    "moved between service files": (
        {"pay.yaml": service("pay", *STRIPE2)}, {"shop.yaml": service("shop", "{host: api.paypal.com}", STRIPE2[1])},
        ["pay: narrows: removed files.stripe.com port 443 (was old/pay.yaml:6)",
         "shop: widens: added files.stripe.com port 443 (new/shop.yaml:6)"]),
    "moved from a service file to the global file": (
        {"pay.yaml": service("pay", *STRIPE2)},
        {"_global.yaml": global_file(allow=("{host: oauth2.googleapis.com}", STRIPE2[1]))},
        ["global: widens: allow added files.stripe.com port 443 (new/_global.yaml:5)",
         "pay: same reach: removed files.stripe.com port 443 (was old/pay.yaml:6); still allowed by files.stripe.com "
         "(new/_global.yaml:5)"]),
    "moved from the global file to a service file": (
        {}, {"_global.yaml": global_file(allow=()), "pay.yaml": service("pay", *STRIPE2[:1],
                                                                        "{host: oauth2.googleapis.com}")},
        ["global: narrows: allow removed oauth2.googleapis.com port 443 (was old/_global.yaml:4)",
         "pay: same reach: added oauth2.googleapis.com port 443 (new/pay.yaml:6); already allowed by "
         "oauth2.googleapis.com (old/_global.yaml:4)"]),
    "mode enforce to audit": ({}, {"pay.yaml": service("pay", *STRIPE2[:1], mode="audit")}, [
        "pay: widens: mode enforce -> audit (new/pay.yaml): audit lets every destination through except global "
        "denies"]),
    "mode audit to enforce": ({"pay.yaml": service("pay", *STRIPE2[:1], mode="audit")}, {}, [
        "pay: narrows: mode audit -> enforce (new/pay.yaml)"]),
    "identity added": (
        {"pay.yaml": service("pay", *STRIPE2[:1], identities=(ACCOUNT,))},
        {"pay.yaml": service("pay", *STRIPE2[:1], identities=(ACCOUNT, REFUNDS))},
        ["pay: widens: identity added payments/refunds (new/pay.yaml:8)"]),
    "identity removed": (
        {"pay.yaml": service("pay", *STRIPE2[:1], identities=(ACCOUNT, "{cidr: 10.20.0.0/24}"))},
        {"pay.yaml": service("pay", *STRIPE2[:1], identities=(ACCOUNT,))},
        ["pay: narrows: identity removed 10.20.0.0/24 (was old/pay.yaml:8)"]),
    "global allow added": ({}, {"_global.yaml": global_file(allow=("{host: oauth2.googleapis.com}",
                                                                    "{host: hooks.slack.com, ports: [443, 80]}"))},
                           ["global: widens: allow added hooks.slack.com ports 80, 443 (new/_global.yaml:5)"]),
    "global deny removed": ({}, {"_global.yaml": global_file(deny=())}, [
        "global: widens: deny removed **.pastebin.com (was old/_global.yaml:6)"]),
    "global deny added": ({}, {"_global.yaml": global_file(deny=('{host: "**.pastebin.com"}', "{host: transfer.sh}"))},
                          ["global: narrows: deny added transfer.sh (new/_global.yaml:7)"]),
    "global deny narrowed": ({}, {"_global.yaml": global_file(deny=('{host: "*.pastebin.com"}',))}, [
        "global: widens: deny narrowed **.pastebin.com (was old/_global.yaml:6) to *.pastebin.com "
        "(new/_global.yaml:6)"]),
    "global deny widened": (
        {"_global.yaml": global_file(deny=('{host: "*.pastebin.com"}',))}, {}, [
            "global: narrows: deny widened *.pastebin.com (was old/_global.yaml:6) to **.pastebin.com "
            "(new/_global.yaml:6)"]),
    "allow_cidrs added": ({}, {"_global.yaml": global_file(cidrs="[10.96.0.0/12]")}, [
        "global: widens: allow_cidrs added 10.96.0.0/12 (new/_global.yaml)"]),
    "allow_cidrs added inside another": (
        {"_global.yaml": global_file(cidrs="[10.96.0.0/12]")},
        {"_global.yaml": global_file(cidrs="[10.96.0.0/12, 10.96.0.0/16]")},
        ["global: same reach: allow_cidrs added 10.96.0.0/16 (new/_global.yaml); within another entry"]),
    "allow_cidrs removed": ({"_global.yaml": global_file(cidrs="[10.96.0.0/12]")}, {}, [
        "global: narrows: allow_cidrs removed 10.96.0.0/12 (was old/_global.yaml)"]),
    "cidr rule widened": (
        {"pay.yaml": service("pay", "{cidr: 203.0.113.0/25}")}, {"pay.yaml": service("pay", "{cidr: 203.0.113.0/24}")},
        ["pay: widens: widened 203.0.113.0/25 (was old/pay.yaml:5) to 203.0.113.0/24 port 443 (new/pay.yaml:5)"]),
    "TLS check turned off": ({}, {"pay.yaml": service("pay", "{host: api.stripe.com, tls: false}")}, [
        "pay: widens: TLS check no longer required on api.stripe.com port 443 (new/pay.yaml:5)"]),
    "TLS check turned on": ({"pay.yaml": service("pay", "{host: api.stripe.com, tls: false}")}, {}, [
        "pay: narrows: TLS check now required on api.stripe.com port 443 (new/pay.yaml:5)"]),
    "new service file": ({}, {"cart.yaml": service("cart", "{host: api.example.com}", identities=(ACCOUNT,))}, [
        "cart: widens: new service file new/cart.yaml, mode enforce",
        "cart: widens: added api.example.com port 443 (new/cart.yaml:5)",
        "cart: widens: identity added payments/pay (new/cart.yaml:7)"]),
    "new service file in audit mode": ({}, {"cart.yaml": service("cart", mode="audit")}, [
        "cart: widens: new service file new/cart.yaml, mode audit: audit lets every destination through except "
        "global denies"]),
}


@pytest.mark.parametrize(("old", "new", "expected"), list(CASES.values()), ids=list(CASES))
def test_diff_cases(tmp_path: Path, old: dict[str, str], new: dict[str, str], expected: list[str]) -> None:
    """Each kind of allowlist change is reported once, in its service's section, with its effect and file:line."""
    assert lines(tmp_path, diff_dirs(tmp_path, old, new)) == expected


def test_removed_service(tmp_path: Path) -> None:
    """A service file that disappears is one narrowing that says how many rules it had."""
    before = load_policy(write(tmp_path / "old", BASE))
    after = load_policy(write(tmp_path / "new", {name: BASE[name] for name in ("_global.yaml", "pay.yaml")}))
    report = diff_policies(before, after)
    assert lines(tmp_path, report) == ["shop: narrows: service file removed (was old/shop.yaml, 1 rule)"]
    assert not report.widens


def _policy(services: dict[str, tuple[Mode, tuple[Rule, ...]]], allow: tuple[Rule, ...] = (),
            deny: tuple[Rule, ...] = ()) -> Policy:
    compiled = [ServicePolicy(name, mode, RuleSet(rules), f"{name}.yaml") for name, (mode, rules) in services.items()]
    return Policy(services=MappingProxyType({s.name: s for s in compiled}), global_allow=RuleSet(allow),
                  global_deny=RuleSet(deny), allow_cidrs=(), version="test", files=(),
                  identities=IdentityIndex(compiled))


def test_mid_name_wildcard_over_exact_names() -> None:
    """A whole-label wildcard inside a name (ec2.*.amazonaws.com) widens over the exact names it covers."""
    exact = Rule("svc.yaml:5", host="ec2.us-east-1.amazonaws.com")
    other = Rule("svc.yaml:6", host="s3.us-east-1.amazonaws.com")
    wide = Rule("svc.yaml:7", host="ec2.*.amazonaws.com")
    report = diff_policies(_policy({"svc": (Mode.ENFORCE, (exact, other))}),
                           _policy({"svc": (Mode.ENFORCE, (exact, other, wide))}))
    assert lines(Path("/"), report) == [
        "svc: widens: new wildcard ec2.*.amazonaws.com port 443 (svc.yaml:7) covers existing "
        "ec2.us-east-1.amazonaws.com (svc.yaml:5)"]


# Soundness against decide(): whatever two policies are, a destination that one allows and the other does not is
# reported as a widening or a narrowing of that service (or of every service, in the global section).

PATTERNS = ("a.example.com", "b.example.com", "a.b.example.com", "*.example.com", "**.example.com",
            "*.b.example.com", "**.b.example.com", "*.*.example.com")
NAMES = ("a.example.com", "b.example.com", "c.example.com", "a.b.example.com", "c.b.example.com",
         "a.c.example.com", "x.a.b.example.com")
SERVICES = ("s1", "s2")
_rule = st.builds(lambda pattern, ports: Rule("f.yaml:1", host=pattern, ports=frozenset(ports)),
                  st.sampled_from(PATTERNS), st.sets(st.sampled_from((443, 8443)), min_size=1))
_deny = st.builds(lambda pattern: Rule("g.yaml:1", host=pattern, ports=None), st.sampled_from(PATTERNS))
_services = st.dictionaries(st.sampled_from(SERVICES),
                            st.tuples(st.sampled_from(tuple(Mode)), st.lists(_rule, max_size=3).map(tuple)))
_policies = st.builds(_policy, _services, st.lists(_rule, max_size=2).map(tuple),
                      st.lists(_deny, max_size=2).map(tuple))


def _explained(report: PolicyDiff, name: str, effect: Effect, dest: Destination) -> bool:
    """Whether a change of ``effect`` to service ``name`` (or global) is about ``dest``: its rule matches ``dest``
    on one of the ports it opens or closes, or it is not about one rule (mode, file, identity)."""
    for section in report.sections:
        for change in section.changes:
            if section.name not in (name, GLOBAL) or change.effect is not effect:
                continue
            if change.rule is None:
                return True
            if RuleSet([change.rule]).match_host(dest.host) and (None in change.ports or dest.port in change.ports):
                return True
    return False


@settings(max_examples=400, deadline=None)
@given(_policies, _policies)
def test_every_change_of_reach_is_reported(old: Policy, new: Policy) -> None:
    """A destination that decide() allows on one side only has a widening or narrowing whose rule matches it."""
    report = diff_policies(old, new)
    for name in SERVICES:
        for host in NAMES:
            for port in (443, 8443):
                dest = Destination(host=host, port=port)
                was, now = decide(old, name, dest).allowed, decide(new, name, dest).allowed
                if was != now:
                    effect = Effect.WIDENS if now else Effect.NARROWS
                    assert _explained(report, name, effect, dest), (name, dest, lines(Path("/"), report))


_ref = st.text(st.sampled_from("abcxyz/_-~^0123456789"), max_size=12)


@given(_ref, _ref)
def test_two_dot_range_splits_into_its_sides(old: str, new: str) -> None:
    """A..B names A and B, an empty side naming HEAD, as git diff reads it."""
    assert split_range(f"{old}..{new}") == (old or "HEAD", new or "HEAD", "")


def test_a_policy_against_itself_is_no_change(tmp_path: Path) -> None:
    """The shipped allowlists diffed against themselves report nothing."""
    policy = load_policy(Path(__file__).resolve().parents[1] / "allowlists")
    assert diff_policies(policy, policy).sections == ()


def test_cidr_rules_of_two_families_never_cover_each_other() -> None:
    """An IPv6 range added next to an IPv4 one is judged on its own (no IPv4 rule covers it)."""
    v4 = Rule("svc.yaml:5", cidr=ipaddress.ip_network("0.0.0.0/1"))
    v6 = Rule("svc.yaml:6", cidr=ipaddress.ip_network("2001:db8::/32"))
    report = diff_policies(_policy({"svc": (Mode.ENFORCE, (v4,))}), _policy({"svc": (Mode.ENFORCE, (v4, v6))}))
    assert lines(Path("/"), report) == ["svc: widens: added 2001:db8::/32 port 443 (svc.yaml:6)"]


# The command: directories, git revisions, output formats, exit codes.

RICH_OLD = {"pay.yaml": service("pay", '{host: "*.stripe.com"}', "{host: hooks.slack.com}", '{host: "**.sentry.io"}',
                                identities=(ACCOUNT,))}
RICH_NEW = {
    "_global.yaml": global_file(allow=("{host: oauth2.googleapis.com}", "{host: hooks.slack.com}"), deny=()),
    "pay.yaml": service("pay", '{host: "**.stripe.com"}', '{host: "*.sentry.io"}', mode="audit",
                        identities=(ACCOUNT, REFUNDS)),
    "cart.yaml": service("cart", "{host: api.example.com, ports: [443, 8443]}"),
}


def egressd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egressd", "diff", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60, env={**os.environ, **GIT_ENV})


RICH_TEXT = """\
egressd diff old -> new: 7 widenings, 1 narrowing, 1 with the same reach

WIDENINGS:
  global, affects every service (new/_global.yaml):
    allow added hooks.slack.com port 443 (new/_global.yaml:5)
    deny removed **.pastebin.com (was old/_global.yaml:6)
  cart (new/cart.yaml):
    new service file new/cart.yaml, mode enforce
    added api.example.com ports 443, 8443 (new/cart.yaml:5)
  pay (new/pay.yaml, in audit mode):
    mode enforce -> audit (new/pay.yaml): audit lets every destination through except global denies
    widened *.stripe.com (was old/pay.yaml:5) to **.stripe.com port 443 (new/pay.yaml:5)
    identity added payments/refunds (new/pay.yaml:9)

NARROWINGS:
  pay (new/pay.yaml, in audit mode):
    narrowed **.sentry.io port 443 (was old/pay.yaml:7) to *.sentry.io (new/pay.yaml:6)

SAME REACH:
  pay (new/pay.yaml, in audit mode):
    removed hooks.slack.com port 443 (was old/pay.yaml:6); still allowed by hooks.slack.com (new/_global.yaml:5)

7 changes widen what a service may reach.
"""

RICH_MARKDOWN = """\
<!-- egressd diff -->
### ⚠️ Allowlist changes: 7 widenings, 1 narrowing, 1 with the same reach

`old` → `new`

#### ⚠️ Widenings

**global, affects every service (`new/_global.yaml`)**

- ⚠️ widens: allow added `hooks.slack.com` port 443 (`new/_global.yaml:5`)
- ⚠️ widens: deny removed `**.pastebin.com` (was `old/_global.yaml:6`)

**cart (`new/cart.yaml`)**

- ⚠️ widens: new service file `new/cart.yaml`, mode enforce
- ⚠️ widens: added `api.example.com` ports 443, 8443 (`new/cart.yaml:5`)

**pay (`new/pay.yaml`, in audit mode)**

- ⚠️ widens: mode enforce -> audit (`new/pay.yaml`): audit lets every destination through except global denies
- ⚠️ widens: widened `*.stripe.com` (was `old/pay.yaml:5`) to `**.stripe.com` port 443 (`new/pay.yaml:5`)
- ⚠️ widens: identity added `payments/refunds` (`new/pay.yaml:9`)

#### Narrowings

**pay (`new/pay.yaml`, in audit mode)**

- narrows: narrowed `**.sentry.io` port 443 (was `old/pay.yaml:7`) to `*.sentry.io` (`new/pay.yaml:6`)

#### Same reach

**pay (`new/pay.yaml`, in audit mode)**

- same reach: removed `hooks.slack.com` port 443 (was `old/pay.yaml:6`); still allowed by `hooks.slack.com` \
(`new/_global.yaml:5`)

7 changes widen what a service may reach.
"""


@pytest.mark.parametrize(("fmt", "expected"), [("text", RICH_TEXT), ("markdown", RICH_MARKDOWN)], ids=["text", "md"])
def test_rich_change_between_directories(tmp_path: Path, fmt: str, expected: str) -> None:
    """Between two directories the report lists widenings first, per service, and exits 3 because something widens."""
    write(tmp_path / "old", {**BASE, **RICH_OLD})
    write(tmp_path / "new", {**BASE, **RICH_NEW})
    out = egressd("old", "new", "--format", fmt, cwd=tmp_path)
    assert (out.stdout, out.stderr, out.returncode) == (expected, "", 3)


@pytest.mark.parametrize(
    ("new", "code", "last"),
    [
        ({}, 0, "Nothing changed: every service reaches exactly what it did."),
        ({"pay.yaml": service("pay")}, 0, "Nothing widened: no service reaches anything it could not reach before."),
        ({"pay.yaml": service("pay", "{host: api.stripe.com}", "{host: a.stripe.com}")}, 3,
         "1 change widens what a service may reach."),
    ],
    ids=["nothing changed", "narrowing only", "one widening"],
)
def test_exit_code_and_last_line(tmp_path: Path, new: dict[str, str], code: int, last: str) -> None:
    """Exit 0 when nothing widens (said on the last line), 3 when something does."""
    write(tmp_path / "old", BASE)
    write(tmp_path / "new", {**BASE, **new})
    out = egressd("old", "new", cwd=tmp_path)
    assert (out.returncode, out.stdout.splitlines()[-1], out.stderr) == (code, last, "")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **GIT_ENV}, check=True)
    return done.stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str, directory: str = "allowlists") -> str:
    """Replace ``directory`` by ``files``, commit, return the short commit (12 digits)."""
    target = repo / directory
    for old in target.glob("*") if target.exists() else ():
        old.unlink()
    write(target, files)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "--short=12", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository whose main has one commit of the base allowlists."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, {**BASE, "README.md": "# allowlists\n"}, "base")
    return repo


def test_diff_between_two_commits_reads_git_not_the_work_tree(repo: Path) -> None:
    """egressd diff HEAD~1 HEAD reads both revisions with git, names files as in the repository, touches nothing."""
    first = git(repo, "rev-parse", "--short=12", "HEAD")
    second = commit(repo, {**BASE, "pay.yaml": service("pay", "{host: api.stripe.com}", "{host: a.stripe.com}")}, "a")
    (repo / "allowlists" / "shop.yaml").write_text("not: an allowlist\n")  # an uncommitted edit, left alone
    out = egressd("HEAD~1", "HEAD", cwd=repo)
    assert (out.stdout, out.stderr, out.returncode) == (
        f"egressd diff HEAD~1 ({first}) -> HEAD ({second}): 1 widening, 0 narrowings, 0 with the same reach\n\n"
        "WIDENINGS:\n  pay (allowlists/pay.yaml):\n    added a.stripe.com port 443 (allowlists/pay.yaml:6)\n\n"
        "1 change widens what a service may reach.\n", "", 3)
    assert git(repo, "status", "--porcelain") == "M allowlists/shop.yaml"
    assert git(repo, "rev-parse", "--short=12", "HEAD") == second


def _branches(repo: Path) -> tuple[str, str, str]:
    """main: base, then a narrowing; feature (from base): a widening. The short commits of base, main, feature."""
    base = git(repo, "rev-parse", "--short=12", "HEAD")
    git(repo, "checkout", "-q", "-b", "feature")
    feature = commit(repo, {**BASE, "shop.yaml": service("shop", "{host: api.paypal.com}", "{host: x.paypal.com}")},
                     "feature: widen")
    git(repo, "checkout", "-q", "main")
    main = commit(repo, {**BASE, "pay.yaml": service("pay", "{host: api.stripe.com, ports: [443, 8443]}")}, "main")
    return base, main, feature


SHOP_WIDENS = "WIDENINGS:\n  shop (allowlists/shop.yaml):\n    added x.paypal.com port 443 (allowlists/shop.yaml:6)\n\n"
MAIN_VS_FEATURE = (
    "egressd diff main ({main}) -> feature ({feature}): 1 widening, 1 narrowing, 0 with the same reach\n\n"
    f"{SHOP_WIDENS}NARROWINGS:\n  pay (allowlists/pay.yaml):\n"
    "    ports removed on api.stripe.com: 8443 (was allowlists/pay.yaml:5)\n\n"
    "1 change widens what a service may reach.\n"
)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("main", "feature"), MAIN_VS_FEATURE),
        (("main..feature",), MAIN_VS_FEATURE),
        (("main...feature",), "egressd diff the merge base of main and feature ({base}) -> feature ({feature}): "
         f"1 widening, 0 narrowings, 0 with the same reach\n\n{SHOP_WIDENS}"
         "1 change widens what a service may reach.\n"),
    ],
    ids=["two branches", "A..B", "A...B from the merge base"],
)
def test_diff_between_branches(repo: Path, args: tuple[str, ...], expected: str) -> None:
    """Branch names and A..B compare the two tips (as git diff); A...B compares B with its merge base with A."""
    base, main, feature = _branches(repo)
    out = egressd(*args, cwd=repo)
    assert (out.stdout, out.stderr, out.returncode) == (expected.format(base=base, main=main, feature=feature), "", 3)


def test_diff_reads_another_directory_and_rev_colon_path(repo: Path) -> None:
    """--allowlists-dir and REV:PATH read the allowlists from another directory of each revision."""
    old = commit(repo, BASE, "move", directory="deploy/lists")
    new = commit(repo, {**BASE, "pay.yaml": service("pay")}, "narrow", directory="deploy/lists")
    expected = ("egressd diff {old} -> {new}: 0 widenings, 1 narrowing, 0 with the same reach\n\nNARROWINGS:\n"
                "  pay (deploy/lists/pay.yaml):\n    removed api.stripe.com port 443 (was deploy/lists/pay.yaml:5)\n\n"
                "Nothing widened: no service reaches anything it could not reach before.\n")
    out = egressd("HEAD~1", "HEAD", "--allowlists-dir", "deploy/lists/", cwd=repo)
    assert (out.stdout, out.returncode) == (expected.format(old=f"HEAD~1 ({old})", new=f"HEAD ({new})"), 0)
    out = egressd("HEAD~1:deploy/lists", "HEAD:deploy/lists", cwd=repo)
    labels = {"old": f"HEAD~1:deploy/lists ({old})", "new": f"HEAD:deploy/lists ({new})"}
    assert (out.stdout, out.returncode) == (expected.format(**labels), 0)


def test_diff_between_a_revision_and_the_work_tree(repo: Path) -> None:
    """A revision against a directory compares what is committed with what is on disk."""
    head = git(repo, "rev-parse", "--short=12", "HEAD")
    (repo / "allowlists" / "pay.yaml").write_text(service("pay", "{host: api.stripe.com}", mode="audit"))
    out = egressd("HEAD", "allowlists", cwd=repo)
    assert out.stdout.splitlines()[:5] == [
        f"egressd diff HEAD ({head}) -> allowlists: 1 widening, 0 narrowings, 0 with the same reach", "",
        "WIDENINGS:", "  pay (allowlists/pay.yaml, in audit mode):",
        "    mode enforce -> audit (allowlists/pay.yaml): audit lets every destination through except global denies"]
    assert out.returncode == 3


def _broken(repo: Path) -> str:
    commit(repo, {**BASE, "pay.yaml": "version: v1\nservice: pay\nallow: [{host: '*.com'}]\n"}, "broken")
    return git(repo, "rev-parse", "--short=12", "HEAD")


def _symlink(repo: Path) -> str:
    (repo / "allowlists" / "link.yaml").symlink_to("pay.yaml")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "link")
    return ""


def _main_directory(repo: Path) -> str:
    (repo / "main").mkdir()
    return ""


ERRORS = {
    "neither a directory nor a revision": (
        ("nope", "HEAD"), None,
        '"nope" is neither a directory nor a git revision (git: Needed a single revision); pass an allowlists '
        "directory or a revision such as origin/main or HEAD~1"),
    "a revision without the directory": (
        ("HEAD:deploy", "HEAD"), None,
        "HEAD:deploy has no directory deploy/ (git: path 'deploy' does not exist in '{head}'); pass --allowlists-dir "
        "with the directory that holds the allowlists, or REV:PATH"),
    "only OLD": (("HEAD",), None, 'only OLD was given ("HEAD"); give NEW too, or a range such as origin/main...HEAD'),
    "allowlists that do not load": (
        ("HEAD", "HEAD~1"), _broken,
        "the allowlists of HEAD ({short}) do not load (1 error(s)); fix them first:\nallowlists/pay.yaml:3: host "
        '"*.com": wildcard directly over public suffix "com" would match every site registered under it; name a '
        'registrable domain, e.g. "*.example.com"'),
    "a symbolic link": (
        ("HEAD~1", "HEAD"), _symlink,
        "HEAD: allowlists/link.yaml is a symbolic link; an allowlist must be a regular file, so replace the link by "
        "the file itself"),
    "both a directory and a revision": (
        ("main", "HEAD"), _main_directory,
        '"main" is both a directory and a git revision; write ./main for the directory or main^{{commit}} for the '
        "revision"),
}


@pytest.mark.parametrize(("args", "setup", "message"), list(ERRORS.values()), ids=list(ERRORS))
def test_errors_exit_1(repo: Path, args: tuple[str, ...], setup, message: str) -> None:  # noqa: ANN001
    """A name that is no directory or revision, or allowlists that do not load, exit 1 with what to fix."""
    head = git(repo, "rev-parse", "HEAD")
    short = setup(repo) if setup is not None else ""
    out = egressd(*args, cwd=repo)
    expected = "egressd diff: " + message.format(head=head, short=short) + "\n"
    assert (out.stdout, out.stderr, out.returncode) == ("", expected, 1)


def test_outside_a_repository(tmp_path: Path) -> None:
    """Outside a git repository a revision name fails with git's reason and exit 1."""
    out = egressd("main", "feature", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr == (
        'egressd diff: "main" is neither a directory nor a git revision (git: not a git repository (or any of the '
        "parent directories): .git); pass an allowlists directory or a revision such as origin/main or HEAD~1\n")
