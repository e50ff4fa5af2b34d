"""The command line: validate, check, run's flags and environment, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import service_yaml
from egressd.cli import policy as policy_cli
from egressd.policy import load_policy
from harness import connect_tunnel

ROOT = Path(__file__).resolve().parents[1]


def egressd(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )


def test_validate_accepts_the_shipped_allowlists():
    """egressd validate exits 0 on the example allowlists."""
    out = egressd("validate", "allowlists")
    assert out.returncode == 0 and "ok" in out.stdout


def test_validate_lists_every_error_and_exits_1(tmp_path):
    """egressd validate names each broken file:line and exits 1."""
    (tmp_path / "a.yaml").write_text("version: v1\nservice: a\nallow:\n  - host: '*.com'\n")
    (tmp_path / "b.yaml").write_text("version: v2\nservice: b\n")
    out = egressd("validate", str(tmp_path))
    assert out.returncode == 1
    assert f"{tmp_path}/a.yaml:4:" in out.stderr and f"{tmp_path}/b.yaml:1:" in out.stderr


# --- validate: formats, --strict and exit codes ----------------------------------------------------------------

WARNED = "tests/allowlist_warnings/wide_cidr"  # two warnings, no error
_WIDE4 = (
    "cidr 10.20.0.0/16 is wider than /24 (65536 addresses); allow only the networks the service needs, each /24 "
    "or narrower"
)
_WIDE6 = "cidr 2001:db8::/32 is wider than /48; allow only the networks the service needs, each /48 or narrower"
_STAR_COM = (
    'host "*.com": wildcard directly over public suffix "com" would match every site registered under it; '
    'name a registrable domain, e.g. "*.example.com"'
)


_ALIAS = (
    "YAML syntax error: while scanning an alias, expected alphabetic or numeric character, but found '.'; fix the "
    'YAML (a value starting with "*" must be quoted: host: "*.example.com")'
)


def _broken(tmp_path: Path) -> Path:
    """A directory with three errors (one without a line, one from YAML) and a rule that would warn if it loaded."""
    (tmp_path / "cart.yaml").write_text("version: v1\nservice: cart\nallow:\n  - host: *.com\n")
    (tmp_path / "shop.yaml").write_text('version: v1\nservice: shop\nallow:\n  - host: "**.example.com"\n'
                                        '  -   host: "*.com"\n')
    (tmp_path / "notes.yml").write_text("")
    return tmp_path


def test_validate_text_lists_errors_with_columns_on_stderr(tmp_path):
    """Text: each error as file:line:column: error: message (no line or column when unknown), a summary, exit 1."""
    out = egressd("validate", str(_broken(tmp_path)))
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"{tmp_path}/cart.yaml:4:12: error: {_ALIAS}\n"
        f"{tmp_path}/notes.yml: error: .yml files are not read; rename it to notes.yaml\n"
        f"{tmp_path}/shop.yaml:5:13: error: {_STAR_COM}\n"
        f"{tmp_path}: 3 error(s); warnings are checked once every file loads\n"
    )


def test_validate_json_reports_errors_as_one_object(tmp_path):
    """JSON: one object on stdout with every error's file, line and column, no warnings, ok false, exit 1."""
    out = egressd("validate", "--format", "json", str(_broken(tmp_path)))
    assert (out.returncode, out.stderr, out.stdout.count("\n")) == (1, "", 1)
    assert json.loads(out.stdout) == {
        "path": str(tmp_path), "ok": False,
        "errors": [
            {"file": f"{tmp_path}/cart.yaml", "line": 4, "column": 12, "message": _ALIAS},
            {"file": f"{tmp_path}/notes.yml", "line": None, "column": None,
             "message": ".yml files are not read; rename it to notes.yaml"},
            {"file": f"{tmp_path}/shop.yaml", "line": 5, "column": 13, "message": _STAR_COM},
        ],
        "warnings": [], "services": None, "version": None,
    }


def test_validate_github_prints_only_error_annotations(tmp_path):
    """GitHub: one ::error annotation per error (file only when there is no line), nothing else, exit 1."""
    out = egressd("validate", "--format", "github", str(_broken(tmp_path)))
    assert (out.returncode, out.stderr) == (1, "")
    assert out.stdout == (
        f"::error file={tmp_path}/cart.yaml,line=4,col=12::{_ALIAS}\n"
        f"::error file={tmp_path}/notes.yml::.yml files are not read; rename it to notes.yaml\n"
        f"::error file={tmp_path}/shop.yaml,line=5,col=13::{_STAR_COM}\n"
    )


