"""Limits that keep one client, a restart or the file-descriptor limit from locking everybody out."""

from __future__ import annotations

import socket
import subprocess

from conftest import service_yaml
from harness import connect_tunnel, raw_request

DENIED = b"CONNECT nope.test:443 HTTP/1.1\r\nHost: nope.test:443\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_wait_on(port: int) -> bool:
    out = subprocess.run(["ss", "-Htan", "state", "time-wait", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    return bool(out.strip())


def test_worker_count_can_change_while_time_wait_holds_the_port(start_proxy):
    """Starting with --workers 2 after a --workers 1 run on the same port (and back) works despite TIME_WAIT."""
    port = free_port()
    files = {"svc.yaml": service_yaml("  - host: a.test\n")}
    for workers in ("1", "2", "1"):
        proxy = start_proxy(files, "svc", "--listen", f"127.0.0.1:{port}", "--workers", workers)
        assert raw_request(proxy.address, DENIED).startswith(b"HTTP/1.1 403")  # egressd closes first
        assert time_wait_on(port)
        assert proxy.stop() == 0


def test_one_client_address_cannot_take_every_connection(lab, start_proxy):
    """Past --max-connections-per-client one client IP gets 503 overloaded; another client IP is still served."""
    rule = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rule)}, "svc", "--max-connections-per-client", "2")
    held = [connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}") for _ in range(2)]
    assert all(head.startswith(b"HTTP/1.1 200") for _, head in held)
    answer = raw_request(proxy.address, DENIED)
    assert answer.startswith(b"HTTP/1.1 503") and b"X-Egressd-Reason: overloaded" in answer
    assert b"--max-connections-per-client" in answer
    with socket.socket() as other:
        other.bind(("127.0.0.2", 0))
        other.settimeout(5)
        other.connect(proxy.address)
        other.sendall(DENIED)
        assert other.recv(100).startswith(b"HTTP/1.1 403")
    for sock, _ in held:
        sock.close()
    records = proxy.wait_records(4)
    assert sorted(r["reason"] for r in records) == ["allowed", "allowed", "not_allowlisted", "overloaded"]
    overloaded = next(r for r in records if r["reason"] == "overloaded")
    assert overloaded["client"].startswith("127.0.0.1:") and overloaded["policy_version"]


def test_at_the_file_descriptor_limit_a_client_still_gets_an_answer_and_a_record(lab, start_proxy):
    """Under a small nofile limit egressd warns at start, serves what fits, and answers the rest 503 overloaded."""
    rule = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rule)}, "svc", wrap=["prlimit", "--nofile=160:160", "--"])
    warning = proxy.wait_log("egressd.fd_limit")
    capacity = warning["serving"]
    assert 0 < capacity < 48
    tunnels, answers = [], []
    try:
        for _ in range(capacity + 20):
            sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
            tunnels.append(sock)
            answers.append(head.split(b"\r\n")[0])
        assert answers.count(b"HTTP/1.1 200 Connection established") == capacity
        assert answers.count(b"HTTP/1.1 503 Service Unavailable") == 20
    finally:
        for sock in tunnels:
            sock.close()
    records = proxy.wait_records(capacity + 20)
    assert sorted({r["reason"] for r in records}) == ["allowed", "overloaded"]
    assert "file-descriptor limit" in next(r for r in records if r["reason"] == "overloaded")["detail"]
