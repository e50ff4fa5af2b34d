"""The proxy as a process: metrics, readiness, reload, limits, timeouts and shutdown, one record per path."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from conftest import service_yaml
from harness import connect_tunnel, http_get, raw_request, recv_all, wait_for


def echo_rule(lab, host: str = "echo.test") -> str:
    return f"  - host: {host}\n    ports: [{lab.echo.port}]\n"


def connect(proxy, authority: str) -> bytes:
    return raw_request(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())


def policy_versions(proxy) -> dict[str, float]:
    """Every egressd_policy_info series of the proxy's /metrics: {version: value}."""
    found = {}
    for line in proxy.metrics().splitlines():
        if line.startswith("egressd_policy_info{"):
            sample, value = line.rsplit(" ", 1)
            found[sample.split('version="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def replace_file(path: Path, text: str) -> None:
    """Write path's new text in one rename, so that a reload never reads it half written."""
    staged = path.parent.parent / f".{path.name}.new"
    staged.write_text(text)
    os.replace(staged, path)


def opens(proxy, authority: str) -> bool:
    """Whether a CONNECT to authority is answered 200 (the tunnel is closed again at once)."""
    sock, head = connect_tunnel(proxy.address, authority)
    sock.close()
    return head.startswith(b"HTTP/1.1 200")


def test_every_outcome_counts_once_in_metrics(lab, start_proxy):
    """Each connection adds one to connections_total, and each denial one to denials_total, with closed labels."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))})
    assert http_get(proxy.admin, "/readyz")[0] == 200 and http_get(proxy.admin, "/healthz")[0] == 200
    sock, _ = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    sock.sendall(b"abc")
    assert sock.recv(3) == b"abc"
    sock.close()
    connect(proxy, "nope.test:443")
    connect(proxy, "nope.test:443")
    proxy.wait_records(3)
    wait_for(lambda: proxy.metric("egressd_connections_total", reason="allowed") == 1, what="allowed counted")
    assert proxy.metric("egressd_connections_total", service="svc", listener="explicit", decision="deny",
                        reason="not_allowlisted") == 2
    assert proxy.metric("egressd_denials_total", service="svc", reason="not_allowlisted") == 2
    assert proxy.metric("egressd_bytes_total", service="svc", direction="up") == 3
    assert proxy.metric("egressd_bytes_total", service="svc", direction="down") == 3
    assert proxy.metric("egressd_dns_lookup_seconds_count") == 1
    assert proxy.metric("egressd_upstream_connect_seconds_count") == 1
    assert proxy.metric("egressd_policy_reloads_total", result="success") == 1
    assert proxy.metric("egressd_policy_loaded_timestamp_seconds") > 0
    assert "nope.test" not in proxy.metrics()


def test_active_connections_gauge_follows_open_tunnels(lab, start_proxy):
    """egressd_active_connections counts a tunnel while it is open and drops when it closes."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))})
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    wait_for(lambda: proxy.metric("egressd_active_connections", service="svc") == 1, what="gauge 1")
    sock.close()
    wait_for(lambda: proxy.metric("egressd_active_connections", service="svc") == 0, what="gauge 0")


def test_file_change_reloads_and_bad_file_keeps_last_good_policy(lab, start_proxy, tmp_path):
    """A changed allowlist applies without restart; a broken one is refused, counted, and the old one kept."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))})
    directory = tmp_path / "allowlists0"
    tunnel, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    (directory / "svc.yaml").write_text(service_yaml(echo_rule(lab) + echo_rule(lab, "api.test")))
    proxy.wait_log("policy.loaded")
    wait_for(lambda: proxy.metric("egressd_policy_reloads_total", result="success") == 2, what="reload")
    assert opens(proxy, f"api.test:{lab.echo.port}")
    (directory / "svc.yaml").write_text("version: v1\nservice: svc\nallow:\n  - host: '*.com'\n")
    failed = proxy.wait_log("policy.reload_failed")
    assert any("svc.yaml:4" in e for e in failed["errors"])
    wait_for(lambda: proxy.metric("egressd_policy_reloads_total", result="error") >= 1, what="error counted")
    assert opens(proxy, f"api.test:{lab.echo.port}")
    tunnel.sendall(b"still here")
    assert tunnel.recv(10) == b"still here"
    tunnel.close()


def test_policy_version_and_last_reload_status_follow_the_loads(lab, start_proxy, tmp_path):
    """policy_info names the version in force and last_reload_success is 1, 0 after a failed load, 1 after a fix."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))})
    first = proxy.wait_log("egressd.started")["policy_version"]
    assert first
    assert policy_versions(proxy) == {first: 1.0}
    assert proxy.metric("egressd_policy_last_reload_success") == 1
    allowlist = tmp_path / "allowlists0" / "svc.yaml"
    replace_file(allowlist, "version: v1\nservice: svc\nallow:\n  - host: '*.com'\n")
    proxy.wait_log("policy.reload_failed")
    wait_for(lambda: proxy.metric("egressd_policy_last_reload_success") == 0, what="the failed load in metrics")
    assert policy_versions(proxy) == {first: 1.0}
    replace_file(allowlist, service_yaml(echo_rule(lab) + echo_rule(lab, "api.test")))
    fixed = proxy.wait_log("policy.loaded")["version"]
    assert fixed != first
    wait_for(lambda: proxy.metric("egressd_policy_last_reload_success") == 1, what="the fixed load in metrics")
    assert policy_versions(proxy) == {fixed: 1.0}


def test_sighup_reloads(lab, start_proxy, tmp_path):
    """SIGHUP loads the allowlists again even when file polling is off."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))}, "svc", "--reload-interval", "0")
    (tmp_path / "allowlists0" / "svc.yaml").write_text(service_yaml(echo_rule(lab, "api.test")))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: proxy.metric("egressd_policy_reloads_total", result="success") == 2, what="SIGHUP reload")
    assert connect(proxy, f"echo.test:{lab.echo.port}").startswith(b"HTTP/1.1 403")


def test_sigterm_drains_then_records_open_tunnels(lab, start_proxy):
    """On SIGTERM the proxy stops accepting, waits --drain-timeout, closes what is left and writes its record."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))}, "svc", "--drain-timeout", "0.3")
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    sock.sendall(b"12345")
    assert sock.recv(5) == b"12345"
    assert proxy.stop() == 0
    assert recv_all(sock) == b""
    sock.close()
    [rec] = proxy.records()
    assert (rec["decision"], rec["reason"], rec["bytes_up"], rec["bytes_down"]) == ("allow", "allowed", 5, 5)
    assert "shut down" in rec["detail"]


def test_max_connections_answers_503(lab, start_proxy):
    """Past --max-connections a new client gets 503 overloaded and a record."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))}, "svc", "--max-connections", "1")
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    answer = connect(proxy, f"echo.test:{lab.echo.port}")
    assert answer.startswith(b"HTTP/1.1 503") and b"X-Egressd-Reason: overloaded" in answer
    sock.close()
    records = proxy.wait_records(2)
    assert sorted(r["reason"] for r in records) == ["allowed", "overloaded"]


def test_idle_tunnel_is_closed_and_recorded(lab, start_proxy):
    """A tunnel silent for --idle-timeout is closed by the proxy, with its record."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))}, "svc", "--idle-timeout", "0.3")
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.settimeout(10)
    assert recv_all(sock) == b""
    sock.close()
    [rec] = proxy.wait_records(1)
    assert rec["decision"] == "allow" and rec["duration_ms"] >= 300


def test_client_that_says_nothing_still_gets_a_record(lab, start_proxy):
    """A client that connects and hangs up without a request is recorded as bad_request, once."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))})
    socket.create_connection(proxy.address, timeout=5).close()
    [rec] = proxy.wait_records(1)
    assert rec["reason"] == "bad_request" and "before sending a request" in rec["detail"]


def test_half_close_passes_through(lab, start_proxy):
    """EOF from the client reaches the origin as a half-close, and the origin's answer still comes back."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))})
    sock, _ = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    sock.sendall(b"last words")
    sock.shutdown(socket.SHUT_WR)
    assert recv_all(sock) == b"last words"
    sock.close()
    [rec] = proxy.wait_records(1)
    assert rec["bytes_up"] == 10 and rec["bytes_down"] == 10


def test_every_path_writes_exactly_one_record_and_one_count(lab, start_proxy):
    """Allowed, denied, malformed, DNS failure, refused upstream, SNI mismatch, client reset: one record each."""
    rules = echo_rule(lab) + f"  - host: api.test\n    ports: [{lab.tls.port}]\n    tls: true\n" + (
        f"  - host: servfail.test\n  - host: closed.test\n    ports: [{lab.closed_port}]\n"
    )
    proxy = start_proxy({"svc.yaml": service_yaml(rules)})
    assert opens(proxy, f"echo.test:{lab.echo.port}")
    connect(proxy, "nope.test:443")
    raw_request(proxy.address, b"BREW /pot HTCPCP/1.0\r\n\r\n")
    connect(proxy, "servfail.test:443")
    connect(proxy, f"closed.test:{lab.closed_port}")
    sock, _ = connect_tunnel(proxy.address, f"api.test:{lab.tls.port}")
    sock.sendall(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00")  # a ClientHello cut short, then a reset
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    proxy.wait_records(6)
    total = sum(
        float(line.rsplit(" ", 1)[1]) for line in proxy.metrics().splitlines()
        if line.startswith("egressd_connections_total{")
    )
    assert total == 6
    assert proxy.stop() == 0
    records = proxy.records()
    reasons = sorted(r["reason"] for r in records)
    assert reasons == sorted(
        ["allowed", "not_allowlisted", "bad_request", "dns_failure", "upstream_failure", "sni_missing"]
    )
    assert len({r["conn_id"] for r in records}) == len(records)


def test_tunnel_carries_bulk_bytes_intact_under_back_pressure(lab, start_proxy):
    """16 MiB through a tunnel to an echo origin, read slowly, come back byte for byte in order."""
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))})
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    pattern = bytes(range(251)) * 4096  # 1,028,096 bytes, period 251: a shifted or dropped chunk shows
    total = len(pattern) * 16

    def send() -> None:
        for _ in range(16):
            sock.sendall(pattern)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    sock.settimeout(20)
    while len(received) < total:
        chunk = sock.recv(7000)
        assert chunk, "tunnel closed early"
        received += chunk
    sender.join(20)
    sock.close()
    assert received == pattern * 16
    [rec] = proxy.wait_records(1)
    assert rec["bytes_up"] == total and rec["bytes_down"] == total
