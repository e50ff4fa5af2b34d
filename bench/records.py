"""What the proxies wrote while under load: egressd's audit records, logs and metrics; Squid's access.log.

A benchmark that only counts bytes would miss a proxy that drops records or
logs errors under load, so after each system's phases the runner compares the
records written with the connections the load generators opened, and collects
every warning or error line.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from typing import Any

from bench.proxies import Started, lines_of

SETTLE_TIMEOUT = 10.0  # seconds to wait for the last records of closed tunnels


def _records(started: Started) -> list[dict[str, Any]]:
    assert started.audit is not None
    out = []
    for line in lines_of(started.audit):
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"unparsable": line[:200]})
    return out


def egressd(started: Started, expected_connect: int, expected_http: int) -> dict[str, Any]:
    """Audit record counts against what the load generators did, the log's warnings/errors, a metrics sample."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        records = [r for r in _records(started) if r.get("event") != "egress.checkpoint"]
        connects = sum(1 for r in records if r.get("protocol") == "connect")
        if connects >= expected_connect or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    https = sum(1 for r in records if r.get("protocol") == "http")
    # wrk opens one connection to check the address and closes it unused: an empty connection, recorded as
    # bad_request "closed before sending a request". Count those apart so that real denials stand out.
    empty = [r for r in records if r.get("protocol") is None and "before sending a request" in str(r.get("detail"))]
    reasons = Counter(str(r.get("reason")) for r in records if r not in empty)
    statuses = Counter(str(r.get("status")) for r in records)
    found: dict[str, Any] = {
        "records": len(records),
        "connect_records": connects,
        "expected_connect_at_least": expected_connect,
        "http_records": https,
        "expected_http_at_least": expected_http,
        "missing_connect_records": max(0, expected_connect - connects),
        "missing_http_records": max(0, expected_http - https),
        "unparsable_records": sum(1 for r in records if "unparsable" in r),
        "empty_connections": len(empty),
        "reasons": dict(reasons),
        "statuses": dict(statuses),
    }
    not_allowed = [r for r in records if r.get("reason") != "allowed" and r not in empty]
    found["not_allowed_samples"] = [
        {k: r.get(k) for k in ("protocol", "host", "port", "reason", "detail", "status")} for r in not_allowed[:5]
    ]
    found.update(log_problems(started))
    if started.admin is not None:
        found["metrics"] = _metrics(started.admin)
    return found


def log_problems(started: Started) -> dict[str, Any]:
    """Warning/error/traceback lines in the system's own logs (first few kept)."""
    lines: list[str] = []
    for path in started.logs:
        for line in lines_of(path):
            low = line.lower()
            if any(word in low for word in ('"level": "error"', '"level": "warning"', '"level": "critical"',
                                              "traceback", "error:", "fatal", "warning:")):
                lines.append(f"{path.name}: {line[:300]}")
    return {"log_problem_lines": len(lines), "log_problem_samples": lines[:8]}


def _metrics(admin: tuple[str, int]) -> dict[str, float]:
    """egressd_connections_total summed by decision, and the active connections gauge, from /metrics."""
    try:
        with socket.create_connection(admin, timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError as exc:
        return {"error": str(exc)}  # type: ignore[dict-item]
    out: Counter[str] = Counter()
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("egressd_connections_total{"):
            labels, value = line.rsplit(" ", 1)
            decision = labels.split('decision="', 1)[1].split('"', 1)[0] if 'decision="' in labels else "?"
            out[f"connections_total_{decision}"] += float(value)
        elif line.startswith("egressd_active_connections"):
            out["active_connections"] += float(line.rsplit(" ", 1)[1])
    return dict(out)


def squid(started: Started, expected_connect: int) -> dict[str, Any]:
    assert started.audit is not None
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        lines = lines_of(started.audit)
        connects = sum(1 for line in lines if " CONNECT " in line)
        if connects >= expected_connect or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    codes = Counter(line.split()[3] if len(line.split()) > 3 else "?" for line in lines)
    return {"records": len(lines), "connect_records": connects, "expected_connect_at_least": expected_connect,
            "result_codes": dict(codes.most_common(8)), **log_problems(started)}
