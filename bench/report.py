"""From per-run phase results to figures, medians, ratios egressd/Squid, targets, a markdown table.

``figures_of`` turns one run's phase results for one system into the figures
of the issue; ``summarize`` takes medians over runs (the p99 shown is the
median of the runs' p99s) and judges egressd against its targets; ``table``
renders the summary. All pure: dicts in, dicts or text out.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

SYSTEMS = ("direct", "egressd", "squid", "tinyproxy")


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    higher_is_better: bool
    target: str  # human form
    kind: str  # "ratio" (egressd/squid), "abs" (egressd's own value), "workers" (vs single worker)
    bound: float
    decimals: int = 0


FIGURES = (
    Figure("bulk_mibps", "bulk MiB/s through one CONNECT tunnel", True, "≥ 1.3× squid", "ratio", 1.3),
    Figure("tunnels_per_s", "new CONNECT tunnels/s, 16 concurrent clients (p50/p99 ms)", True, "≥ 1.0× squid",
           "ratio", 1.0),
    Figure("tunnels_client_core_pct", "… client core busy % (load generator's own CPU %) during tunnels/s", False,
           "(< 90: not client-bound)", "info", 0.0),
    Figure("cpu_us_per_tunnel", "proxy CPU per new tunnel, µs", False, "≤ 1.0× squid", "ratio", 1.0),
    Figure("added_p50_ms", "added latency, new tunnel, p50 (p99) ms", False, "≤ 1.2× squid", "ratio", 1.2, 3),
    Figure("idle_rss_mib", "idle RSS, MiB", False, "≤ 40 MiB", "abs", 40.0, 1),
    Figure("idle_kib_per_tunnel", "RSS per idle tunnel, KiB", False, "≤ 8 KiB", "abs", 8.0, 1),
    Figure("http_rps", "plain-HTTP forward requests/s, wrk 16 conns (p50/p99 ms)", True, "≥ 0.5× squid", "ratio",
           0.5),
    Figure("workers2_tunnels_per_s", "tunnels/s, egressd --workers 2 on both cores", True, "≥ 1.6× 1 worker",
           "workers", 1.6),
)
BY_KEY = {f.key: f for f in FIGURES}


def _value(phase: dict[str, Any], value: Any, p50: Any = None, p99: Any = None) -> dict[str, Any]:
    return {"value": value, "p50_ms": p50, "p99_ms": p99, "client_bound": bool(phase.get("client_bound")),
            "noisy": bool(phase.get("noisy"))}


def figures_of(
    phases: dict[str, Any], direct_latency: dict[str, Any] | None, system: str = ""
) -> dict[str, dict[str, Any]]:
    """One run of one system: {figure key: {"value", "p50_ms", "p99_ms", "client_bound"} or {"error"}}.

    For direct, the added-latency figure holds the baseline itself (absolute p50, p99).
    """
    out: dict[str, dict[str, Any]] = {}
    errors = phases.get("errors", {})

    def take(key: str, phase: str, build: Any) -> None:
        if phase in errors:
            out[key] = {"error": errors[phase]}
        elif phase in phases:
            try:
                out[key] = build(phases[phase])
            except (KeyError, TypeError) as exc:
                out[key] = {"error": f"{phase}: missing {exc}"}

    take("bulk_mibps", "bulk", lambda p: _value(p, p["mib_per_s"]))
    take("tunnels_per_s", "tunnels", lambda p: _value(p, p["per_s"], p["p50_ms"], p["p99_ms"]))
    take("tunnels_client_core_pct", "tunnels", lambda p: {**_value(p, p["client_core_busy_pct"]),
                                                           "aux": p.get("load_cpu_pct"), "client_bound": False}
         if "client_core_busy_pct" in p else None)
    take("cpu_us_per_tunnel", "tunnels", lambda p: _value(p, p["cpu_us_per_tunnel"]) if "cpu_us_per_tunnel" in p
         else None)
    if system == "direct":
        take("added_p50_ms", "latency", lambda p: {**_value(p, p["p50_ms"], p99=p["p99_ms"]), "baseline": True})
    elif direct_latency is None or "p50_ms" not in direct_latency:
        if "latency" in phases or "latency" in errors:
            out["added_p50_ms"] = {"error": "no direct baseline latency in this run"}
    else:
        take("added_p50_ms", "latency", lambda p: _value(
            p, p["p50_ms"] - direct_latency["p50_ms"], p99=p["p99_ms"] - direct_latency["p99_ms"]))
    take("idle_rss_mib", "idle", lambda p: _value(p, p["idle_rss_mib"]) if p else None)
    take("idle_kib_per_tunnel", "idle", lambda p: _value(p, p["idle_kib_per_tunnel"]) if p else None)
    take("http_rps", "http", lambda p: _value(p, p["rps"], p["p50_ms"], p["p99_ms"]))
    take("workers2_tunnels_per_s", "workers2", lambda p: _value(p, p["per_s"], p["p50_ms"], p["p99_ms"]))
    return {k: v for k, v in out.items() if v is not None}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(per_run: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """per_run[i][system][figure] -> {figure: {system: median cell}, plus ratio, target, pass}."""
    summary: dict[str, Any] = {}
    for fig in FIGURES:
        cells: dict[str, Any] = {}
        for system in SYSTEMS:
            runs = [run[system][fig.key] for run in per_run if fig.key in run.get(system, {})]
            if not runs:
                continue
            ok = [r for r in runs if "error" not in r]
            cell: dict[str, Any] = {"runs": [r.get("value") for r in ok], "errors": [r["error"] for r in runs
                                                                                      if "error" in r]}
            if ok:
                cell["median"] = _median([r["value"] for r in ok])
                cell["p50_ms"] = _median([r.get("p50_ms") for r in ok])
                cell["p99_ms"] = _median([r.get("p99_ms") for r in ok])
                cell["client_bound"] = sum(r["client_bound"] for r in ok) * 2 > len(ok)
                cell["noisy_runs"] = sum(r.get("noisy", False) for r in ok)
                cell["baseline"] = any(r.get("baseline") for r in ok)
                cell["aux"] = _median([r.get("aux") for r in ok])
            cells[system] = cell
        entry: dict[str, Any] = {"label": fig.label, "better": "higher" if fig.higher_is_better else "lower",
                                 "target": fig.target, "systems": cells}
        entry.update(_judge(fig, cells, summary))
        summary[fig.key] = entry
    return summary


def _judge(fig: Figure, cells: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The ratio egressd/squid (or vs one worker) and pass/fail against the target."""
    if fig.key == "added_p50_ms":
        cells = {k: v for k, v in cells.items() if k != "direct"}  # the baseline, not a system's added latency
    mine = cells.get("egressd", {}).get("median")
    if fig.kind == "info":
        return {"pass": None}
    if fig.kind == "workers":
        single = summary.get("tunnels_per_s", {}).get("systems", {}).get("egressd", {}).get("median")
        ratio = mine / single if mine is not None and single else None
        return {"ratio_to_single_worker": ratio, "pass": None if ratio is None else ratio >= fig.bound}
    theirs = cells.get("squid", {}).get("median")
    ratio = mine / theirs if mine is not None and theirs else None
    if fig.kind == "abs":
        passed = None if mine is None else mine <= fig.bound
    elif ratio is None:
        passed = None
    else:
        passed = ratio >= fig.bound if fig.higher_is_better else ratio <= fig.bound
    return {"ratio_egressd_squid": ratio, "pass": passed}


