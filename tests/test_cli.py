"""The command line: validate, check, run's flags and environment, and the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import service_yaml
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


@pytest.mark.skipif(os.geteuid() != 0, reason="the sidecar demo makes network namespaces and iptables rules: root")
def test_demo_sidecar_runs_in_a_simulated_pod_and_exits_0():
    """egressd demo --sidecar shows every way out of the pod refused or allowed as expected, and exits 0."""
    out = egressd("demo", "--sidecar", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8/8 outcomes as expected" in out.stdout
    for reason in ("allowed", "not_allowlisted", "no_name"):
        assert f'"reason": "{reason}"' in out.stdout
