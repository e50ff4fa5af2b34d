"""Policy tests: the expectation files, `egressd test` as a process, and the shipped allowlists/tests/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.hostport import parse_authority
from egressd.policy import Reason, Verdict, load_policy
from egressd.policy.policytest import Expectation, load_expectations, parse_file, run

ROOT = Path(__file__).resolve().parents[1]
SERVICES = frozenset({"payments-api", "checkout-web"})
_EXAMPLE = "e.g. - {service: payments-api, destination: api.stripe.com:443, expect: allow}"
_HOSTPORT = 'a destination is host:port, e.g. api.example.com:443 or "[2001:db8::1]:443"'
_OK = "- {service: payments-api, destination: a.example.com:443, expect: allow}\n"


def egressd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "proxy")},
    )


# --- expectation files: one error per case, exactly as printed ---------------------------------------------------

ERRORS = [
    pytest.param("- {service: payments-api, destination: a.example.com:443, expect: allow, because: x}\n",
                 ['t.yaml:1: unknown key "because" in an expectation; allowed keys are: service, destination, '
                  "expect, reason"], id="unknown-key"),
    pytest.param("- {service: payments-api, destination: a.example.com:443, expect: deny, mode: enforce}\n",
                 ["t.yaml:1: mode: is not an expectation key: the service file's mode applies, and expect: is "
                  "judged on what enforce mode would do; remove mode:"], id="mode-key"),
    pytest.param("- {}\n", [
        "t.yaml:1: an expectation needs service:; add it, e.g. `service: payments-api`",
        "t.yaml:1: an expectation needs destination:; add it, e.g. `destination: api.stripe.com:443`",
        "t.yaml:1: an expectation needs expect:; add it, e.g. `expect: allow`",
    ], id="missing-keys"),
    pytest.param("- service: payments-api\n  service: payments-api\n  destination: a.example.com:443\n"
                 "  expect: allow\n",
                 ['t.yaml:2: duplicate key "service" (first on line 1); keep one of them'], id="duplicate-key"),
    pytest.param("- {service: billing, destination: a.example.com:443, expect: allow}\n",
                 ['t.yaml:1: service "billing" has no allowlist file; write one of: checkout-web, payments-api '
                  "(or add billing.yaml)"], id="unknown-service"),
    pytest.param("- {service: [payments-api], destination: a.example.com:443, expect: allow}\n",
                 ["t.yaml:1: service must be a single value, not a list or mapping"], id="service-list"),
    pytest.param("- {service: , destination: a.example.com:443, expect: allow}\n",
                 ["t.yaml:1: service is empty; give it a value"], id="service-empty"),
    pytest.param("- {service: payments-api, destination: a.example.com, expect: allow}\n",
                 [f"t.yaml:1: invalid destination: 'a.example.com': a port is required (host:port); {_HOSTPORT}"],
                 id="no-port"),
    pytest.param("- {service: payments-api, destination: a.example.com:0443, expect: allow}\n",
                 ["t.yaml:1: invalid destination: 'a.example.com:0443': port '0443' is not a decimal number "
                  f"1-65535 (no leading zeros); {_HOSTPORT}"], id="bad-port"),
    pytest.param("- {service: payments-api, destination: 0x7f.1:443, expect: allow}\n",
                 ["t.yaml:1: invalid destination: '0x7f.1' looks like an IP address in a non-canonical form; write "
                  f"IPv4 as four decimal parts (1.2.3.4); {_HOSTPORT}"], id="odd-ip"),
    pytest.param("- {service: payments-api, destination: '*.example.com:443', expect: allow}\n",
                 ['t.yaml:1: destination "*.example.com:443" is a pattern; a policy test names one destination, '
                  "e.g. a.example.com:443 (write one expectation per name to check)"], id="pattern-destination"),
    pytest.param("- {service: payments-api, destination: a.example.com:443, expect: yes}\n",
                 ['t.yaml:1: expect "yes" is not valid; write expect: allow or expect: deny'], id="expect-yes"),
    pytest.param("- {service: payments-api, destination: a.example.com:443, expect: deny, reason: sni_mismatch}\n",
                 ['t.yaml:1: reason "sni_mismatch" is not one the policy decides; write one of: allowed, '
                  "denylisted, not_allowlisted, port_not_allowed"], id="reason-not-policy"),
    pytest.param("- {service: payments-api, destination: a.example.com:443, expect: allow, reason: denylisted}\n",
                 ["t.yaml:1: expect: allow with reason: denylisted can never hold (with expect: allow the reason is "
                  "one of: allowed); change expect: or reason:"], id="allow-with-deny-reason"),
    pytest.param("- {service: payments-api, destination: a.example.com:443, expect: deny, reason: allowed}\n",
                 ["t.yaml:1: expect: deny with reason: allowed can never hold (with expect: deny the reason is one "
                  "of: denylisted, not_allowlisted, port_not_allowed); change expect: or reason:"],
                 id="deny-with-allowed"),
    pytest.param("- a.example.com:443\n",
                 ["t.yaml:1: an expectation must be a mapping with keys from: service, destination, expect, reason"],
                 id="item-not-mapping"),
    pytest.param("service: payments-api\n",
                 [f"t.yaml:1: a policy test file is a list of expectations, one per '- ' entry, {_EXAMPLE}"],
                 id="not-a-list"),
    pytest.param("# nothing yet\n", [f"t.yaml:1: file is empty; list expectations, {_EXAMPLE}"], id="empty"),
    pytest.param("[]\n", ["t.yaml:1: the file lists no expectations; add at least one, or delete the file"],
                 id="empty-list"),
    pytest.param("- &a {service: payments-api, destination: a.example.com:443, expect: allow}\n- *a\n",
                 ["t.yaml:2: YAML syntax error: found an alias, and aliases are not allowed; fix the YAML (write the "
                  "value out in full where it applies)"], id="alias"),
    pytest.param(_OK + _OK.replace("a.example", "b.example") + "- {service: payments-api, expect: allow}\n",
                 ["t.yaml:3: an expectation needs destination:; add it, e.g. `destination: api.stripe.com:443`"],
                 id="third-item-line"),
]


@pytest.mark.parametrize(("text", "errors"), ERRORS)
def test_expectation_file_errors(tmp_path, text, errors):
    """Each malformed expectation file fails with every error as file:line, exactly, and yields no expectation."""
    (tmp_path / "t.yaml").write_text(text)
    expectations, found = load_expectations(tmp_path, SERVICES)
    assert expectations == ()
    assert [str(error).replace(f"{tmp_path}/", "") for error in found] == errors


@pytest.mark.parametrize(("files", "errors"), [
    pytest.param({}, ["DIR: no policy tests (*.yaml) found; add a file listing expectations, " + _EXAMPLE],
                 id="no-files"),
    pytest.param({"README.md": "notes", "sub/x.yaml": "junk: ["},
                 ["DIR: no policy tests (*.yaml) found; add a file listing expectations, " + _EXAMPLE],
                 id="only-readme-and-subdirectory"),
    pytest.param({"a.yml": _OK, "b.yaml": _OK}, ["DIR/a.yml: .yml files are not read; rename it to a.yaml"],
                 id="yml"),
    pytest.param({"b.yaml": "- {service: x}\n", "a.yaml": b"- \xff\n"}, [
        "DIR/a.yaml:1: is not UTF-8 text; save the file as UTF-8",
        "DIR/b.yaml:1: an expectation needs destination:; add it, e.g. `destination: api.stripe.com:443`",
        "DIR/b.yaml:1: an expectation needs expect:; add it, e.g. `expect: allow`",
        'DIR/b.yaml:1: service "x" has no allowlist file; write one of: checkout-web, payments-api (or add x.yaml)',
    ], id="every-file-sorted"),
])
def test_directory_errors(tmp_path, files, errors):
    """Directory-level problems are reported, and every error of every file comes at once, in file order."""
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content)
    expectations, found = load_expectations(tmp_path, SERVICES)
    assert expectations == ()
    assert [str(error).replace(str(tmp_path), "DIR") for error in found] == errors


def test_missing_directory(tmp_path):
    """A tests directory that does not exist is an error naming it and the fix."""
    assert [str(error) for error in load_expectations(tmp_path / "tests", SERVICES)[1]] == [
        f"{tmp_path}/tests: cannot read the policy tests directory (No such file or directory); "
        "add expectation files there, or pass --tests DIR"
    ]


def test_expectations_parse_with_their_lines(tmp_path):
    """A valid file gives one Expectation per entry, with its line, canonical destination and optional reason."""
    (tmp_path / "t.yaml").write_text(
        "# header\n- service: payments-api\n  destination: API.Example.COM.:8443\n  expect: deny\n"
        '  reason: port_not_allowed\n- {service: checkout-web, destination: "[2001:DB8::1]:443", expect: allow}\n'
    )
    expectations, errors = load_expectations(tmp_path, SERVICES)
    assert errors == ()
    assert expectations == (
        Expectation(f"{tmp_path}/t.yaml", 2, "payments-api", parse_authority("api.example.com:8443"),
                    Verdict.DENY, Reason.PORT_NOT_ALLOWED),
        Expectation(f"{tmp_path}/t.yaml", 6, "checkout-web", parse_authority("[2001:db8::1]:443"), Verdict.ALLOW),
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("- :{}[],#&*!|>'\"\n\tabsvcdeinowlxp.0123456789")), max_size=120))
def test_parser_never_raises(text):
    """Any text gives either expectations or errors with a line inside the file, never an exception."""
    expectations, errors = parse_file("t.yaml", text.encode(), SERVICES)
    assert not (expectations and errors)
    assert all(1 <= (error.line or 1) <= text.count("\n") + 2 for error in errors)


_label = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
_host = st.one_of(
    st.lists(_label, min_size=2, max_size=4).map(".".join),
    st.tuples(*[st.integers(1, 254)] * 4).map(lambda parts: ".".join(map(str, parts))),
)
_entry = st.tuples(
    st.sampled_from(sorted(SERVICES)), _host, st.integers(1, 65535),
    st.sampled_from([(Verdict.ALLOW, None), (Verdict.ALLOW, Reason.ALLOWED), (Verdict.DENY, None),
                     (Verdict.DENY, Reason.DENYLISTED), (Verdict.DENY, Reason.NOT_ALLOWLISTED),
                     (Verdict.DENY, Reason.PORT_NOT_ALLOWED)]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_entry, min_size=1, max_size=6))
def test_generated_files_round_trip(entries):
    """Expectations written as YAML read back as the same values, each with the line its entry starts on."""
    lines, expected = [], []
    for service, host, port, (verdict, reason) in entries:
        line = len(lines) + 1
        lines += [f"- service: {service}", f"  destination: {host}:{port}", f"  expect: {verdict.value}"]
        lines += [f"  reason: {reason.value}"] if reason else []
        expected.append(Expectation("t.yaml", line, service, parse_authority(f"{host}:{port}"), verdict, reason))
    assert parse_file("t.yaml", "\n".join(lines).encode(), SERVICES) == (tuple(expected), ())


# --- egressd test, as a process -------------------------------------------------------------------------------------

GLOBAL = "version: v1\nglobal: true\ndeny:\n  - host: pastebin.com\n"
SHOP = (
    "version: v1\nservice: shop\nallow:\n  - host: api.example.com\n  - host: '*.cdn.example.com'\n"
    "    ports: [8443]\n"
)
DRAFT = "version: v1\nservice: draft\nmode: audit\nallow:\n  - host: a.example.com\n"
PASSING = """\
- {service: shop, destination: api.example.com:443, expect: allow}
- {service: shop, destination: x.cdn.example.com:8443, expect: allow, reason: allowed}
- {service: shop, destination: api.example.com:80, expect: deny, reason: port_not_allowed}
- {service: draft, destination: b.example.com:443, expect: deny, reason: not_allowlisted}
- {service: draft, destination: pastebin.com:443, expect: deny, reason: denylisted}
"""
FAILING = """\
- {service: shop, destination: pastebin.com:443, expect: allow}
- {service: shop, destination: api.example.com:8443, expect: allow}
- {service: draft, destination: b.example.com:443, expect: allow}
- {service: shop, destination: api.example.com:443, expect: deny}
- {service: shop, destination: api.example.com:80, expect: deny, reason: not_allowlisted}
- {service: shop, destination: cdn.example.com:8443, expect: deny}
"""


def make_allowlists(root: Path, tests: dict[str, str]) -> None:
    (root / "allowlists" / "tests").mkdir(parents=True)
    for name, text in {"_global.yaml": GLOBAL, "shop.yaml": SHOP, "draft.yaml": DRAFT}.items():
        (root / "allowlists" / name).write_text(text)
    for name, text in tests.items():
        (root / "allowlists" / "tests" / name).write_text(text)


def test_cli_passing_run(tmp_path):
    """When every expectation holds, egressd test prints only the summary and exits 0."""
    make_allowlists(tmp_path, {"shop.yaml": PASSING})
    out = egressd("test", "allowlists/", cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "5 passed, 0 failed\n", "")


def test_cli_verbose_lists_passing_expectations(tmp_path):
    """-v lists every expectation with its decision, the deciding rule and audit mode's would-deny."""
    make_allowlists(tmp_path, {"shop.yaml": PASSING})
    out = egressd("test", "-v", "allowlists", cwd=tmp_path)
    assert out.returncode == 0
    t = "allowlists/tests/shop.yaml"
    assert out.stdout == (
        f"{t}:1: service shop to api.example.com:443: allow (allowed) by rule allowlists/shop.yaml:4, as expected\n"
        f"{t}:2: service shop to x.cdn.example.com:8443: allow (allowed) by rule allowlists/shop.yaml:5, as expected\n"
        f"{t}:3: service shop to api.example.com:80: deny (port_not_allowed) by rule allowlists/shop.yaml:4, "
        "as expected\n"
        f"{t}:4: service draft to b.example.com:443: deny (not_allowlisted) with no matching rule "
        "(audit mode: would deny), as expected\n"
        f"{t}:5: service draft to pastebin.com:443: deny (denylisted) by rule allowlists/_global.yaml:4, as expected\n"
        "5 passed, 0 failed\n"
    )


