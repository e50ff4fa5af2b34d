"""Smoke test of the sidecar benchmark (bench/sidecar.py): a --quick run ends cleanly and reports every figure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("ip", "iptables-restore", "setpriv", "taskset", "sysctl", "cc")
TUNNEL_FIGURES = ("tunnels_per_s", "cpu_us_per_tunnel", "added_p50_ms")
DNS_FIGURES = ("allowed_qps", "denied_qps", "allowed_cpu_us", "denied_cpu_us", "allowed_paced_p99",
               "denied_paced_p99")
HAS_DNSMASQ = shutil.which("dnsmasq") is not None or Path("/usr/sbin/dnsmasq").exists()

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
    reason=f"the sidecar benchmark makes network namespaces and iptables rules: it needs root and {', '.join(TOOLS)} "
    "(CI runs the tests as root)",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("sidecar-bench") / "sidecar.json"
    cmd = [sys.executable, "-m", "bench.sidecar", "--quick", "--json", str(out)]
    if not HAS_DNSMASQ:
        cmd.append("--no-dnsmasq")
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return json.loads(out.read_text()), done.stdout


def _value(document: dict[str, Any], part: str, key: str, system: str) -> float:
    cell = document["figures"][part][key]["systems"].get(system, {})
    assert not cell.get("errors"), f"{part} {key} {system}: {cell.get('errors')}"
    assert cell.get("median") is not None, f"{part} {key} {system}: {cell}"
    return cell["median"]


def test_quick_sidecar_benchmark_reports_every_egressd_figure(quick_run):
    """`python -m bench.sidecar --quick` exits 0 with every explicit, transparent and DNS-filter figure measured."""
    document, stdout = quick_run
    for key in TUNNEL_FIGURES:
        for system in ("explicit", "transparent"):
            value = _value(document, "tunnels", key, system)
            assert value > 0 or key == "added_p50_ms", f"{key} {system}: {value}"
        assert document["figures"]["tunnels"][key]["ratio"] is not None
    for key in DNS_FIGURES:
        assert _value(document, "dns", key, "egressd") > 0
    run = document["runs"][0]
    records = run["tunnels"]["explicit"]["records"]
    assert records["by_listener"]["transparent"] > 0 and not any(records["missing"].values()), records
    assert set(records["kinds"]) == {"explicit connect allowed", "transparent tls allowed"}, records["kinds"]
    dns = run["dns"]["egressd"]["records"]
    assert dns["missing"] == 0 and dns["upstream_queries"] >= 1, dns
    assert "-j REDIRECT --to-ports 15001" in document["pod_rules"]
    assert document["machine"]["python_executable"] and "| figure |" in stdout


@pytest.mark.skipif(not HAS_DNSMASQ, reason="dnsmasq is not installed (apt-get install -y dnsmasq-base): the "
                    "DNS filter was measured without its peer")
def test_quick_sidecar_benchmark_measures_dnsmasq(quick_run):
    """With dnsmasq installed, the same quick run measures it next to the DNS filter and gives the ratios."""
    document, _ = quick_run
    for key in DNS_FIGURES:
        assert _value(document, "dns", key, "dnsmasq") > 0
        assert document["figures"]["dns"][key]["ratio"] is not None