def _num(value: float | None, decimals: int) -> str:
    if value is None:
        return "–"
    if decimals == 0 and abs(value) >= 10:
        return f"{value:,.0f}"
    return f"{value:,.{max(decimals, 1) if abs(value) < 10 else decimals}f}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _cell(fig: Figure, cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    if cell.get("median") is None:
        return "FAILED" if cell.get("errors") else "–"
    text = _num(cell["median"], fig.decimals)
    if cell.get("baseline"):
        text = "base " + text
    if cell.get("aux") is not None:
        text += f" ({cell['aux']:.0f})"
    if fig.key == "added_p50_ms":
        text += f" ({_ms(cell.get('p99_ms'))})"
    elif cell.get("p50_ms") is not None:
        text += f" ({_ms(cell['p50_ms'])}/{_ms(cell.get('p99_ms'))})"
    if cell.get("client_bound"):
        text += " CB"
    if cell.get("noisy_runs"):
        text += " N" if cell["noisy_runs"] == len(cell["runs"]) else f" N{cell['noisy_runs']}"
    if cell.get("errors"):
        text += f" [{len(cell['errors'])} failed]"
    return text


def table(summary: dict[str, Any], systems: tuple[str, ...] = SYSTEMS) -> str:
    head = ["figure", *systems, "egressd/squid", "better", "target", "pass"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fig in FIGURES:
        entry = summary.get(fig.key)
        if entry is None or not entry["systems"]:
            continue
        cells = [_cell(fig, entry["systems"].get(s)) for s in systems]
        if fig.kind == "info":
            ratio = ""
        elif fig.kind == "workers":
            r = entry.get("ratio_to_single_worker")
            ratio = "–" if r is None else f"{r:.2f}× 1 worker"
        else:
            r = entry.get("ratio_egressd_squid")
            ratio = "–" if r is None else f"{r:.2f}×"
        verdict = {True: "pass", False: "FAIL", None: "" if fig.kind == "info" else "n/a"}[entry["pass"]]
        better = "" if fig.kind == "info" else entry["better"]
        lines.append("| " + " | ".join([fig.label, *cells, ratio, better, fig.target, verdict]) + " |")
    return "\n".join(lines)


LEGEND = (
    "Medians of the runs; in parentheses p50/p99 latency in ms (added latency: p99). "
    "CB = client-bound: the client core (load generator + origins) was ≥90% busy, so the figure is a floor. "
    "N = noisy: other programs on this machine used ≥10% of a core during the measurement (Nk: in k runs). "
    "Added latency = the system's p50/p99 with one sequential client minus direct's in the same run "
    "(direct's column: that baseline, absolute)."
)
