"""The inspect-mode benchmark (bench/inspect.py): its merging, records check and table as table tests, and a --quick
run end to end whose JSON and table must hold every figure for the four systems."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the bench package lives next to tests/, not in the installed distribution
    sys.path.insert(0, str(ROOT))

from bench import inspect as bench_inspect  # noqa: E402
from bench.inspect_load import merge  # noqa: E402
from bench.procs import BenchError  # noqa: E402
from bench.proxies import Started  # noqa: E402

pytestmark = pytest.mark.skipif(sys.version_info < (3, 12),
                                reason="the inspect benchmark runs mitmproxy (inspect mode), which needs Python 3.12+")

USE = {"proxy_cpu_s": 0.5, "main_cpu_s": 0.1, "client_core_busy_pct": 40.0, "client_bound": False, "noisy": False}


def _result(completed: int, lat_us: list[int], late: float = 0.0, errors: dict[str, int] | None = None
            ) -> dict[str, Any]:
    return {"completed": completed, "total": completed + 2, "tunnels": 1, "errors": errors or {}, "late_s": late,
            "alpn": {"http/1.1": 1}, "lat_us": lat_us}


def test_processes_are_merged_into_one_figure() -> None:
    """Two processes' counts add up, their latencies make one distribution, and CPU is divided per request."""
    out = merge([_result(600, [1000] * 600), _result(400, [3000] * 400, errors={"timeout": 1})], USE, 2.0, 0.5, True)
    assert out["per_s"] == 500 and out["total"] == 1004 and out["errors"] == {"timeout": 1}
    assert (out["p50_ms"], out["p99_ms"]) == (1.0, 3.0)
    assert out["cpu_us_per_request"] == 500 and out["main_cpu_us_per_request"] == 100


@pytest.mark.parametrize("results, message", [
    ([_result(0, [])], "no request completed"),
    ([_result(10, [1] * 10), _result(10, [1] * 10, late=0.7)], "started 0.70s late"),
], ids=["nothing completed", "a process started after the warm-up"])
def test_a_phase_that_measured_nothing_fails(results: list[dict[str, Any]], message: str) -> None:
    """A window without completions, or a process that started after the warm-up had passed, is an error."""
    with pytest.raises(BenchError, match=message):
        merge(results, USE, 1.0, 0.5, True)


def _conn(inspected: bool, reason: str = "allowed") -> str:
    detail = "inspected: each request is decided by its method and path" if inspected else None
    return json.dumps({"event": "egress.connection", "reason": reason, "detail": detail})


def _req(decision: str = "allow", status: int = 200) -> str:
    return json.dumps({"event": "egress.request", "decision": decision, "status": status})


RECORD_CASES = {
    "inspected, all there": ("inspected", [_conn(True)] * 2 + [_req()] * 5, True),
    "inspected, a request record lost": ("inspected", [_conn(True)] * 2 + [_req()] * 4, False),
    "inspected, a request refused": ("inspected", [_conn(True)] * 2 + [_req()] * 4 + [_req("deny", 403)], False),
    "inspected, a tunnel not inspected": ("inspected", [_conn(True), _conn(False)] + [_req()] * 5, False),
    "plain, all there": ("plain", [_conn(False)] * 2, True),
    "plain, a tunnel inspected": ("plain", [_conn(False), _conn(True)], False),
    "plain, a connection refused": ("plain", [_conn(False), _conn(False, "forbidden_address")], False),
}


@pytest.mark.parametrize("system, lines, ok", RECORD_CASES.values(), ids=RECORD_CASES.keys())
def test_records_must_match_the_tunnels_and_requests(tmp_path: Path, system: str, lines: list[str], ok: bool) -> None:
    """One allowed connection record per tunnel (inspected only on the inspected system) and, inspected, one
    allowed 200 request record per request: anything else fails the check."""
    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join(lines) + "\n")
    found = bench_inspect.audit_counts(Started(system, None, None, audit=audit), system, 2, 5, wait=0)
    assert found["records_ok"] is ok, found


def _phase(per_s: float, p50: float, cpu: float | None = None) -> dict[str, Any]:
    out = {"per_s": per_s, "p50_ms": p50, "p99_ms": 2 * p50, "client_core_busy_pct": 50.0, "proxy_core_busy_pct": 90.0,
           "load_cpu_pct": 30.0, "foreign_cpu_pct": 1.0, "origin_connections_per_request": 0.01}
    return {**out, "cpu_us_per_request": cpu, "main_cpu_us_per_request": cpu} if cpu else out


