"""The leak benchmarks (bench/leaks.py): their judgements as table tests, the descriptor-room check against a real
process, and a --quick run of all three scenarios end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the bench package lives next to tests/, not in the installed distribution
    sys.path.insert(0, str(ROOT))

from bench import leaks, leaks_report  # noqa: E402
from bench.leaks_world import check_room  # noqa: E402
from bench.procs import BenchError, Proc, wait_until  # noqa: E402
from bench.proxies import Started  # noqa: E402

HELLO = 517  # bytes of the payload each short tunnel sends and gets back


def _record(conn_id: str | None, reason: str = "allowed", up: int = HELLO, down: int = HELLO,
            event: str = "egress.connection") -> str:
    return json.dumps({"event": event, "conn_id": conn_id, "reason": reason, "bytes_up": up, "bytes_down": down})


RECORD_CASES = {
    "one record each": ([_record("1"), _record("2"), _record("3")], 3, True, {"lost": 0, "doubled": 0}),
    "a record lost": ([_record("1"), _record("2")], 3, False, {"lost": 1}),
    "a record doubled, the count still right": ([_record("1"), _record("1"), _record("2")], 3, False,
                                                {"doubled": 1, "lost": 1, "records": 3}),
    "a record too many": ([_record("1"), _record("2"), _record("3")], 2, False, {"extra": 1}),
    "a line that is not JSON": ([_record("1"), '{"event": "egress.conn'], 1, False, {"unparsable": 1}),
    "a record without conn_id": ([_record("1"), _record(None)], 2, False, {"no_id": 1}),
    "a refusal among them": ([_record("1"), _record("2", reason="overloaded")], 2, False, {"not_allowed": 1}),
    "bytes cut short": ([_record("1"), _record("2", down=100)], 2, False, {"wrong_bytes": 1}),
    "other events are not connections": ([_record("1"), _record(None, event="egress.dns"),
                                          _record(None, event="egress.audit_gap")], 1, True, {"records": 1}),
}


@pytest.mark.parametrize("lines, expected, ok, counts", RECORD_CASES.values(), ids=RECORD_CASES.keys())
def test_records_are_checked_one_per_connection(lines: list[str], expected: int, ok: bool,
                                                counts: dict[str, int]) -> None:
    """check_records passes exactly one allowed record per connection with its bytes, and names what is off."""
    found = leaks_report.check_records(lines, expected, frozenset({HELLO})).as_dict()
    assert found["ok"] is ok, found
    for key, value in counts.items():
        assert found[key] == value, (key, found)


MIB = 1024
FLAT_CASES = {
    "constant": ([(t * 10.0, 56 * MIB) for t in range(61)], True),
    "noise around a level": ([(t * 10.0, 56 * MIB + (300 if t % 2 else -300)) for t in range(61)], True),
    "one spike": ([(t * 10.0, 56 * MIB + (4 * MIB if t == 30 else 0)) for t in range(61)], True),
    "steady growth of 3 MiB": ([(t * 10.0, 56 * MIB + t * 3 * MIB // 60) for t in range(61)], False),
    "a step up half-way": ([(t * 10.0, 56 * MIB + (5 * MIB if t > 30 else 0)) for t in range(61)], False),
    "too few samples": ([(0.0, 56 * MIB), (10.0, 56 * MIB)], False),
}


@pytest.mark.parametrize("samples, flat", FLAT_CASES.values(), ids=FLAT_CASES.keys())
def test_soak_rss_is_judged_by_its_fitted_growth(samples: list[tuple[float, int]], flat: bool) -> None:
    """RSS counts as flat when the least-squares line rises by no more than the allowance over the run."""
    assert leaks_report.flatness(samples).flat is flat


def _churn(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "count": 1000, "warmup": 100, "concurrency": 16, "fds_start": 16, "fds_end": 16, "fds_settled": 16,
        "rss_start_kib": 56 * MIB, "rss_end_kib": 57 * MIB, "rss_settled_kib": 57 * MIB,
        "rss_tolerance_kib": leaks_report.rss_tolerance_kib(56 * MIB), "active_after": 0.0,
        "client": {"completed": 1000, "errors": {}, "per_s": 4000.0},
        "records": leaks_report.check_records([_record(str(i)) for i in range(1100)], 1100,
                                              frozenset({HELLO})).as_dict(),
    }
    return {**base, **changes}


CHURN_CASES = {
    "all back": (_churn(), set()),
    "a descriptor kept": (_churn(fds_settled=17), {"descriptors back to the start"}),
    "RSS grown past the allowance": (_churn(rss_settled_kib=61 * MIB), {"RSS back to the start"}),
    "a connection still active": (_churn(active_after=1.0), {"no connection left active"}),
    "metrics unreadable": (_churn(active_after=None), {"no connection left active"}),
    "tunnels failed": (_churn(client={"completed": 990, "errors": {"timeout": 10}, "per_s": 1.0}),
                       {"every tunnel completed"}),
}


@pytest.mark.parametrize("result, failing", CHURN_CASES.values(), ids=CHURN_CASES.keys())
def test_churn_checks_name_what_did_not_come_back(result: dict[str, object], failing: set[str]) -> None:
    """After churn, a kept descriptor, grown RSS, a live connection or a failed tunnel each fail their own check."""
    checks = leaks_report.churn_checks(result)
    assert {c.name for c in checks if not c.ok} == failing
    assert leaks_report.table({"churn": result}, checks).count("FAIL") == len(failing)


def _round(**changes: object) -> dict[str, object]:
    return {"opened": 200, "open_errors": {}, "rss_open_kib": 60 * MIB, "rss_after_kib": 60 * MIB, "fds_open": 416,
            "fds_after": 16, "active_after": 0.0, "settle_s": 0.4, "settled": True, **changes}


def _idle(*rounds: dict[str, object]) -> dict[str, object]:
    return {"count": 200, "warmup": 20, "rounds": list(rounds), "rss_before_kib": 56 * MIB, "fds_before": 16,
            "kib_per_tunnel": 4.0, "fds_per_tunnel": 2.0,
            "records": leaks_report.check_records([_record(str(i), up=0, down=0) for i in range(420)], 420,
                                                  frozenset({0})).as_dict()}


def _soak(client: dict[str, object], rss: list[int], **changes: object) -> dict[str, object]:
    samples = [(t * 10.0, kib, 16) for t, kib in enumerate(rss)]
    flat = leaks_report.flatness([(t, kib) for t, kib, _ in samples])
    return {"rate": 200.0, "duration_s": 600.0, "sample_every_s": 10.0, "warmup": 100, "samples": samples,
            "client": {"planned": 1000, "completed": 1000, "skipped": 0, "errors": {}, "worst_lag_ms": 2.0, **client},
            "flatness": {"slope_kib_per_min": flat.slope_kib_per_min, "growth_kib": flat.growth_kib,
                         "tolerance_kib": flat.tolerance_kib, "samples": flat.samples, "flat": flat.flat},
            "fds_start": 16, "fds_settled": 16, "active_after": 0.0,
            "records": leaks_report.check_records([_record(str(i)) for i in range(1100)], 1100,
                                                  frozenset({HELLO})).as_dict(), **changes}


LEVEL = [56 * MIB] * 61
IDLE_SOAK_CASES = {
    "idle: all back": (leaks_report.idle_checks, _idle(_round(), _round()), set()),
    "idle: a round not all open": (leaks_report.idle_checks, _idle(_round(), _round(opened=150)),
                                   {"all tunnels held at once"}),
    "idle: a descriptor kept in round 2": (leaks_report.idle_checks, _idle(_round(), _round(fds_after=17)),
                                           {"descriptors back to the start"}),
    "soak: steady and flat": (leaks_report.soak_checks, _soak({}, LEVEL), set()),
    "soak: starts skipped": (leaks_report.soak_checks, _soak({"skipped": 5, "completed": 995}, LEVEL),
                             {"the rate held"}),
    "soak: RSS climbing": (leaks_report.soak_checks, _soak({}, [56 * MIB + 100 * t for t in range(61)]),
                           {"RSS flat"}),
    "soak: a descriptor kept": (leaks_report.soak_checks, _soak({}, LEVEL, fds_settled=18),
                                {"descriptors back to the start"}),
}


@pytest.mark.parametrize("judge, result, failing", IDLE_SOAK_CASES.values(), ids=IDLE_SOAK_CASES.keys())
def test_idle_and_soak_checks_name_what_went_wrong(judge: Callable[[dict[str, object]], list[leaks_report.Check]],
                                                   result: dict[str, object], failing: set[str]) -> None:
    """Idle rounds not all open or keeping a descriptor, and a soak that skipped, grew or kept one, each fail."""
    checks = judge(result)
    assert {c.name for c in checks if not c.ok} == failing
    kind = "idle" if judge is leaks_report.idle_checks else "soak"
    assert leaks_report.table({kind: result}, checks).count("FAIL") == len(failing)


def test_rss_allowance_is_a_floor_or_a_share_of_the_start() -> None:
    """The RSS allowance is 4 MiB for a small process and 5 % of the start for a large one."""
    assert leaks_report.rss_tolerance_kib(50 * MIB) == 4096
    assert leaks_report.rss_tolerance_kib(200 * MIB) == 10 * MIB


OPTION_CASES = {
    "defaults": ([], {"idle_count": 10_000, "churn_count": 100_000, "duration": 600.0, "rate": 200.0}),
    "quick": (["--quick"], {"idle_count": 200, "churn_count": 3_000, "duration": 6.0}),
    "an option wins over quick": (["--quick", "--churn-count", "500"], {"churn_count": 500, "idle_count": 200}),
}


@pytest.mark.parametrize("extra, wanted", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_options_set_the_parameters(extra: list[str], wanted: dict[str, object]) -> None:
    """--quick gives the small numbers, and an explicit option overrides them."""
    params = leaks.parse_args(["all", *extra]).params
    for key, value in wanted.items():
        assert getattr(params, key) == value, key


@pytest.mark.parametrize("bad", [["idle", "--idle-count", "0"], ["soak", "--sample-every", "700"],
                                 ["soak", "--rate", "0"]], ids=["no tunnels", "sample past the end", "no rate"])
def test_options_out_of_range_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Counts below one, a zero rate or a sample interval longer than the soak stop the command with a message."""
    with pytest.raises(SystemExit):
        leaks.parse_args(bad)
    assert "must" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
