"""Smoke test of the benchmark runner (bench/): a --quick run ends cleanly and reports every egressd figure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EGRESSD_FIGURES = (
    "bulk_mibps", "tunnels_per_s", "cpu_us_per_tunnel", "added_p50_ms",
    "idle_rss_mib", "idle_kib_per_tunnel", "http_rps",
)


def _has_workers_option() -> bool:
    out = subprocess.run([sys.executable, "-m", "egressd", "run", "--help"], capture_output=True, text=True,
                         timeout=60)
    return "--workers" in out.stdout


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="the benchmark runs in private network and mount namespaces (unshare), which needs root; "
    "CI runs the tests as root",
)
def test_quick_benchmark_reports_every_egressd_figure(tmp_path: Path) -> None:
    """`python -m bench --quick` exits 0 and its JSON has a positive value for every egressd figure."""
    systems = ["egressd", "direct"] + [name for name in ("squid", "tinyproxy") if shutil.which(name)]
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_NETNS", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--runs", "1", "--only", ",".join(systems), "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    document = json.loads(out.read_text())
    figures = document["figures"]
    expected = EGRESSD_FIGURES + (("workers2_tunnels_per_s",) if _has_workers_option() else ())
    for key in expected:
        cell = figures[key]["systems"].get("egressd", {})
        assert not cell.get("errors"), f"{key}: {cell.get('errors')}"
        assert cell.get("median") is not None and cell["median"] > 0, f"{key}: {cell}"
    assert set(document["systems"]) == set(systems)
    assert document["machine"]["nproc"] and document["command"]
    assert "| figure |" in done.stdout