def _system(scale: float, proxied: bool = True, h2: bool = False, rss: int = 60 * 1024) -> dict[str, Any]:
    cpu = 100 * scale if proxied else None
    out: dict[str, Any] = {name: _phase(10_000 / scale, 0.1 * scale, cpu) for name in bench_inspect.LOADS[:4]}
    if h2:
        out["latency_h2"] = _phase(300, 3.0 * scale, cpu)
    if proxied:
        out["first"] = {"ms": 50.0}
        for name in bench_inspect.RSS:
            out[name] = {"rss_kib": rss, "main_kib": rss, "children_kib": 0}
    return out


def test_summary_takes_medians_and_ratios_against_the_same_run() -> None:
    """Medians over runs; added latency is each run's p50 minus direct's in that run; the ratios compare the
    inspected tunnel with the plain tunnel and with mitmproxy alone."""
    runs = [{"direct": _system(1, proxied=False), "plain": _system(2), "inspected": _system(20, h2=True),
             "mitmproxy": _system(25, h2=True)} for _ in range(3)]
    summary = bench_inspect.summarize(runs)
    assert summary["inspected"]["latency"]["added_p50_ms"] == pytest.approx(1.9)
    assert summary["inspected"]["latency_h2"]["added_p50_ms"] == pytest.approx(59.9)  # against direct's HTTP/1.1
    ratios = summary["ratios"]
    assert ratios["keepalive_per_s_vs_plain"] == pytest.approx(0.1)
    assert ratios["keepalive_per_s_vs_mitmproxy"] == pytest.approx(1.25)
    assert ratios["added_p50_vs_plain"] == pytest.approx(1.9 / 0.1)
    text = bench_inspect.table(summary, bench_inspect.Params())
    assert "| keep-alive req/s, 16 connections (p50/p99 ms) | 10,000 (0.10/0.20) | 5,000" in text
    assert "0.10× | 1.25× |" in text


OPTION_CASES = {
    "defaults": ([], 3, bench_inspect.Params()),
    "quick": (["--quick"], 1, bench_inspect.Params.quick()),
    "quick with more connections": (["--quick", "--concurrency", "32", "--procs", "4"], 1,
                                    replace(bench_inspect.Params.quick(), concurrency=32, procs=4)),
}


@pytest.mark.parametrize("argv, runs, params", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_options_set_the_parameters(argv: list[str], runs: int, params: bench_inspect.Params) -> None:
    """--quick gives short phases and one run; --concurrency and --procs override either."""
    args = bench_inspect.parse_args(argv)
    assert (args.runs, args.params) == (runs, params)


def test_more_processes_than_connections_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Each load generator process needs at least one connection."""
    with pytest.raises(SystemExit):
        bench_inspect.parse_args(["--concurrency", "2", "--procs", "3"])
    assert "--procs between 1 and --concurrency" in capsys.readouterr().err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or any(shutil.which(t) is None for t in ("unshare", "taskset")),
    reason="the inspect benchmark runs in private network and mount namespaces (unshare), which needs root; "
    "CI runs the tests as root",
)
def test_quick_inspect_run_measures_every_figure(tmp_path: Path) -> None:
    """`python -m bench.inspect --quick` exits 0, its records add up, and its JSON and table hold every figure."""
    out = tmp_path / "inspect.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_NETNS", None)
    done = subprocess.run([sys.executable, "-m", "bench.inspect", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert not doc["failures"] and doc["machine"]["versions"]["mitmproxy"]
    figures = doc["figures"]
    for system in bench_inspect.SYSTEMS:
        for phase in bench_inspect.LOADS[:4]:
            assert figures[system][phase]["per_s"] > 0 and figures[system][phase]["p50_ms"] > 0, (system, phase)
    for system in ("plain", "inspected", "mitmproxy"):
        assert figures[system]["keepalive"]["cpu_us_per_request"] > 0
        assert all(figures[system][phase]["rss_kib"] > 0 for phase in bench_inspect.RSS)
        assert figures[system]["latency"]["added_p50_ms"] is not None
    for system in ("inspected", "mitmproxy"):  # HTTP/2 from the client, HTTP/1.1 to the origin
        assert figures[system]["latency_h2"]["per_s"] > 0
    inspected = figures["inspected"]
    assert inspected["rss_start"]["children_kib"] == 0 < inspected["rss_first"]["children_kib"]  # the worker
    wanted = {f"{name}_vs_{other}" for name in bench_inspect.RATIOS for other in ("plain", "mitmproxy")}
    assert set(doc["figures"]["ratios"]) == wanted - {"added_p50_h2_vs_plain"}  # the plain tunnel has no HTTP/2
    for run in doc["runs"]:
        assert run["plain"]["records"]["records_ok"] and run["inspected"]["records"]["records_ok"], run
        assert run["inspected"]["first"]["issuer"] == "egressd inspection CA"
    for label in ("keep-alive req/s", "new-tunnel req/s", "system CPU per request", "added p50", "HTTP/2",
                  "origin connections per request", "RSS after start", "RSS after the first request"):
        assert label in doc["table"] and label in done.stdout, label
