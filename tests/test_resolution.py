"""Resolution and pinning end to end: forbidden answers, DNS failures, fallback, connect failures.

Tests here whose DNS answers name addresses the proxy must refuse are marked
``isolated``: they run only inside the private network namespace tests/run makes.
"""

from __future__ import annotations

import socket

import pytest

from conftest import service_yaml
from harness import connect_tunnel, raw_request


def rule(host: str, port: int, tls: bool = False) -> str:
    return f"  - host: {host}\n    ports: [{port}]\n" + ("    tls: true\n" if tls else "")


def connect(proxy, authority: str) -> bytes:
    return raw_request(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())


@pytest.mark.isolated
@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("metadata.test", "169.254.169.254"),
        ("private.test", "10.0.0.1"),
        ("mapped.test", "10.0.0.1"),
    ],
)
def test_forbidden_answers_are_refused_without_dialling(lab, start_proxy, name, refused):
    """A name whose every answer is metadata, private or an IPv4-mapped private address is denied forbidden_address."""
    proxy = start_proxy({"svc.yaml": service_yaml(rule(name, 443))})
    answer = connect(proxy, f"{name}:443")
    assert answer.startswith(b"HTTP/1.1 403 ") and b"X-Egressd-Reason: forbidden_address" in answer
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["upstream"]) == ("deny", "forbidden_address", None)
    assert refused in rec["detail"] and rec["resolved"]


@pytest.mark.isolated
def test_mixed_answer_dials_only_the_allowed_address(lab, start_proxy):
    """Of a private and a loopback (re-admitted) answer, only the re-admitted one is dialled."""
    proxy = start_proxy({"svc.yaml": service_yaml(rule("mixed.test", lab.tls.port, tls=True))})
    sock, head = connect_tunnel(proxy.address, f"mixed.test:{lab.tls.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    [rec] = proxy.wait_records(1)
    assert sorted(rec["resolved"]) == ["10.0.0.1", "127.0.0.1"] and rec["upstream"] == f"127.0.0.1:{lab.tls.port}"
    assert "10.0.0.1" in rec["detail"]


@pytest.mark.isolated
def test_audit_mode_never_lets_forbidden_addresses_through(lab, start_proxy):
    """mode: audit allows a name outside the allowlist (would_deny) but still refuses a metadata answer."""
    proxy = start_proxy({"svc.yaml": service_yaml(rule("api.test", 1), mode="audit")})
    assert connect(proxy, "metadata.test:443").startswith(b"HTTP/1.1 403 ")
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    first, second = proxy.wait_records(2)
    assert (first["decision"], first["reason"], first["would_deny"]) == ("deny", "forbidden_address", True)
    assert (second["decision"], second["reason"], second["would_deny"]) == ("allow", "not_allowlisted", True)


@pytest.mark.parametrize(
    ("name", "why"),
    [("servfail.test", "SERVFAIL"), ("slow.test", "timed out"), ("nxdomain.test", "NXDOMAIN")],
)
def test_dns_failures_answer_502(lab, start_proxy, name, why):
    """SERVFAIL, a DNS timeout and NXDOMAIN each deny with 502 dns_failure."""
    proxy = start_proxy({"svc.yaml": service_yaml(rule(name, 443))}, "svc", "--dns-timeout", "0.5")
    answer = connect(proxy, f"{name}:443")
    assert answer.startswith(b"HTTP/1.1 502 ") and b"X-Egressd-Reason: dns_failure" in answer
    [rec] = proxy.wait_records(1)
    assert (rec["decision"], rec["reason"]) == ("deny", "dns_failure") and why in rec["detail"]


def test_ipv6_answer_is_dialled_over_ipv6(lab, start_proxy):
    """A name with only an AAAA answer is dialled at that IPv6 address."""
    proxy = start_proxy({"svc.yaml": service_yaml(rule("v6.test", lab.tls6.port, tls=True))})
    sock, head = connect_tunnel(proxy.address, f"v6.test:{lab.tls6.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    [rec] = proxy.wait_records(1)
    assert rec["upstream"] == f"[::1]:{lab.tls6.port}" and rec["resolved"] == ["::1"]


def test_next_address_is_tried_when_the_first_refuses(lab, start_proxy):
    """When 127.0.0.1 refuses the port, the IPv6 answer of the same name is tried next."""
    proxy = start_proxy({"svc.yaml": service_yaml(rule("fallback.test", lab.tls6.port, tls=True))})
    sock, head = connect_tunnel(proxy.address, f"fallback.test:{lab.tls6.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    [rec] = proxy.wait_records(1)
    assert rec["upstream"] == f"[::1]:{lab.tls6.port}"


def test_refused_upstream_is_502(lab, start_proxy):
    """Nothing listening at the pinned address gives 502 upstream_failure."""
    proxy = start_proxy({"svc.yaml": service_yaml(rule("closed.test", lab.closed_port))})
    answer = connect(proxy, f"closed.test:{lab.closed_port}")
    assert answer.startswith(b"HTTP/1.1 502 ") and b"X-Egressd-Reason: upstream_failure" in answer
    [rec] = proxy.wait_records(1)
    assert rec["reason"] == "upstream_failure" and rec["connect_ms"] is not None


def test_unanswered_connect_is_504(lab, start_proxy):
    """An upstream whose accept queue is full never completes the handshake: 504 upstream_timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(8):  # fill the accept queue; further SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        try:
            files = {"svc.yaml": service_yaml(rule("closed.test", port))}
            proxy = start_proxy(files, "svc", "--connect-timeout", "0.5")
            answer = connect(proxy, f"closed.test:{port}")
            assert answer.startswith(b"HTTP/1.1 504 ") and b"X-Egressd-Reason: upstream_timeout" in answer
            [rec] = proxy.wait_records(1)
            assert rec["reason"] == "upstream_timeout"
        finally:
            for s in fillers:
                s.close()
