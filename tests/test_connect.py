"""CONNECT tunnels end to end: real curl, openssl s_client and httpx through egressd to lab origins."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess

import httpx
import pytest

from conftest import service_yaml
from harness import connect_tunnel, raw_request, recv_all

RECORD_FIELDS = {
    "event", "ts", "conn_id", "service", "client", "listener", "protocol", "host", "port", "sni", "decision",
    "would_deny", "reason", "rule", "policy_version", "resolved", "upstream", "bytes_up", "bytes_down",
    "duration_ms", "dns_ms", "connect_ms",
}


def tls_rule(lab, host: str = "api.test") -> str:
    return f"  - host: {host}\n    ports: [{lab.tls.port}]\n    tls: true\n"


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20)


def test_curl_through_allowed_tunnel_reaches_origin_and_is_recorded(lab, start_proxy):
    """An allowlisted name is tunnelled to the address egressd resolved, and one complete record is written."""
    proxy = start_proxy({"svc.yaml": service_yaml(tls_rule(lab))})
    url = f"https://api.test:{lab.tls.port}/hello"
    out = curl("-x", f"http://{proxy.address[0]}:{proxy.address[1]}", "--cacert", str(lab.ca_file), url)
    assert out.returncode == 0, out.stderr
    assert "tls-origin saw GET /hello host=api.test" in out.stdout
    assert "sni=api.test" in out.stdout
    [rec] = proxy.wait_records(1)
    assert RECORD_FIELDS <= set(rec)
    assert rec["event"] == "egress.connection"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", rec["ts"])
    outcome = (rec["decision"], rec["reason"], rec["protocol"], rec["listener"])
    assert outcome == ("allow", "allowed", "connect", "explicit")
    assert (rec["host"], rec["port"], rec["sni"], rec["service"]) == ("api.test", lab.tls.port, "api.test", "svc")
    assert rec["rule"].endswith("svc.yaml:5")
    assert rec["resolved"] == ["127.0.0.1"] and rec["upstream"] == f"127.0.0.1:{lab.tls.port}"
    assert rec["bytes_up"] > 200 and rec["bytes_down"] > 200
    assert rec["duration_ms"] > 0 and rec["connect_ms"] >= 0 and rec["dns_ms"] > 0
    assert rec["client"].startswith("127.0.0.1:") and rec["would_deny"] is False
    assert len(rec["policy_version"]) == 16


def test_denied_name_gets_403_with_reason_and_is_never_resolved(lab, start_proxy):
    """A name outside the allowlist is refused with 403 and X-Egressd-Reason, and no DNS query is made for it."""
    proxy = start_proxy({"svc.yaml": service_yaml(tls_rule(lab))})
    answer = raw_request(proxy.address, b"CONNECT secret-leak.test:443 HTTP/1.1\r\nHost: secret-leak.test:443\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"X-Egressd-Reason: not_allowlisted" in head
    assert body.decode().count("\n") == 1
    assert "secret-leak.test:443" in body.decode() and "svc" in body.decode() and "not_allowlisted" in body.decode()
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["rule"], rec["resolved"]) == ("deny", "not_allowlisted", None, [])
    assert all(name != "secret-leak.test" for name, _ in lab.dns.queries)


@pytest.mark.parametrize(
    ("authority", "reason"),
    [
        ("api.test:8443", "port_not_allowed"),
        ("blocked.api.test:{port}", "denylisted"),
        ("api.test.evil.test:{port}", "not_allowlisted"),
        ("127.0.0.1:{port}", "not_allowlisted"),
    ],
)
def test_policy_denials_table(lab, start_proxy, authority, reason):
    """Port, global deny, label-boundary and IP-literal denials each get 403 with their reason."""
    files = {
        "svc.yaml": service_yaml(tls_rule(lab, "'**.api.test'") + tls_rule(lab)),
        "_global.yaml": "version: v1\nglobal: true\ndeny:\n  - host: blocked.api.test\n",
    }
    proxy = start_proxy(files)
    authority = authority.format(port=lab.tls.port)
    answer = raw_request(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 ") and f"X-Egressd-Reason: {reason}".encode() in answer
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"]) == ("deny", reason)


def test_ip_literal_matches_only_cidr_rules(lab, start_proxy):
    """CONNECT to an IP literal is allowed by a cidr: rule, with no DNS lookup and no SNI required."""
    rules = f"  - cidr: 127.0.0.0/8\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rules)})
    sock, head = connect_tunnel(proxy.address, f"127.0.0.1:{lab.echo.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["dns_ms"], rec["resolved"]) == ("allow", "allowed", None, ["127.0.0.1"])
    assert rec["bytes_up"] == 4 and rec["bytes_down"] == 4


@pytest.mark.parametrize(
    "authority",
    ["0177.0.0.1:443", "0x7f.0.0.1:443", "2130706433:443", "127.1:443", "[fe80::1%25eth0]:443", "api.test", "a..b:443"],
)
def test_alternative_ip_encodings_are_bad_requests(lab, start_proxy, authority):
    """Octal, hex, integer and short IPv4 forms, zone IDs and malformed authorities get 400 bad_request."""
    proxy = start_proxy({"svc.yaml": service_yaml(tls_rule(lab))})
    answer = raw_request(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 ") and b"X-Egressd-Reason: bad_request" in answer
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"]) == ("deny", "bad_request")


def test_openssl_with_spoofed_sni_is_cut_before_any_upstream_byte(lab, start_proxy):
    """A ClientHello whose SNI differs from the CONNECT host closes the tunnel; the origin receives nothing."""
    rules = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n    tls: true\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rules)})
    before = lab.echo.bytes_received
    out = subprocess.run(
        ["openssl", "s_client", "-proxy", f"{proxy.address[0]}:{proxy.address[1]}",
         "-connect", f"echo.test:{lab.echo.port}", "-servername", "evil.test", "-brief"],
        input="", capture_output=True, text=True, timeout=20,
    )
    assert out.returncode != 0
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["sni"]) == ("deny", "sni_mismatch", "evil.test")
    assert rec["bytes_up"] == 0
    assert lab.echo.bytes_received == before


def test_non_tls_bytes_on_tls_port_are_sni_missing(lab, start_proxy):
    """Plain bytes where a ClientHello must come close the tunnel with sni_missing, nothing forwarded."""
    rules = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n    tls: true\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rules)})
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n")
        assert recv_all(sock) == b""
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["bytes_up"]) == ("deny", "sni_missing", 0)


def test_tls_without_sni_is_sni_missing(lab, start_proxy):
    """A ClientHello without server_name to a named host is refused with sni_missing."""
    proxy = start_proxy({"svc.yaml": service_yaml(tls_rule(lab))})
    sock, head = connect_tunnel(proxy.address, f"api.test:{lab.tls.port}")
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    ctx.check_hostname = False
    with sock, pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(sock, server_hostname=None)
    [rec] = proxy.wait_records(1)
    assert (rec["reason"], rec["sni"]) == ("sni_missing", None)


def test_httpx_unicode_name_is_normalised_to_punycode(lab, start_proxy):
    """httpx through the proxy to an IDN: allowlist, CONNECT host and SNI all compare as punycode."""
    proxy = start_proxy({"svc.yaml": service_yaml(tls_rule(lab, "bücher.test"))})
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    with httpx.Client(proxy=f"http://{proxy.address[0]}:{proxy.address[1]}", verify=ctx, timeout=10) as client:
        response = client.get(f"https://xn--bcher-kva.test:{lab.tls.port}/idn")
    assert response.status_code == 200 and "sni=xn--bcher-kva.test" in response.text
    [rec] = proxy.wait_records(1)
    assert (rec["host"], rec["sni"], rec["reason"]) == ("xn--bcher-kva.test", "xn--bcher-kva.test", "allowed")


def test_pipelined_client_hello_after_connect_is_accepted(lab, start_proxy):
    """Bytes sent right behind the CONNECT head (no wait for 200) are kept and checked as the ClientHello."""
    proxy = start_proxy({"svc.yaml": service_yaml(tls_rule(lab))})
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="api.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    authority = f"api.test:{lab.tls.port}"
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + hello)
        data = sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
    [rec] = proxy.wait_records(1)
    assert (rec["reason"], rec["sni"]) == ("allowed", "api.test")
    assert rec["bytes_up"] == len(hello)


def test_silent_client_on_tls_port_times_out_as_sni_missing(lab, start_proxy):
    """A tunnel to a TLS port where no ClientHello arrives within --hello-timeout is closed, sni_missing."""
    proxy = start_proxy({"svc.yaml": service_yaml(tls_rule(lab))}, "svc", "--hello-timeout", "0.3")
    sock, head = connect_tunnel(proxy.address, f"api.test:{lab.tls.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200")
        sock.settimeout(10)
        assert recv_all(sock) == b""
    [rec] = proxy.wait_records(1)
    assert rec["reason"] == "sni_missing" and "within 0.3s" in rec["detail"] and rec["bytes_up"] == 0