@pytest.mark.parametrize(
    ("strict", "code", "summary"),
    [
        pytest.param(False, 0, "ok with 2 warning(s), 1 service(s)", id="warnings-pass"),
        pytest.param(True, 1, "2 warning(s), failing under --strict; 1 service(s)", id="strict-fails"),
    ],
)
def test_validate_text_lists_warnings(strict, code, summary):
    """Text: each warning as file:line:column: warning: message on stdout; --strict turns them into exit 1."""
    out = egressd("validate", WARNED, *(["--strict"] if strict else []))
    version = load_policy(WARNED).version
    assert (out.returncode, out.stderr) == (code, "")
    assert out.stdout == (
        f"{WARNED}/shop.yaml:4:5: warning: {_WIDE4}\n"
        f"{WARNED}/shop.yaml:5:5: warning: {_WIDE6}\n"
        f"{WARNED}: {summary}, version {version}\n"
    )


@pytest.mark.parametrize("strict", [pytest.param(False, id="default"), pytest.param(True, id="strict")])
def test_validate_json_lists_warnings(strict):
    """JSON: the warnings with their codes, the services and version; ok is false only under --strict."""
    out = egressd("validate", WARNED, "--format", "json", *(["--strict"] if strict else []))
    assert (out.returncode, out.stderr) == (int(strict), "")
    assert json.loads(out.stdout) == {
        "path": WARNED, "ok": not strict, "errors": [],
        "warnings": [
            {"file": f"{WARNED}/shop.yaml", "line": 4, "column": 5, "code": "wide-cidr", "message": _WIDE4},
            {"file": f"{WARNED}/shop.yaml", "line": 5, "column": 5, "code": "wide-cidr", "message": _WIDE6},
        ],
        "services": ["shop"], "version": load_policy(WARNED).version,
    }


def test_validate_github_prints_warning_annotations():
    """GitHub: one ::warning annotation per warning with file, line and column, nothing else; --strict exits 1."""
    expected = (
        f"::warning file={WARNED}/shop.yaml,line=4,col=5::{_WIDE4}\n"
        f"::warning file={WARNED}/shop.yaml,line=5,col=5::{_WIDE6}\n"
    )
    assert egressd("validate", "--format", "github", WARNED).stdout == expected
    strict = egressd("validate", "--format", "github", "--strict", WARNED)
    assert (strict.returncode, strict.stdout, strict.stderr) == (1, expected, "")


def test_validate_github_escapes_properties_and_message(tmp_path):
    """GitHub: "%" is escaped everywhere, and ":" and "," in the file property, so the annotation parses."""
    directory = tmp_path / "allow,lists:x"
    directory.mkdir()
    (directory / "shop.yaml").write_text('version: v1\nservice: shop\nallow:\n  - host: "a%b.example.com"\n')
    out = egressd("validate", "--format", "github", str(directory))
    assert out.stdout == (
        f"::error file={tmp_path}/allow%2Clists%3Ax/shop.yaml,line=4,col=11::invalid host: 'a%25b.example.com' is "
        "not a valid internationalised host name: Codepoint U+0025 at position 2 of 'a%25b' not allowed\n"
    )


@pytest.mark.parametrize(
    ("text", "is_property", "escaped"),
    [
        pytest.param("50% done", False, "50%25 done", id="percent"),
        pytest.param("one\r\ntwo", False, "one%0D%0Atwo", id="newlines"),
        pytest.param("a:b,c", False, "a:b,c", id="message-keeps-colon-comma"),
        pytest.param("a:b,c%", True, "a%3Ab%2Cc%25", id="property"),
    ],
)
def test_github_escaping(text, is_property, escaped):
    """Workflow-command data escapes %, CR and LF; properties also escape ":" and ","."""
    assert policy_cli._escape(text, is_property) == escaped


@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param(["allowlists"], 0, id="shipped-ok"),
        pytest.param(["tests/allowlist_warnings/clean", "--strict"], 0, id="clean-strict"),
        pytest.param([WARNED], 0, id="warnings"),
        pytest.param([WARNED, "--strict"], 1, id="warnings-strict"),
        pytest.param(["tests/allowlist_errors/many_errors"], 1, id="errors"),
        pytest.param(["tests/allowlist_errors/many_errors", "--format", "json"], 1, id="errors-json"),
    ],
)
def test_validate_exit_codes(args, code):
    """egressd validate exits 1 on an error, 1 on a warning only with --strict, else 0."""
    assert egressd("validate", *args).returncode == code


