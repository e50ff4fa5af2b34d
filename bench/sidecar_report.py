"""The sidecar benchmark's figures: per-run values, medians, ratios, targets, two markdown tables.

Tunnels: the same load through egressd's explicit listener (CONNECT) and its
transparent one (iptables REDIRECT), the ratio transparent/explicit judged
against "a transparent tunnel costs at most 1.1× an explicit one". DNS:
egressd's DNS filter next to dnsmasq, egressd judged against absolute
targets (≥ 5,000 queries/s on one core, p99 under 2 ms at 5,000 queries/s).
All pure: dicts in, dicts or text out (the rendering helpers come from
:mod:`bench.report`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.report import _ms, _num

TUNNEL_SYSTEMS = ("direct", "explicit", "transparent")
DNS_SYSTEMS = ("egressd", "dnsmasq")
COST = 1.1  # a transparent tunnel may cost at most this many explicit ones
DNS_QPS, DNS_P99_MS = 5000.0, 2.0


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    phase: str  # where the value comes from in one system's phase results
    field: str
    higher_is_better: bool | None  # None: information only
    target: str
    bound: float | None  # on the ratio (tunnels) or on egressd's own value (dns)
    latency: str = "p50/p99"  # what the parenthesis shows: "p50/p99", "p99" (added latency), "p50", ""
    aux: str | None = None  # a second value shown in parentheses (client core busy: the generator's own CPU)
    decimals: int = 0


TUNNEL_FIGURES = (
    Figure("tunnels_per_s", "new tunnels/s, 16 concurrent clients (p50/p99 ms)", "tunnels", "per_s", True,
           f"≥ {1 / COST:.2f}× explicit", 1 / COST),
    Figure("client_core_pct", "… client core busy % (load generator's own CPU %)", "tunnels", "client_core_busy_pct",
           None, "(< 90: not client-bound)", None, "", "load_cpu_pct"),
    Figure("cpu_us_per_tunnel", "egressd CPU per new tunnel, µs", "tunnels", "cpu_us_per_tunnel", False,
           f"≤ {COST}× explicit", COST, ""),
    Figure("added_p50_ms", "added latency, new tunnel, one client, p50 (p99) ms", "latency", "p50_ms", False,
           f"≤ {COST}× explicit", COST, "p99", decimals=3),
)
DNS_FIGURES = (
    Figure("allowed_qps", "allowed name (cached), queries/s, 16 outstanding (p50/p99 ms)", "allowed", "per_s", True,
           f"≥ {DNS_QPS:,.0f}", DNS_QPS),
    Figure("denied_qps", "denied name, queries/s, 16 outstanding (p50/p99 ms)", "denied", "per_s", True,
           f"≥ {DNS_QPS:,.0f}", DNS_QPS),
    Figure("allowed_cpu_us", "server CPU per query, allowed (cached), µs", "allowed", "cpu_us_per_query", False,
           "", None, "", decimals=1),
    Figure("denied_cpu_us", "server CPU per query, denied, µs", "denied", "cpu_us_per_query", False, "", None, "",
           decimals=1),
    Figure("allowed_paced_p99", f"p99 ms at {DNS_QPS:,.0f} queries/s offered, allowed (p50 ms; server CPU %)",
           "allowed_paced", "p99_ms", False, f"< {DNS_P99_MS:g} ms", DNS_P99_MS, "p50", "proxy_cpu_pct", 2),
    Figure("denied_paced_p99", f"p99 ms at {DNS_QPS:,.0f} queries/s offered, denied (p50 ms; server CPU %)",
           "denied_paced", "p99_ms", False, f"< {DNS_P99_MS:g} ms", DNS_P99_MS, "p50", "proxy_cpu_pct", 2),
)


def figures_of(phases: dict[str, Any], figures: tuple[Figure, ...], baseline: dict[str, Any] | None = None,
               is_baseline: bool = False) -> dict[str, dict[str, Any]]:
    """One run of one system: {figure key: {"value", "p50_ms", "p99_ms", "aux", flags} or {"error"}}.

    ``baseline``: direct's sequential latency in the same run, subtracted for "added latency" (direct itself
    shows the baseline, absolute).
    """
    out: dict[str, dict[str, Any]] = {}
    errors = phases.get("errors", {})
    for fig in figures:
        if fig.phase in errors:
            out[fig.key] = {"error": errors[fig.phase]}
            continue
        phase = phases.get(fig.phase)
        if not phase or phase.get(fig.field) is None:
            continue
        value, p50, p99 = phase[fig.field], phase.get("p50_ms"), phase.get("p99_ms")
        if fig.key == "added_p50_ms" and not is_baseline:
            if not baseline or baseline.get("p50_ms") is None:
                out[fig.key] = {"error": "no direct baseline latency in this run"}
                continue
            value, p99 = value - baseline["p50_ms"], p99 - baseline["p99_ms"]
        out[fig.key] = {"value": value, "p50_ms": p50, "p99_ms": p99, "aux": phase.get(fig.aux) if fig.aux else None,
                        "client_bound": bool(phase.get("client_bound")) and fig.higher_is_better is not None,
                        "noisy": bool(phase.get("noisy")), "baseline": is_baseline and fig.key == "added_p50_ms"}
    return out


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(per_run: list[dict[str, dict[str, dict[str, Any]]]], figures: tuple[Figure, ...],
              systems: tuple[str, ...]) -> dict[str, Any]:
    """per_run[i][system][figure] -> {figure: {"systems": {system: median cell}, "ratio", "pass"}}."""
    summary: dict[str, Any] = {}
    for fig in figures:
        cells: dict[str, Any] = {}
        for system in systems:
            runs = [run[system][fig.key] for run in per_run if fig.key in run.get(system, {})]
            if not runs:
                continue
            ok = [r for r in runs if "error" not in r]
            cell: dict[str, Any] = {"runs": [r["value"] for r in ok], "errors": [r["error"] for r in runs
                                                                                 if "error" in r]}
            if ok:
                cell.update(median=_median([r["value"] for r in ok]), p50_ms=_median([r["p50_ms"] for r in ok]),
                            p99_ms=_median([r["p99_ms"] for r in ok]), aux=_median([r["aux"] for r in ok]),
                            client_bound=sum(r["client_bound"] for r in ok) * 2 > len(ok),
                            noisy_runs=sum(r["noisy"] for r in ok), baseline=any(r["baseline"] for r in ok))
            cells[system] = cell
        entry: dict[str, Any] = {"label": fig.label, "target": fig.target, "systems": cells,
                                 "better": {True: "higher", False: "lower", None: ""}[fig.higher_is_better]}
        entry.update(_judge(fig, cells, systems))
        summary[fig.key] = entry
    return summary


def _judge(fig: Figure, cells: dict[str, Any], systems: tuple[str, ...]) -> dict[str, Any]:
    """Tunnels: the ratio transparent/explicit against the bound. DNS: egressd/dnsmasq shown, egressd's own
    value against the bound."""
    mine_name, theirs_name = ("transparent", "explicit") if systems == TUNNEL_SYSTEMS else ("egressd", "dnsmasq")
    mine = cells.get(mine_name, {}).get("median")
    theirs = cells.get(theirs_name, {}).get("median")
    ratio = mine / theirs if mine is not None and theirs else None
    if fig.bound is None or fig.higher_is_better is None:
        passed = None
    elif systems == TUNNEL_SYSTEMS:
        passed = None if ratio is None else (ratio >= fig.bound if fig.higher_is_better else ratio <= fig.bound)
    else:
        passed = None if mine is None else (mine >= fig.bound if fig.higher_is_better else mine < fig.bound)
    return {"ratio": ratio, "pass": passed}


def _cell(fig: Figure, cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    if cell.get("median") is None:
        return "FAILED" if cell.get("errors") else "–"
    text = ("base " if cell.get("baseline") else "") + _num(cell["median"], fig.decimals)
    inner = []
    if fig.latency == "p50/p99" and cell.get("p50_ms") is not None:
        inner.append(f"{_ms(cell['p50_ms'])}/{_ms(cell.get('p99_ms'))}")
    elif fig.latency in ("p50", "p99") and cell.get(f"{fig.latency}_ms") is not None:
        inner.append(_ms(cell[f"{fig.latency}_ms"]))
    if cell.get("aux") is not None:
        inner.append(f"{cell['aux']:.0f}" + ("%" if fig.latency == "p50" else ""))
    if inner:
        text += f" ({'; '.join(inner)})"
    if cell.get("client_bound"):
        text += " CB"
    if cell.get("noisy_runs"):
        text += " N" if cell["noisy_runs"] == len(cell["runs"]) else f" N{cell['noisy_runs']}"
    if cell.get("errors"):
        text += f" [{len(cell['errors'])} failed]"
    return text


def table(summary: dict[str, Any], figures: tuple[Figure, ...], systems: tuple[str, ...]) -> str:
    ratio_name = "transparent/explicit" if systems == TUNNEL_SYSTEMS else "egressd/dnsmasq"
    head = ["figure", *systems, ratio_name, "better", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fig in figures:
        entry = summary.get(fig.key)
        if entry is None or not entry["systems"]:
            continue
        cells = [_cell(fig, entry["systems"].get(s)) for s in systems]
        ratio = "" if fig.higher_is_better is None else "–" if entry["ratio"] is None else f"{entry['ratio']:.2f}×"
        verdict = {True: "yes", False: "no", None: "" if fig.bound is None else "n/a"}[entry["pass"]]
        lines.append("| " + " | ".join([fig.label, *cells, ratio, entry["better"], fig.target, verdict]) + " |")
    return "\n".join(lines)


LEGEND = (
    "Medians of the runs; in parentheses p50/p99 latency in ms (added latency: p99; paced DNS: p50 and the "
    "server's CPU %). CB = client-bound: the client core (load generator, origin, DNS server) was ≥90% busy, so "
    "the figure is a floor. N = noisy: other programs on this machine used ≥10% of a core during the "
    "measurement (Nk: in k runs). Added latency = the listener's p50/p99 with one sequential client minus "
    "direct's in the same run (direct's column: that baseline, absolute)."
)