def test_cli_failing_run(tmp_path):
    """Each failing expectation prints file:line, what was expected and decided, why and by which rule; exit 1."""
    make_allowlists(tmp_path, {"a.yaml": FAILING, "b.yaml": PASSING})
    out = egressd("test", "allowlists", cwd=tmp_path)
    t = "allowlists/tests/a.yaml"
    assert (out.returncode, out.stderr) == (1, "")
    assert out.stdout == (
        f"{t}:1: service shop to pastebin.com:443: expected allow, decided deny (denylisted) "
        "by rule allowlists/_global.yaml:4\n"
        f"{t}:2: service shop to api.example.com:8443: expected allow, decided deny (port_not_allowed) "
        "by rule allowlists/shop.yaml:4\n"
        f"{t}:3: service draft to b.example.com:443: expected allow, decided deny (not_allowlisted) "
        "with no matching rule (audit mode: would deny)\n"
        f"{t}:4: service shop to api.example.com:443: expected deny, decided allow (allowed) "
        "by rule allowlists/shop.yaml:4\n"
        f"{t}:5: service shop to api.example.com:80: expected deny (not_allowlisted), decided deny "
        "(port_not_allowed) by rule allowlists/shop.yaml:4\n"
        "6 passed, 5 failed\n"
    )


def test_cli_tests_option(tmp_path):
    """--tests DIR reads the expectations from another directory."""
    make_allowlists(tmp_path, {"shop.yaml": FAILING})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shop.yaml").write_text(PASSING)
    out = egressd("test", "allowlists", "--tests", "other", cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, "5 passed, 0 failed\n")


