"""Limits that keep one client, a restart or the file-descriptor limit from locking everybody out."""

from __future__ import annotations

import resource
import socket
import subprocess

import pytest

from conftest import service_yaml
from egressd.lab.dns import Slow
from harness import connect_tunnel, raw_request, recv_head, wait_for

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


def test_a_refused_client_record_names_the_limit(lab, start_proxy):
    """Refusals at accept carry the limit's name in the record and count in egressd_limit_hits_total."""
    rule = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rule)}, "svc", "--max-connections", "1")
    held, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    assert raw_request(proxy.address, DENIED).startswith(b"HTTP/1.1 503")
    held.close()
    refused = next(r for r in proxy.wait_records(2) if r["reason"] == "overloaded")
    assert refused["limit"] == "max_connections" and "the --max-connections limit" in refused["detail"]
    assert 'egressd_limit_hits_total{limit="max_connections"} 1.0' in proxy.metrics()


SLOW_CLIENTS = 2000  # connections that never finish their head, from 20 addresses
SLOW_ADDRESSES = [f"127.0.1.{n}" for n in range(1, 21)]


def test_thousands_of_slow_heads_push_out_their_own_and_a_normal_client_is_served(lab, start_proxy):
    """Past --max-pending-heads the oldest unfinished head of the client with the most is reset; a client that
    finishes its head is served at once, and each reset head has a record naming the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * SLOW_CLIENTS + 512  # this process's sockets and the proxy's
    if hard < needed:
        pytest.skip(f"the hard nofile limit {hard} is below the {needed} descriptors this test holds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    rule = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rule)}, "svc", "--max-pending-heads", "256",
                        "--max-connections", "10000", "--header-timeout", "60")
    slow: list[socket.socket] = []
    try:
        for n in range(SLOW_CLIENTS):
            sock = socket.socket()
            sock.bind((SLOW_ADDRESSES[n % len(SLOW_ADDRESSES)], 0))
            sock.connect(proxy.address)
            sock.sendall(b"CONNECT echo.te")  # and never the rest
            slow.append(sock)
        # a normal client, from an address that holds nothing: its head is complete, so it is decided and served
        with socket.socket() as normal:
            normal.settimeout(10)
            normal.bind(("127.0.0.1", 0))
            normal.connect(proxy.address)
            normal.sendall(f"CONNECT echo.test:{lab.echo.port} HTTP/1.1\r\nHost: echo.test\r\n\r\n".encode())
            assert recv_head(normal, size=1).startswith(b"HTTP/1.1 200")
            normal.sendall(b"ping")
            assert normal.recv(4) == b"ping"
        evicted = SLOW_CLIENTS + 1 - 256  # the normal client took a slot too, while its head arrived
        records = proxy.wait_records(evicted + 1, timeout=30)
        reset = [r for r in records if r["reason"] == "overloaded"]
        assert len(reset) == evicted and {r["limit"] for r in reset} == {"max_pending_heads"}
        assert {r["client"].rsplit(":", 1)[0] for r in reset} <= set(SLOW_ADDRESSES)
        assert "the client with the most; its oldest was reset, the --max-pending-heads limit" in reset[0]["detail"]
        assert [r["reason"] for r in records if r["reason"] != "overloaded"] == ["allowed"]
        assert f'egressd_limit_hits_total{{limit="max_pending_heads"}} {float(evicted)}' in proxy.metrics()
    finally:
        for sock in slow:
            sock.close()


def test_past_max_pending_lookups_a_new_name_is_refused_at_once_and_cached_names_are_served(lab, start_proxy):
    """While --max-pending-lookups names wait for a slow DNS server, one more name gets 503 overloaded at once;
    a name in the cache is still served; once the answers come, new names are looked up again."""
    lab.dns.zone.update({f"slow{n}.lim.test": Slow(2.0, ("127.0.0.1",)) for n in range(3)})
    lab.dns.zone["fast.lim.test"] = ("127.0.0.1",)
    rules = f"  - host: '*.lim.test'\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rules)}, "svc", "--max-pending-lookups", "2")
    port = lab.echo.port
    cached, head = connect_tunnel(proxy.address, f"fast.lim.test:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    cached.close()
    waiting = [socket.create_connection(proxy.address, timeout=10) for _ in range(2)]
    try:
        for n, sock in enumerate(waiting):
            sock.sendall(f"CONNECT slow{n}.lim.test:{port} HTTP/1.1\r\n\r\n".encode())
        wait_for(lambda: "egressd_dns_cache_lookups_total{result=\"miss\"} 3.0" in proxy.metrics(), 10,
                 "both slow names being looked up")
        answer = raw_request(proxy.address, f"CONNECT slow2.lim.test:{port} HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 503") and b"X-Egressd-Reason: overloaded" in answer
        assert b"2 names are being looked up, the --max-pending-lookups limit" in answer
        again, head = connect_tunnel(proxy.address, f"fast.lim.test:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        again.close()
        for sock in waiting:
            assert recv_head(sock, size=1).startswith(b"HTTP/1.1 200")
    finally:
        for sock in waiting:
            sock.close()
    later, head = connect_tunnel(proxy.address, f"slow2.lim.test:{port}", timeout=10)
    assert head.startswith(b"HTTP/1.1 200")
    later.close()
    refused = [r for r in proxy.wait_records(6) if r["reason"] == "overloaded"]
    assert [(r["host"], r["limit"]) for r in refused] == [("slow2.lim.test", "max_pending_lookups")]
