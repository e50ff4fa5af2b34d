"""--workers: several processes behind one port, one admin endpoint, one audit stream of whole lines."""

from __future__ import annotations

import os
import signal

from conftest import service_yaml
from harness import raw_request, wait_for


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