@pytest.mark.parametrize(("args", "tests", "stderr"), [
    pytest.param(["missing"], {"t.yaml": PASSING},
                 "missing: the allowlists do not load (1 error(s)):\nmissing: cannot read the allowlist directory "
                 "(No such file or directory); pass the directory that holds the *.yaml files\n", id="no-allowlists"),
    pytest.param(["allowlists"], {"t.yaml": "- {service: shop, destination: x:443, expect: maybe}\n"},
                 "allowlists/tests: the policy tests do not load (1 error(s)):\nallowlists/tests/t.yaml:1: "
                 'expect "maybe" is not valid; write expect: allow or expect: deny\n', id="bad-expectation"),
    pytest.param(["allowlists", "--tests", "none"], {"t.yaml": PASSING},
                 "none: the policy tests do not load (1 error(s)):\nnone: cannot read the policy tests directory "
                 "(No such file or directory); add expectation files there, or pass --tests DIR\n", id="no-tests"),
])
def test_cli_load_errors_exit_1(tmp_path, args, tests, stderr):
    """Allowlists or expectation files that do not load: every error on stderr, nothing run, exit 1."""
    make_allowlists(tmp_path, tests)
    out = egressd("test", *args, cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (1, "", stderr)


def test_cli_broken_allowlists_exit_1(tmp_path):
    """An allowlist that does not load fails the run with its file:line, before any expectation is judged."""
    make_allowlists(tmp_path, {"t.yaml": PASSING})
    (tmp_path / "allowlists" / "shop.yaml").write_text(SHOP + "  - host: '*.com'\n")
    out = egressd("test", "allowlists", cwd=tmp_path)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        "allowlists: the allowlists do not load (1 error(s)):\nallowlists/shop.yaml:7: host \"*.com\": wildcard "
        'directly over public suffix "com" would match every site registered under it; name a registrable domain, '
        'e.g. "*.example.com"\n'
    )


