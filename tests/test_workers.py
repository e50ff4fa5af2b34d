"""--workers: several processes behind one port, one admin endpoint, one audit stream of whole lines."""

from __future__ import annotations

import json
import os
import signal

from conftest import service_yaml
from egressd.metrics import Metrics
from harness import raw_request, wait_for
from test_lifecycle import policy_versions, replace_file


def test_workers_share_the_port_metrics_and_audit_stream(lab, start_proxy):
    """Two workers both serve connections; /metrics sums them; every audit line is whole JSON."""
    proxy = start_proxy({"svc.yaml": service_yaml("  - host: a.test\n")}, "svc", "--workers", "2")
    for _ in range(40):
        answer = raw_request(proxy.address, b"CONNECT nope.test:443 HTTP/1.1\r\nHost: nope.test:443\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403")
    records = proxy.wait_records(40)
    assert len(records) == 40
    assert len({r["conn_id"].split("-")[0] for r in records}) == 2  # the pid part: both workers served
    wait_for(lambda: proxy.metric("egressd_denials_total", service="svc", reason="not_allowlisted") == 40,
             what="summed denials")
    assert proxy.metric("egressd_policy_reloads_total", result="success") == 1


def test_worker_that_dies_is_replaced_and_sigterm_stops_all(lab, start_proxy):
    """A killed worker is started again; SIGTERM to the supervisor ends every worker."""
    proxy = start_proxy({"svc.yaml": service_yaml("  - host: a.test\n")}, "svc", "--workers", "2")
    started = proxy.wait_log("egressd.started")
    first, second = started["workers"]
    os.kill(first, signal.SIGKILL)
    proxy.wait_log("worker.exited")
    wait_for(lambda: sum('"worker.started"' in line for line in proxy.stderr_lines) >= 3, what="replacement")
    assert raw_request(proxy.address, b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 403")
    assert proxy.stop() == 0
    for pid in (second,):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_supervisor_reports_the_newest_version_and_the_worst_reload_status(lab, start_proxy, tmp_path):
    """With two workers, /metrics shows 0 while one worker's last load failed, then the version it loads next."""
    proxy = start_proxy({"svc.yaml": service_yaml("  - host: a.test\n")}, "svc", "--workers", "2",
                        "--reload-interval", "0")
    first, _ = proxy.wait_log("egressd.started")["workers"]

    def worker_versions() -> set | None:
        started = [json.loads(line) for line in proxy.stderr_lines if '"worker.started"' in line]
        return {line["policy_version"] for line in started} if len(started) == 2 else None

    [version] = wait_for(worker_versions, what="both workers started")
    assert policy_versions(proxy) == {version: 1.0}
    assert proxy.metric("egressd_policy_last_reload_success") == 1
    allowlist = tmp_path / "allowlists0" / "svc.yaml"
    replace_file(allowlist, "version: v1\nservice: svc\nallow:\n  - host: '*.com'\n")
    os.kill(first, signal.SIGHUP)  # only this worker loads the broken file
    proxy.wait_log("policy.reload_failed")
    wait_for(lambda: proxy.metric("egressd_policy_last_reload_success") == 0, what="one failed worker shown")
    assert policy_versions(proxy) == {version: 1.0}
    replace_file(allowlist, service_yaml("  - host: b.test\n"))
    os.kill(first, signal.SIGHUP)  # the other worker keeps the first version, loaded earlier
    fixed = proxy.wait_log("policy.loaded")["version"]
    assert fixed != version
    wait_for(lambda: proxy.metric("egressd_policy_last_reload_success") == 1, what="both workers succeeded")
    assert policy_versions(proxy) == {fixed: 1.0}


def test_merge_takes_the_newest_version_and_the_lowest_success():
    """load_sum keeps the version of the snapshot loaded last and 0 for success when one snapshot failed."""
    older, newer = Metrics(), Metrics()
    older.policy_loaded(ok=True, version="aaaa")
    newer.policy_loaded(ok=True, version="bbbb")
    newer.loaded_at = older.loaded_at + 1
    older.policy_loaded(ok=False)
    merged = Metrics()
    merged.load_sum([older.snapshot(), newer.snapshot()])
    assert (merged.version, merged.last_reload_ok) == ("bbbb", 0)
    merged.load_sum([newer.snapshot()])
    assert (merged.version, merged.last_reload_ok) == ("bbbb", 1)
    merged.load_sum([])
    assert (merged.version, merged.last_reload_ok) == (None, 0)
