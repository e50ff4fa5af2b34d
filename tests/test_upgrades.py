"""Protocol upgrades on forwarded requests: h2c offers are dropped (body kept), WebSocket is carried through."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading

import aiohttp
import pytest
from websockets.sync.server import serve as ws_serve

from conftest import service_yaml
from harness import recv_head


def web_rule(lab, host: str = "web.test") -> str:
    return f"  - host: {host}\n    ports: [{lab.http.port}]\n"


def test_curl_http2_upgrade_offer_with_a_body_is_forwarded_body_and_all(lab, start_proxy):
    """curl --http2 -d through the proxy: the h2c offer is dropped; the body reaches the origin, its echo the client."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--http2", "-x", f"http://{proxy.address[0]}:{proxy.address[1]}",
         "-d", "hello", f"http://web.test:{lab.http.port}/echo"],
        capture_output=True, text=True, timeout=20,
    )
    assert (out.returncode, out.stdout) == (0, "hello"), out.stderr
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["status"]) == ("allow", "allowed", 200)
    seen = lab.http.requests[-1]
    assert (seen.method, seen.body_length) == ("POST", 5)


def test_upgrade_offers_keep_the_connection_alive_and_say_close_when_it_ends(lab, start_proxy):
    """After a refused h2c offer the connection takes the next request; an HTTP/1.0 one ends with Connection: close."""
    proxy = start_proxy({"svc.yaml": service_yaml(web_rule(lab))})
    authority = f"web.test:{lab.http.port}"
    offer = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(f"POST http://{authority}/echo HTTP/1.1\r\nHost: {authority}\r\n{offer}"
                     f"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".encode())
        head = recv_head(sock)
        while not head.endswith(b"abc"):  # the body may come in a segment of its own
            piece = sock.recv(100)
            assert piece, head
            head += piece
        assert head.startswith(b"HTTP/1.1 200") and b"upgrade" not in head.lower()
        sock.sendall(f"GET http://{authority}/status/204 HTTP/1.0\r\nHost: {authority}\r\n{offer}\r\n".encode())
        head = recv_head(sock)
        assert head.startswith(b"HTTP/1.1 204") and b"connection: close" in head.lower()
        assert sock.recv(100) == b""
    records = proxy.wait_records(2)
    assert [(r["request"], r["status"]) for r in records] == [(1, 200), (2, 204)]
    assert "http2-settings" not in str(lab.http.requests[-1]).lower()


@pytest.fixture
def ws_origin():
    """A real WebSocket server (the websockets library) on loopback that echoes each message in upper case."""

    def handler(connection):
        for message in connection:
            connection.send(message.upper())

    server = ws_serve(handler, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()
    thread.join(5)


def test_aiohttp_websocket_through_the_proxy_is_carried_through(start_proxy, ws_origin):
    """aiohttp's ws:// through an HTTP proxy (GET ws://... with Upgrade) gets 101, then messages flow both ways."""
    proxy = start_proxy({"svc.yaml": service_yaml(f"  - host: web.test\n    ports: [{ws_origin}]\n")})

    async def talk() -> list[str]:
        async with aiohttp.ClientSession() as session, session.ws_connect(
            f"ws://web.test:{ws_origin}/chat", proxy=f"http://{proxy.address[0]}:{proxy.address[1]}",
            timeout=aiohttp.ClientWSTimeout(ws_receive=10, ws_close=10),
        ) as ws:
            answers = []
            for word in ("hello", "again"):
                await ws.send_str(word)
                answers.append((await ws.receive(timeout=10)).data)
            return answers

    assert asyncio.run(talk()) == ["HELLO", "AGAIN"]
    [rec] = proxy.wait_records(1)
    assert (rec["protocol"], rec["decision"], rec["reason"], rec["status"]) == ("websocket", "allow", "allowed", 101)
    assert rec["host"] == "web.test" and rec["bytes_up"] > 20 and rec["bytes_down"] > 20


def test_websocket_to_a_name_not_allowed_is_denied(lab, start_proxy, ws_origin):
    """A WebSocket upgrade is decided like any request: a name outside the allowlist gets 403, nothing is sent."""
    proxy = start_proxy({"svc.yaml": service_yaml(f"  - host: web.test\n    ports: [{ws_origin}]\n")})
    authority = f"api.test:{ws_origin}"
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(f"GET ws://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n"
                     "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        head = recv_head(sock)
    assert head.startswith(b"HTTP/1.1 403") and b"X-Egressd-Reason: not_allowlisted" in head
    [rec] = proxy.wait_records(1)
    assert (rec["protocol"], rec["host"], rec["reason"]) == ("http", "api.test", "not_allowlisted")