def test_cli_bad_usage_exit_2():
    """An unknown option is bad usage: exit 2."""
    out = egressd("test", "--no-such-option")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-option" in out.stderr


# --- the shipped allowlists/tests/ ----------------------------------------------------------------------------------

def shipped():
    policy = load_policy("allowlists")
    expectations, errors = load_expectations("allowlists/tests", policy.services)
    assert errors == ()
    return policy, run(policy, expectations)


def test_shipped_policy_tests_hold():
    """egressd test allowlists/ passes on the repository's own allowlists and tests."""
    out = egressd("test", "allowlists/")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.fullmatch(r"[1-9][0-9]* passed, 0 failed\n", out.stdout)


def test_loader_ignores_the_tests_directory(monkeypatch):
    """allowlists/tests/ never becomes policy: the loader reads no file under it."""
    monkeypatch.chdir(ROOT)
    policy = load_policy("allowlists")
    assert policy.files and not [file for file in policy.files if "/tests/" in file]


def test_every_global_deny_rule_is_tested(monkeypatch):
    """Each deny rule of _global.yaml decides at least one shipped expectation that asks for denylisted."""
    monkeypatch.chdir(ROOT)
    policy, outcomes = shipped()
    hit = {o.decision.rule for o in outcomes if o.passed and o.expectation.reason is Reason.DENYLISTED}
    assert [rule.source for rule in policy.global_deny if rule not in hit] == []


