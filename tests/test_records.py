"""What the audit record keeps when a connection ends badly: the client, the destination, the policy, how it ended."""

from __future__ import annotations

import signal
import socket
import struct
import threading

import pytest

from conftest import service_yaml
from harness import connect_tunnel, raw_request, recv_head, wait_for

RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def web_rule(lab, host: str = "web.test") -> str:
    return f"  - host: {host}\n    ports: [{lab.http.port}]\n"


def test_client_that_resets_before_it_is_accepted_is_still_named_in_the_record(lab, start_proxy):
    """A client that sends a whole request and resets before egressd accepts it is recorded with its own address."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    authority = f"web.test:{lab.http.port}"
    clients = []
    proxy.signal(signal.SIGSTOP)  # the kernel completes the handshakes; egressd accepts only after the resets
    try:
        for _ in range(5):
            sock = socket.create_connection(proxy.address, timeout=5)
            clients.append("{}:{}".format(*sock.getsockname()[:2]))
            sock.sendall(f"GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            sock.close()
    finally:
        proxy.signal(signal.SIGCONT)
    records = proxy.wait_records(5)
    assert sorted(r["client"] for r in records) == sorted(clients)


@pytest.mark.parametrize(
    ("request_bytes", "reason", "host", "port"),
    [
        (b"GET http://web.test:81/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", "host_mismatch", "web.test", 81),
        (b"GET https://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n", "bad_request", "web.test", 443),
        (b"GET http://user@web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n", "bad_request", "web.test", 80),
        (b"GET http://web.test/ HTTP/1.1\r\n\r\n", "bad_request", "web.test", 80),
        (b"CONNECT 0x7f.1:443 HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request", None, None),
    ],
    ids=["host-mismatch", "https-url", "user-info", "no-host", "bad-authority"],
)
def test_refused_requests_keep_what_they_named_and_the_policy_version(lab, start_proxy, request_bytes, reason,
                                                                      host, port):
    """A refused request's record has the host, port and protocol it named, and the policy version in force."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    assert b"X-Egressd-Reason: " + reason.encode() in raw_request(proxy.address, request_bytes)
    [rec] = proxy.wait_records(1)
    protocol = "connect" if request_bytes.startswith(b"CONNECT") else "http"
    assert (rec["reason"], rec["host"], rec["port"], rec["protocol"]) == (reason, host, port, protocol)
    assert rec["policy_version"]


def test_garbage_is_recorded_with_the_policy_version(lab, start_proxy):
    """Bytes that are not HTTP still get a record that names the policy in force."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    raw_request(proxy.address, b"\x16\x03\x01garbage\r\n\r\n")
    [rec] = proxy.wait_records(1)
    assert rec["reason"] == "bad_request" and rec["policy_version"]


def test_http10_request_without_host_is_forwarded_by_its_absolute_url(lab, start_proxy):
    """HTTP/1.0 has no Host header: the absolute URL names the host, and the request is forwarded."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    answer = raw_request(proxy.address, f"GET http://web.test:{lab.http.port}/x HTTP/1.0\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200") and b"saw GET /x" in answer
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["host"]) == ("allow", "web.test")


def test_allowed_request_the_client_abandons_midway_stays_allowed(lab, start_proxy):
    """A request allowed and partly sent upstream, then dropped by its client, is recorded as allowed, saying how."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    authority = f"web.test:{lab.http.port}"
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(f"POST http://{authority}/echo HTTP/1.1\r\nHost: {authority}\r\n"
                     "Content-Length: 1000\r\n\r\n".encode() + b"x" * 10)
        wait_for(lambda: proxy.metric("egressd_upstream_connect_seconds_count") == 1, what="upstream connected")
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["status"]) == ("allow", "allowed", None)
    assert "in the middle of its request body" in rec["detail"] and rec["bytes_up"] > 0
    assert proxy.metric("egressd_denials_total") == 0


class ResettingOrigin:
    """Accepts one connection, sends ``hello``, then resets it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.sendall(b"hello")
        conn.settimeout(5)
        conn.recv(5)  # the client's ping: both sides have spoken
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        conn.close()


def test_origin_reset_in_a_tunnel_is_passed_on(lab, start_proxy):
    """An origin that resets a tunnel makes egressd reset the client too (not a clean end), and the record says so."""
    origin = ResettingOrigin()
    proxy = start_proxy({"svc.yaml": service_yaml(f"  - host: web.test\n    ports: [{origin.port}]\n")})
    sock, head = connect_tunnel(proxy.address, f"web.test:{origin.port}")
    assert head.startswith(b"HTTP/1.1 200")
    with sock:
        assert sock.recv(5) == b"hello"
        sock.sendall(b"ping!")
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["bytes_up"], rec["bytes_down"]) == ("allow", 5, 5)
    assert "the origin ended the connection with an error" in rec["detail"]
    origin.sock.close()


def test_plain_http_then_connect_closes_the_forwarded_upstream(lab, start_proxy):
    """A kept-alive plain-HTTP connection that then sends CONNECT gives up its origin connection at once."""
    origin = socket.create_server(("127.0.0.1", 0))
    port = origin.getsockname()[1]
    rules = f"  - host: web.test\n    ports: [{port}]\n  - host: echo.test\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rules)})
    with origin, socket.create_connection(proxy.address, timeout=5) as client:
        client.sendall(f"GET http://web.test:{port}/ HTTP/1.1\r\nHost: web.test:{port}\r\n\r\n".encode())
        upstream, _ = origin.accept()
        with upstream:
            upstream.settimeout(5)
            recv_head(upstream)
            upstream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            answer = recv_head(client)
            while not answer.endswith(b"ok"):
                piece = client.recv(100)
                assert piece, answer
                answer += piece
            client.sendall(f"CONNECT echo.test:{lab.echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert recv_head(client).startswith(b"HTTP/1.1 200")
            assert upstream.recv(100) == b""  # egressd closed the forwarded request's upstream