def test_idle_refuses_a_count_the_descriptor_limit_cannot_hold(tmp_path: Path) -> None:
    """Before opening idle tunnels, a process whose nofile limit is too small is refused with the count it can hold."""
    proc = Proc("limited", ["prlimit", "--nofile=300:300", "sleep", "30"], tmp_path / "limited.log")
    try:
        wait_until(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep", 10,
                   "prlimit to set the limit and start sleep", proc.alive)
        started = Started("egressd", proc, None)
        check_room(started, 50)
        with pytest.raises(BenchError, match=r"raise the hard nofile limit .* --idle-count \d+"):
            check_room(started, 200)
    finally:
        proc.stop()


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or any(shutil.which(t) is None for t in ("unshare", "taskset")),
    reason="the leak benchmarks run in private network and mount namespaces (unshare), which needs root; "
    "CI runs the tests as root",
)
def test_quick_leak_run_passes_every_check(tmp_path: Path) -> None:
    """`python -m bench.leaks all --quick` exits 0 and its JSON shows every check passed with the figures filled."""
    out = tmp_path / "leaks.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_NETNS", None)
    done = subprocess.run([sys.executable, "-m", "bench.leaks", "all", "--quick", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert not doc["failures"] and doc["checks"] and all(c["ok"] for c in doc["checks"]), doc["checks"]
    idle, churn, soak = (doc["results"][name] for name in ("idle", "churn", "soak"))
    assert [r["opened"] for r in idle["rounds"]] == [200, 200]
    assert idle["rounds"][0]["rss_open_kib"] > 0 and idle["rounds"][0]["fds_open"] >= idle["fds_before"] + 400
    assert idle["records"]["expected"] == idle["warmup"] + 400
    assert churn["records"]["expected"] == churn["warmup"] + 3000 == churn["records"]["unique"]
    assert len(soak["samples"]) >= 3 and soak["records"]["expected"] == soak["warmup"] + soak["client"]["connected"]
    assert "| scenario | figure | value |" in done.stdout
