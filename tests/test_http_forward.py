"""Absolute-form plain HTTP forwarding: curl and httpx through egressd to the lab's HTTP origin."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading

import httpx
import pytest

from conftest import service_yaml
from harness import raw_request, recv_all, recv_head


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
    head, _, body = recv_head(sock).partition(b"\r\n\r\n")
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


# ---------------------------------------------------------------- message framing, both ways


class ScriptedOrigin:
    """A raw TCP origin on loopback: for each connection, reads one request head, sends ``reply`` bytes and
    closes (which ends a close-delimited body, or cuts a body short)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                self.heads.append(recv_head(conn).partition(b"\r\n\r\n")[0])
                conn.sendall(self.reply)

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted():
    origins: list[ScriptedOrigin] = []

    def make(reply: bytes) -> ScriptedOrigin:
        origins.append(ScriptedOrigin(reply))
        return origins[-1]

    yield make
    for origin in origins:
        origin.stop()


def split_response(data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0].encode(), {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2 :]


@pytest.mark.parametrize(
    ("reply", "version", "expect_te", "expect_close"),
    [
        # chunked from the origin: chunked to an HTTP/1.1 client
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "1.1",
         "chunked", False),
        # close-delimited from the origin: chunked to an HTTP/1.1 client, which may keep its connection
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world", "1.1", "chunked", False),
        # chunked from the origin, HTTP/1.0 client: close-delimited, then the connection closes
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "1.0",
         None, True),
    ],
    ids=["chunked-to-1.1", "close-delimited-to-1.1", "chunked-to-1.0"],
)
def test_origin_body_framing_is_passed_on_for_the_client(lab, start_proxy, scripted, reply, version, expect_te,
                                                         expect_close):
    """Chunked and close-delimited origin bodies reach the client whole, framed as its HTTP version allows."""
    origin = scripted(reply)
    proxy = start_proxy({"svc.yaml": service_yaml(f"  - host: web.test\n    ports: [{origin.port}]\n")})
    authority = f"web.test:{origin.port}"
    request = f"GET http://{authority}/x HTTP/{version}\r\nHost: {authority}\r\n\r\n".encode()
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while not (data.endswith(b"0\r\n\r\n") if expect_te else False):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    status, headers, body = split_response(data)
    assert status.startswith(b"HTTP/1.1 200")
    assert headers.get("transfer-encoding") == expect_te
    assert (dechunk(body) if expect_te else body) == b"hello world"
    assert (headers.get("connection") == "close") == expect_close
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["status"]) == ("allow", 200) and rec["bytes_down"] == len(data)


@pytest.mark.parametrize(
    ("reply", "status", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", b"502", "upstream_failure"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", None, "upstream_failure"),
        (b"", b"502", "upstream_failure"),
    ],
    ids=["not-http", "cut-short", "closed-without-answer"],
)
def test_broken_origin_answers_become_upstream_failures(lab, start_proxy, scripted, reply, status, reason):
    """Garbage or a cut-short body from the origin: 502 if nothing was answered yet, else the client is reset;
    the request went out, so the record says allow, with the failure as its reason."""
    origin = scripted(reply)
    proxy = start_proxy({"svc.yaml": service_yaml(f"  - host: web.test\n    ports: [{origin.port}]\n")})
    authority = f"web.test:{origin.port}"
    request = f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(request)
        answer, ended = b"", "eof"
        try:
            while piece := sock.recv(65536):
                answer += piece
        except ConnectionResetError:
            ended = "reset"
    if status is None:
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"only part") and ended == "reset"
    else:
        assert answer.startswith(b"HTTP/1.1 " + status) and f"X-Egressd-Reason: {reason}".encode() in answer
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"]) == ("allow", reason)
    assert proxy.proc.poll() is None


def test_head_and_no_body_responses_end_at_their_head(lab, start_proxy):
    """HEAD keeps the origin's Content-Length without a body, 204 has none; the next request still works."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    authority = f"web.test:{lab.http.port}"
    with socket.create_connection(proxy.address, timeout=5) as sock:
        for method, path in (("HEAD", "/bytes/1000"), ("GET", "/status/204"), ("GET", "/bytes/10")):
            sock.sendall(f"{method} http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            status, headers, body = split_response(recv_head(sock))
            if path == "/bytes/10":
                while len(body) < 10:
                    body += sock.recv(65536)
            assert (status.split()[1], body, headers.get("content-length")) == {
                "/bytes/1000": (b"200", b"", "1000"),
                "/status/204": (b"204", b"", None),
                "/bytes/10": (b"200", body, "10"),
            }[path]
    records = proxy.wait_records(3)
    assert [r["status"] for r in records] == [200, 204, 200] and [r["request"] for r in records] == [1, 2, 3]


def test_chunked_request_body_pipelining_and_expect_continue(lab, start_proxy):
    """A chunked request body is re-chunked to the origin; pipelined requests are answered in order;
    ``Expect: 100-continue`` is answered by egressd before the body is sent."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    authority = f"web.test:{lab.http.port}"
    chunked = (
        f"POST http://{authority}/echo HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
    ).encode()
    plain = f"GET http://{authority}/bytes/5 HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(chunked + plain)  # two requests in one write
        first = read_response(sock)
        second = read_response(sock)
        sock.sendall(
            f"POST http://{authority}/echo HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        interim = recv_head(sock, size=1)
        sock.sendall(b"hello")
        third = read_response(sock)
    assert first.content == b"abcdefg" and len(second.content) == 5
    assert interim.startswith(b"HTTP/1.1 100 ") and third.content == b"hello"
    records = proxy.wait_records(3)
    assert [r["request"] for r in records] == [1, 2, 3] and {r["status"] for r in records} == {200}


def test_head_growing_past_the_limit_in_pieces_gets_431(lab, start_proxy):
    """A head that keeps growing over several writes is cut at --max-header-bytes with 431."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))}, "svc", "--max-header-bytes", "2048")
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n")
        with contextlib.suppress(OSError):
            for n in range(20):
                sock.sendall(f"X-Filler-{n}: ".encode() + b"a" * 500 + b"\r\n")
        answer = recv_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    [rec] = proxy.wait_records(1)
    assert (rec["reason"], rec["status"]) == ("bad_request", 431)