@pytest.mark.parametrize(
    ("dest", "code", "words"),
    [
        ("api.stripe.com", 0, "allow allowed rule=allowlists/payments-api.yaml:"),
        ("api.stripe.com:8443", 1, "deny port_not_allowed"),
        ("www.pastebin.com:443", 1, "deny denylisted rule=allowlists/_global.yaml:"),
        ("api.stripe.com.evil.net", 1, "deny not_allowlisted rule=-"),
        ("0x7f.1", 1, "deny bad_request"),
    ],
)
def test_check_prints_decision_and_exit_code(dest, code, words):
    """egressd check prints verdict, reason and rule, and exits 0 on allow, 1 on deny."""
    out = egressd("check", "--allowlists", "allowlists", "--service", "payments-api", dest)
    assert out.returncode == code, out.stderr
    assert words in out.stdout


def test_run_refuses_to_start_without_a_valid_policy(tmp_path):
    """egressd run exits 2 listing the load errors when the allowlists do not load (fail closed)."""
    (tmp_path / "svc.yaml").write_text("version: v1\nservice: svc\nallow:\n  - host: 'a*.example.com'\n")
    out = egressd("run", "--allowlists", str(tmp_path), "--service", "svc", "--listen", "127.0.0.1:0",
                  "--resolver", "127.0.0.1:53", timeout=30)
    assert out.returncode == 2 and "svc.yaml:4" in out.stderr


def test_run_refuses_a_service_without_allowlist(tmp_path):
    """egressd run exits 2 when --service names no allowlist file."""
    (tmp_path / "svc.yaml").write_text(service_yaml("  - host: a.test\n"))
    out = egressd("run", "--allowlists", str(tmp_path), "--service", "other", "--resolver", "127.0.0.1:53")
    assert out.returncode == 2 and "no allowlist for service 'other'" in out.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--listen", "localhost:3128", "give an IP address"),
        ("--allow-cidr", "10.0.0.1/8", "10.0.0.0/8"),
        ("--resolver", "8.8.8.8:99999", "port 0-65535"),
        ("--connect-timeout", "0", "positive"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(tmp_path, flag, value, message):
    """A bad flag value stops egressd run with exit 2 and a message naming it."""
    (tmp_path / "svc.yaml").write_text(service_yaml("  - host: a.test\n"))
    out = egressd("run", "--allowlists", str(tmp_path), "--service", "svc", flag, value)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_environment_sets_flags(lab, start_proxy):
    """EGRESSD_* variables set run's flags (here the mode, via EGRESSD_MODE)."""
    proxy = start_proxy({"svc.yaml": service_yaml("  - host: a.test\n")}, env={"EGRESSD_MODE": "audit"})
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    [rec] = proxy.wait_records(1)
    assert rec["would_deny"] is True


@pytest.mark.isolated
def test_demo_runs_offline_and_exits_0():
    """egressd demo shows every decision as expected with the shipped allowlists and exits 0."""
    out = egressd("demo", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5/5 decisions as expected" in out.stdout
    for reason in ("allowed", "not_allowlisted", "port_not_allowed", "sni_mismatch", "forbidden_address"):
        assert f'"reason": "{reason}"' in out.stdout
    assert 'egressd_denials_total{reason="forbidden_address",service="payments-api"} 1.0' in out.stdout


@pytest.mark.isolated
def test_demo_inspect_decides_requests_by_method_and_path_and_exits_0():
    """egressd demo --inspect: allowed requests reach the origin through the worker, others get 403 inside the
    tunnel, each with an egress.request record; on Python 3.11 it says why it cannot run."""
    out = egressd("demo", "--inspect", timeout=120)
    if sys.version_info < (3, 12):
        assert out.returncode == 2 and "Python 3.12" in out.stdout, out.stdout + out.stderr
        return
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5/5 requests decided as expected" in out.stdout
    assert out.stdout.count('"reason": "request_not_allowed"') == 3
    assert "demo-origin saw POST /repos/acme/widgets/issues" in out.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the sidecar demo makes network namespaces and iptables rules: root")
def test_demo_sidecar_runs_in_a_simulated_pod_and_exits_0():
    """egressd demo --sidecar shows every way out of the pod refused or allowed as expected, and exits 0."""
    out = egressd("demo", "--sidecar", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8/8 outcomes as expected" in out.stdout
    for reason in ("allowed", "not_allowlisted", "no_name"):
        assert f'"reason": "{reason}"' in out.stdout
