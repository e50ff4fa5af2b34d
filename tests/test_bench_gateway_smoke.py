"""Smoke test of the gateway benchmark (bench/gateway.py): a --quick run ends cleanly, every tunnel of the token
configuration is attributed to the bench service by its token, and every figure is reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("unshare", "taskset", "cc")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
    reason=f"the gateway benchmark runs in private namespaces: it needs root and {', '.join(TOOLS)}",
)


def test_quick_gateway_run(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    done = subprocess.run([sys.executable, "-m", "bench.gateway", "--quick", "--json", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert not doc["notes"], doc["notes"]
    for config in ("service", "service-header", "token"):
        cell = doc["figures"][config]
        assert cell["per_s"] > 0 and cell["cpu_us_per_tunnel"] > 0
    assert 0 < doc["figures"]["ratio_tunnels"] < 2
    token = doc["runs"][0]["token"]["records"]["identities"]
    assert set(token) == {"token/bench/allowed"}, token
    assert set(doc["runs"][0]["service"]["records"]["identities"]) == {"none/bench/allowed"}
    for alg in ("RS256-2048", "ES256"):
        costs = doc["jwt_verify"][alg]
        assert costs["cold_us"] > costs["hit_us"] > 0
    assert "| new tunnels/s" in doc["table"]
