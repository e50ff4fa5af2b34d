"""bench.slowloris in small: it runs, measures both phases and writes every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_slowloris_bench_runs_and_reports_both_phases(tmp_path):
    out = tmp_path / "slowloris.json"
    done = subprocess.run([sys.executable, "-m", "bench.slowloris", "--slow", "1100", "--requests", "30",
                           "--json", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    for phase in ("idle", "under_attack"):
        assert result[phase]["p50_ms"] > 0 and result[phase]["p99_ms"] >= result[phase]["p50_ms"]
    assert result["slow_heads_reset"] >= 1100 - 1024  # past --max-pending-heads the attacker's own were reset
    assert "| ratio |" in done.stdout
