"""The leak benchmarks' judgements and table, as pure functions over numbers and audit lines.

Criteria (the numbers are the constants below):

* records: exactly one ``egress.connection`` record per connection the
  proxy accepted, each ``conn_id`` once, every one ``allowed`` with the bytes
  the client sent (and got back);
* descriptors: after the load and a settle, the proxy holds exactly as many
  as before it;
* RSS after churn: back within ``max(RSS_SLACK_KIB, RSS_SLACK_FRACTION of the
  start)`` of the start. Freed memory is not always handed back to the kernel:
  CPython's allocator keeps an arena while one object in it lives, and glibc
  trims only the top of each heap (and keeps one heap per thread that
  allocated, its "arenas"). That costs a few MiB once, which is why the start
  is taken after a warm-up; a leak grows with the number of connections and
  passes any fixed allowance given enough of them;
* RSS during a soak: flat when the least-squares line through the samples
  rises by no more than ``max(FLAT_SLACK_KIB, FLAT_SLACK_FRACTION of the first
  sample)`` over the whole run.

The idle rounds' RSS is reported, not judged: after 10,000 tunnels close, the
memory they used stays with the allocator (RSS does not fall back), and how
much of it the next round reuses varies by several MiB from round to round.
A leak shows there as RSS that climbs round after round by the tunnels' own
cost, which churn and soak then judge.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

CONNECTION_EVENT = "egress.connection"
RSS_SLACK_KIB = 4096
RSS_SLACK_FRACTION = 0.05
FLAT_SLACK_KIB = 2048
FLAT_SLACK_FRACTION = 0.02
MIN_SAMPLES = 3


@dataclass(frozen=True, slots=True)
class RecordCheck:
    """The audit records of one run against the connections made."""

    expected: int  # connections the proxy accepted
    records: int  # egress.connection lines
    unique: int  # distinct conn_ids among them
    doubled: int  # conn_ids written more than once
    no_id: int  # records without a conn_id
    unparsable: int  # lines that are not JSON objects
    not_allowed: int  # records whose reason is not "allowed"
    wrong_bytes: int  # records whose byte counts are not those the client sent
    reasons: dict[str, int]

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.unique)

    @property
    def extra(self) -> int:
        return max(0, self.unique - self.expected)

    @property
    def ok(self) -> bool:
        return (self.records == self.unique == self.expected and not self.doubled and not self.no_id
                and not self.unparsable and not self.not_allowed and not self.wrong_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost": self.lost, "extra": self.extra, "ok": self.ok}


def check_records(lines: Iterable[str | bytes], expected: int, byte_counts: frozenset[int]) -> RecordCheck:
    """Compare an audit log's connection records with ``expected`` connections; ``byte_counts``: the sizes a
    tunnel may have sent (and got back, the origin echoes)."""
    ids: Counter[str] = Counter()
    records = no_id = unparsable = not_allowed = wrong_bytes = 0
    reasons: Counter[str] = Counter()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            unparsable += 1
            continue
        if not isinstance(record, dict):
            unparsable += 1
            continue
        if record.get("event") != CONNECTION_EVENT:
            continue
        records += 1
        reasons[str(record.get("reason"))] += 1
        not_allowed += record.get("reason") != "allowed"
        up, down = record.get("bytes_up"), record.get("bytes_down")
        wrong_bytes += up not in byte_counts or down != up
        conn_id = record.get("conn_id")
        if conn_id is None:
            no_id += 1
        else:
            ids[str(conn_id)] += 1
    doubled = sum(1 for n in ids.values() if n > 1)
    return RecordCheck(expected, records, len(ids), doubled, no_id, unparsable, not_allowed, wrong_bytes,
                       dict(reasons))


def rss_tolerance_kib(start_kib: int) -> int:
    return max(RSS_SLACK_KIB, round(start_kib * RSS_SLACK_FRACTION))


def slope_per_s(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


@dataclass(frozen=True, slots=True)
class Flatness:
    slope_kib_per_min: float
    growth_kib: float  # the fitted line's rise from the first sample to the last
    tolerance_kib: int
    samples: int

    @property
    def flat(self) -> bool:
        return self.samples >= MIN_SAMPLES and self.growth_kib <= self.tolerance_kib


def flatness(samples: Sequence[tuple[float, int]]) -> Flatness:
    """Whether RSS samples (seconds, KiB) stay flat, by the criterion in the module docstring."""
    slope = slope_per_s(samples)
    span = samples[-1][0] - samples[0][0] if samples else 0.0
    first = samples[0][1] if samples else 0
    tolerance = max(FLAT_SLACK_KIB, round(first * FLAT_SLACK_FRACTION))
    return Flatness(round(slope * 60, 1), round(slope * span, 1), tolerance, len(samples))


@dataclass(frozen=True, slots=True)
class Check:
    scenario: str
    name: str
    ok: bool
    detail: str


def _records_check(scenario: str, found: dict[str, Any]) -> Check:
    detail = (f"{found['records']} records for {found['expected']} connections, {found['unique']} conn_ids "
              f"(lost {found['lost']}, extra {found['extra']}, doubled {found['doubled']}, without id "
              f"{found['no_id']}, unparsable {found['unparsable']}, not allowed {found['not_allowed']}, wrong "
              f"bytes {found['wrong_bytes']})")
    return Check(scenario, "one record per connection", found["ok"], detail)


def _fds_check(scenario: str, before: int, after: int) -> Check:
    return Check(scenario, "descriptors back to the start", before == after, f"{before} before, {after} after")


def _active_check(scenario: str, active: float | None) -> Check:
    return Check(scenario, "no connection left active", active == 0,
                 f"egressd_active_connections {active if active is not None else 'unreadable'}")


def idle_checks(r: dict[str, Any]) -> list[Check]:
    rounds = r["rounds"]
    out = [Check("idle", "all tunnels held at once", all(x["opened"] == r["count"] for x in rounds),
                 "; ".join(f"round {i}: {x['opened']} of {r['count']} open (errors {x['open_errors']})"
                           for i, x in enumerate(rounds, 1)))]
    out += [_fds_check(f"idle round {i}", r["fds_before"], x["fds_after"]) for i, x in enumerate(rounds, 1)]
    return [*out, _active_check("idle", rounds[-1]["active_after"]), _records_check("idle", r["records"])]


def churn_checks(r: dict[str, Any]) -> list[Check]:
    grown = r["rss_settled_kib"] - r["rss_start_kib"]
    client = r["client"]
    return [
        Check("churn", "every tunnel completed", client["completed"] == r["count"],
              f"{client['completed']} of {r['count']} (errors {client['errors']})"),
        _fds_check("churn", r["fds_start"], r["fds_settled"]),
        Check("churn", "RSS back to the start", grown <= r["rss_tolerance_kib"],
              f"{grown:+d} KiB after settling, allowed {r['rss_tolerance_kib']} KiB"),
        _active_check("churn", r["active_after"]),
        _records_check("churn", r["records"]),
    ]


def soak_checks(r: dict[str, Any]) -> list[Check]:
    client, flat = r["client"], r["flatness"]
    return [
        Check("soak", "the rate held", client["completed"] == client["planned"] and not client["skipped"],
              f"{client['completed']} of {client['planned']} completed, {client['skipped']} skipped "
              f"(errors {client['errors']}, worst lag {client['worst_lag_ms']} ms)"),
        Check("soak", "RSS flat", flat["flat"],
              f"{flat['growth_kib']:+.0f} KiB over the run ({flat['slope_kib_per_min']:+.1f} KiB/min, "
              f"{flat['samples']} samples), allowed {flat['tolerance_kib']} KiB"),
        _fds_check("soak", r["fds_start"], r["fds_settled"]),
        _active_check("soak", r["active_after"]),
        _records_check("soak", r["records"]),
    ]


CHECKS = {"idle": idle_checks, "churn": churn_checks, "soak": soak_checks}


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def rows(scenario: str, r: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) pairs for the table."""
    rec = r["records"]
    records = (f"{rec['records']} / {rec['expected']}, each conn_id once" if rec["ok"]
               else f"{rec['records']} / {rec['expected']} (lost {rec['lost']}, doubled {rec['doubled']})")
    if scenario == "idle":
        rounds = r["rounds"]
        out = [
            ("tunnels held at once", f"{min(x['opened'] for x in rounds):,} of {r['count']:,}, "
             f"{len(rounds)} round{'s' if len(rounds) > 1 else ''}"),
            ("RSS before / all open / after closing",
             f"{_mib(r['rss_before_kib'])} / {_mib(rounds[0]['rss_open_kib'])} / "
             f"{_mib(rounds[0]['rss_after_kib'])}"),
            ("RSS per idle tunnel", f"{r['kib_per_tunnel']:.1f} KiB"),
            ("RSS all open, round by round", " / ".join(_mib(x["rss_open_kib"]) for x in rounds)),
            ("RSS after closing, round by round", " / ".join(_mib(x["rss_after_kib"]) for x in rounds)),
            ("descriptors before / all open / after",
             f"{r['fds_before']} / {rounds[0]['fds_open']} / {' / '.join(str(x['fds_after']) for x in rounds)}"),
        ]
    elif scenario == "churn":
        out = [
            ("short tunnels (after a warm-up)", f"{r['count']:,} at {r['client']['per_s']:,.0f}/s "
             f"({r['concurrency']} in flight; warm-up {r['warmup']:,})"),
            ("descriptors start / end / settled", f"{r['fds_start']} / {r['fds_end']} / {r['fds_settled']}"),
            ("RSS start / end / settled", f"{_mib(r['rss_start_kib'])} / {_mib(r['rss_end_kib'])} / "
             f"{_mib(r['rss_settled_kib'])} ({r['rss_settled_kib'] - r['rss_start_kib']:+d} KiB)"),
        ]
    else:
        rss = [kib for _, kib, _ in r["samples"]]
        flat = r["flatness"]
        out = [
            ("steady rate", f"{r['rate']:g} tunnels/s for {r['duration_s']:g} s "
             f"({r['client']['completed']:,} tunnels)"),
            ("RSS first / last / min / max", " / ".join(_mib(v) for v in (rss[0], rss[-1], min(rss), max(rss)))
             if rss else "no samples"),
            ("RSS slope", f"{flat['slope_kib_per_min']:+.1f} KiB/min ({flat['samples']} samples every "
             f"{r['sample_every_s']:g} s)"),
            ("RSS samples, MiB", " ".join(f"{kib / 1024:.1f}" for kib in rss)),
            ("descriptors start / settled", f"{r['fds_start']} / {r['fds_settled']}"),
        ]
    return [*out, ("records / connections", records)]


def table(results: dict[str, dict[str, Any]], checks: list[Check]) -> str:
    lines = ["| scenario | figure | value |", "|---|---|---|"]
    for scenario, r in results.items():
        lines += [f"| {scenario} | {figure} | {value} |" for figure, value in rows(scenario, r)]
    lines.append("")
    lines += [f"{'PASS' if c.ok else 'FAIL'}  {c.scenario}: {c.name}: {c.detail}" for c in checks]
    return "\n".join(lines)