def test_every_service_rule_is_tested(monkeypatch):
    """Every service's rules each allow a shipped expectation, and every service has port and name denials."""
    monkeypatch.chdir(ROOT)
    policy, outcomes = shipped()
    allowed_by = {o.decision.rule for o in outcomes if o.passed and o.expectation.expect is Verdict.ALLOW}
    untested = [rule.source for service in policy.services.values() for rule in service.allow if rule not in allowed_by]
    assert untested == []
    for name in policy.services:
        reasons = {o.expectation.reason for o in outcomes if o.passed and o.expectation.service == name}
        assert {Reason.NOT_ALLOWLISTED, Reason.PORT_NOT_ALLOWED, Reason.DENYLISTED} <= reasons, name


def test_every_wildcard_has_an_apex_denial(monkeypatch):
    """For each wildcard allow rule, a shipped expectation checks that the apex it hangs from is denied."""
    monkeypatch.chdir(ROOT)
    policy, outcomes = shipped()
    denied = {(o.expectation.service, o.expectation.destination.host) for o in outcomes
              if o.passed and o.expectation.expect is Verdict.DENY}
    wildcards = [(name, rule.host.split(".", 1)[1]) for name, service in policy.services.items()
                 for rule in service.allow if rule.host and rule.host.startswith("*")]
    assert wildcards and [pair for pair in wildcards if pair not in denied] == []


def tampered_copy(tmp_path: Path, file: str, old: str, new: str) -> int:
    """Copy allowlists/ into tmp_path with ``old`` replaced by ``new`` in ``file``; return the line changed."""
    shutil.copytree(ROOT / "allowlists", tmp_path / "allowlists")
    path = tmp_path / "allowlists" / file
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    return text[: text.index(old)].count("\n") + 1


def test_tampered_expectation_fails(tmp_path):
    """Turning a shipped expectation around makes egressd test fail on exactly that line."""
    old = "destination: api.stripe.com:443, expect: allow, reason: allowed}"
    line = tampered_copy(tmp_path, "tests/payments-api.yaml", old, "destination: api.stripe.com:443, expect: deny}")
    out = egressd("test", "allowlists", cwd=tmp_path)
    assert out.returncode == 1
    first, summary = out.stdout.splitlines()
    assert first == (
        f"allowlists/tests/payments-api.yaml:{line}: service payments-api to api.stripe.com:443: expected deny, "
        "decided allow (allowed) by rule allowlists/payments-api.yaml:9"
    )
    assert summary.endswith(" passed, 1 failed")


def test_widened_allowlist_fails_the_shipped_tests(tmp_path):
    """Widening payments-api to "*.stripe.com" makes the shipped sibling-name expectation fail."""
    rule = tampered_copy(tmp_path, "payments-api.yaml", "  - host: files.stripe.com ", '  - host: "*.stripe.com" ')
    tests = (tmp_path / "allowlists" / "tests" / "payments-api.yaml").read_text()
    line = tests[: tests.index("destination: dashboard.stripe.com:443")].count("\n") + 1
    out = egressd("test", "allowlists", cwd=tmp_path)
    assert (out.returncode, out.stdout.splitlines()[0]) == (1, (
        f"allowlists/tests/payments-api.yaml:{line}: service payments-api to dashboard.stripe.com:443: expected deny "
        f"(not_allowlisted), decided allow (allowed) by rule allowlists/payments-api.yaml:{rule}"
    ))
    assert out.stdout.splitlines()[1].endswith(" passed, 1 failed")


def test_shipped_files_are_plain_lists():
    """Every shipped expectation file is a YAML list of mappings using only the documented keys."""
    for path in sorted((ROOT / "allowlists" / "tests").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, list) and data, path
        assert all(set(item) <= {"service", "destination", "expect", "reason"} for item in data), path
