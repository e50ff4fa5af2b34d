"""Absolute-form plain HTTP forwarding: curl and httpx through egressd to the lab's HTTP origin."""

from __future__ import annotations

import socket
import subprocess

import httpx

from conftest import service_yaml
from harness import raw_request, recv_all


def web_rule(lab, host: str = "web.test") -> str:
    return f"  - host: {host}\n    ports: [{lab.http.port}]\n"


def test_curl_plain_http_is_forwarded_in_origin_form(lab, start_proxy):
    """curl -x with an http:// URL is forwarded to the pinned address in origin-form, proxy headers removed."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    url = f"http://web.test:{lab.http.port}/path?q=1"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", f"http://{proxy.address[0]}:{proxy.address[1]}",
         "-H", "Proxy-Authorization: Basic c2VjcmV0", url],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert f"http-origin saw GET /path?q=1 host=web.test:{lab.http.port}" in out.stdout
    [rec] = proxy.wait_records(1)
    assert (rec["protocol"], rec["decision"], rec["reason"], rec["status"]) == ("http", "allow", "allowed", 200)
    assert rec["upstream"] == f"127.0.0.1:{lab.http.port}" and rec["bytes_up"] > 0 and rec["bytes_down"] > 0


def test_keep_alive_checks_every_request(lab, start_proxy):
    """On one kept-alive client connection each request is decided again and gets its own numbered record."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    with socket.create_connection(proxy.address, timeout=5) as sock:
        responses = []
        for host in ("web.test", "web.test", "api.test"):
            authority = f"{host}:{lab.http.port}"
            sock.sendall(f"GET http://{authority}/{host} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            responses.append(read_response(sock))
    assert [r.status_code for r in responses] == [200, 200, 403]
    assert responses[2].headers["x-egressd-reason"] == "not_allowlisted"
    records = proxy.wait_records(3)
    assert [r["reason"] for r in records] == ["allowed", "allowed", "not_allowlisted"]
    assert [r["request"] for r in records] == [1, 2, 3]
    assert len({r["conn_id"] for r in records}) == 1 and len({r["client"] for r in records}) == 1
    assert lab.http.requests[-1].connection == lab.http.requests[-2].connection


def read_response(sock: socket.socket) -> httpx.Response:
    """Read one Content-Length framed response from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int({k.lower(): v for k, v in headers.items()}["content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


def test_request_body_and_chunked_response_pass_through(lab, start_proxy):
    """A POST body reaches the origin and a large response comes back whole."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    with httpx.Client(proxy=f"http://{proxy.address[0]}:{proxy.address[1]}", timeout=10) as client:
        echoed = client.post(f"http://web.test:{lab.http.port}/echo", content=b"x" * 100_000)
        big = client.get(f"http://web.test:{lab.http.port}/bytes/3000000")
    assert echoed.content == b"x" * 100_000
    assert len(big.content) == 3_000_000
    records = proxy.wait_records(2)
    assert records[0]["bytes_up"] > 100_000 and records[1]["bytes_down"] > 3_000_000


def test_host_header_must_name_the_url_host(lab, start_proxy):
    """A Host header naming another site than the absolute-form URL is denied host_mismatch."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    request = f"GET http://web.test:{lab.http.port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode()
    answer = raw_request(proxy.address, request)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"X-Egressd-Reason: host_mismatch" in answer
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"]) == ("deny", "host_mismatch")
    assert not any(r.target == "/" and r.host == "evil.test" for r in lab.http.requests)


def test_bad_requests_get_400_and_a_record(lab, start_proxy):
    """Garbage, origin-form, https URLs, user-info, oversized heads and CL+TE get 4xx bad_request, one record each."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))}, "svc", "--max-header-bytes", "2048")
    cases = [
        (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
        (b"GET /local HTTP/1.1\r\nHost: web.test\r\n\r\n", b"400"),
        (b"GET https://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n", b"400"),
        (b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n", b"431"),
        (b"GET http://user@web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n", b"400"),
        (
            b"POST http://web.test/ HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
        ),
    ]
    for request, status in cases:
        answer = raw_request(proxy.address, request)
        assert answer.startswith(b"HTTP/1.1 " + status), (request, answer)
        assert b"X-Egressd-Reason: bad_request" in answer
    records = proxy.wait_records(len(cases))
    assert [r["reason"] for r in records] == ["bad_request"] * len(cases)
    assert proxy.proc.poll() is None


def test_slow_header_times_out_with_408(lab, start_proxy):
    """A client that never finishes its request head gets 408 after --header-timeout."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))}, "svc", "--header-timeout", "0.3")
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET http://web.test/ HTTP/1.1\r\n")
        answer = recv_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    [rec] = proxy.wait_records(1)
    assert rec["reason"] == "bad_request" and rec["status"] == 408
