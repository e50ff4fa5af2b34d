"""The central gateway: one egressd for two services, each client identified by a token it cannot forge.

Real service-account-shaped JWTs signed with keys made here, a JWKS file, and
real clients (curl, httpx, requests, raw sockets) through the proxy to the
lab's origins.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time

import httpx
import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import raw_request, recv_head

ISSUER = "https://kubernetes.default.svc.cluster.local"


class Cluster:
    """The keys of a cluster's service-account issuer, and tokens as a projected volume holds them."""

    def __init__(self, kid: str = "k1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> str:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return json.dumps({"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]})

    def token(self, namespace: str, account: str, *, audience: str = "egressd", lifetime: float = 3600,
              issuer: str = ISSUER, pod: str = "pod-1") -> str:
        now = int(time.time())
        claims = {
            "iss": issuer, "aud": [audience], "sub": f"system:serviceaccount:{namespace}:{account}",
            "iat": now - 10, "nbf": now - 10, "exp": now + int(lifetime),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": account, "uid": "sa-uid-" + account},
                "pod": {"name": pod, "uid": "pod-uid-" + pod},
            },
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


def service_file(name: str, identities: str, rules: str) -> str:
    return f"version: v1\nservice: {name}\nidentities:\n{identities}allow:\n{rules}"


@pytest.fixture
def gateway(lab, start_proxy, tmp_path):
    """egressd with no --service: payments (api.test, TLS) and checkout (web.test, plain HTTP) behind one port."""
    cluster = Cluster()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(cluster.jwks())
    files = {
        "payments.yaml": service_file(
            "payments", "  - namespace: payments\n    serviceAccount: payments-api\n",
            f"  - host: api.test\n    ports: [{lab.tls.port}]\n    tls: true\n"),
        "checkout.yaml": service_file(
            "checkout", "  - namespace: checkout\n    serviceAccount: checkout-web\n  - cidr: 127.0.0.2/32\n",
            f"  - host: web.test\n    ports: [{lab.http.port}]\n"),
    }
    proxy = start_proxy(files, "", "--identity", "token,cidr", "--token-issuer", ISSUER, "--jwks-file", str(jwks))
    proxy.cluster = cluster
    proxy.tokens = {
        "payments": cluster.token("payments", "payments-api"),
        "checkout": cluster.token("checkout", "checkout-web"),
    }
    return proxy


def proxy_url(proxy, token: str | None) -> str:
    host, port = proxy.address
    return f"http://egressd:{token}@{host}:{port}" if token else f"http://{host}:{port}"


def curl(lab, proxy, token: str | None, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", proxy_url(proxy, token), "--cacert", str(lab.ca_file), url],
        capture_output=True, text=True, timeout=20,
    )


def connect(proxy, authority: str, authorization: str | None) -> bytes:
    extra = f"Proxy-Authorization: {authorization}\r\n" if authorization else ""
    return raw_request(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode())


def test_each_service_reaches_its_own_names_only(lab, gateway):
    """With curl's proxy credentials each service reaches its own allowlist, and not the other's."""
    api = f"https://api.test:{lab.tls.port}/charges"
    web = f"http://web.test:{lab.http.port}/cart"
    out = curl(lab, gateway, gateway.tokens["payments"], api)
    assert out.returncode == 0 and "tls-origin saw GET /charges" in out.stdout, out.stderr
    assert curl(lab, gateway, gateway.tokens["checkout"], web).stdout.startswith("http-origin saw GET /cart")
    assert "403" in curl(lab, gateway, gateway.tokens["checkout"], api).stderr  # CONNECT refused: curl says 403
    out = curl(lab, gateway, gateway.tokens["payments"], web)
    assert "not_allowlisted" in out.stdout or "403" in out.stderr
    records = gateway.wait_records(4)
    by = {(r["service"], r["host"]): r for r in records}
    assert by[("payments", "api.test")]["decision"] == "allow"
    assert by[("checkout", "web.test")]["decision"] == "allow"
    assert by[("checkout", "api.test")]["reason"] == "not_allowlisted"
    assert by[("payments", "web.test")]["reason"] == "not_allowlisted"
    identity = by[("payments", "api.test")]["identity"]
    assert identity == {"source": "token", "namespace": "payments", "serviceaccount": "payments-api", "pod": "pod-1",
                        "pod_uid": "pod-uid-pod-1"}


def test_httpx_requests_and_bearer_clients_are_identified(lab, gateway):
    """httpx and requests with proxy credentials, and a raw Proxy-Authorization: Bearer, are identified."""
    token = gateway.tokens["checkout"]
    url = f"http://web.test:{lab.http.port}/x"
    with httpx.Client(proxy=proxy_url(gateway, token), trust_env=False, timeout=10) as client:
        assert client.get(url).status_code == 200
    proxies = {"http": proxy_url(gateway, token)}
    assert requests.get(url, proxies=proxies, timeout=10).status_code == 200
    answer = raw_request(gateway.address, f"GET {url} HTTP/1.1\r\nHost: web.test:{lab.http.port}\r\n"
                         f"Proxy-Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200")
    records = gateway.wait_records(3)
    assert [r["service"] for r in records] == ["checkout"] * 3


def test_no_credentials_gets_407_with_both_challenges(lab, gateway):
    """A client that sent nothing is asked for credentials: 407 with Basic and Bearer challenges, no_identity."""
    answer = connect(gateway, f"api.test:{lab.tls.port}", None)
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 407")
    assert 'Proxy-Authenticate: Basic realm="egressd"' in head and 'Proxy-Authenticate: Bearer realm="egressd"' in head
    [rec] = gateway.wait_records(1)
    assert (rec["decision"], rec["reason"], rec["service"], rec["identity"]) == ("deny", "no_identity", None, None)


@pytest.mark.parametrize(
    ("make", "detail"),
    [
        (lambda c: c.token("payments", "payments-api", lifetime=-600), "expired"),
        (lambda c: c.token("payments", "payments-api", audience="kubernetes"), "audience"),
        (lambda c: c.token("payments", "payments-api", issuer="https://evil.example"), "issuer"),
        (lambda c: Cluster(kid=c.kid).token("payments", "payments-api"), "signature"),
        (lambda c: Cluster(kid="other").token("payments", "payments-api"), "key"),
        (lambda c: jwt.encode({"iss": ISSUER, "aud": ["egressd"], "sub": "system:serviceaccount:payments:payments-api",
                               "exp": int(time.time()) + 600}, None, algorithm="none"), "alg"),
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "forged-signature", "unknown-kid", "alg-none"],
)
def test_bad_tokens_are_refused_as_bad_identity_without_falling_through(lab, gateway, make, detail):
    """A token that is present but not valid is 403 bad_identity, even from an address a cidr identity covers."""
    token = make(gateway.cluster)
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))  # checkout's cidr identity: must not be used when a bad token was sent
        sock.settimeout(5)
        sock.connect(gateway.address)
        credentials = base64.b64encode(f"egressd:{token}".encode()).decode()
        authority = f"web.test:{lab.http.port}"
        sock.sendall(f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
                     f"Proxy-Authorization: Basic {credentials}\r\n\r\n".encode())
        head = recv_head(sock)
    assert head.startswith(b"HTTP/1.1 403") and b"X-Egressd-Reason: bad_identity" in head
    [rec] = gateway.wait_records(1)
    assert (rec["reason"], rec["identity"]) == ("bad_identity", None)
    assert detail in rec["detail"]


def test_cidr_identity_for_a_client_without_credentials(lab, gateway):
    """A machine in a service's identities: range is that service without any token."""
    authority = f"web.test:{lab.http.port}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(5)
        sock.connect(gateway.address)
        sock.sendall(f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
        assert recv_head(sock).startswith(b"HTTP/1.1 200")
    [rec] = gateway.wait_records(1)
    assert (rec["service"], rec["identity"]) == ("checkout", {"source": "cidr", "cidr": "127.0.0.2/32"})


def test_every_request_on_a_kept_alive_connection_is_identified_again(lab, gateway):
    """Two requests on one connection with two services' tokens are each decided as their own service."""
    authority = f"web.test:{lab.http.port}"
    with socket.create_connection(gateway.address, timeout=5) as sock:
        heads = []
        for service in ("checkout", "payments"):
            sock.sendall(f"GET http://{authority}/{service} HTTP/1.1\r\nHost: {authority}\r\n"
                         f"Proxy-Authorization: Bearer {gateway.tokens[service]}\r\n\r\n".encode())
            head = recv_head(sock)
            heads.append(head.split(b"\r\n")[0])
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
                b"content-length")))
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += sock.recv(4096)
    assert heads == [b"HTTP/1.1 200 OK", b"HTTP/1.1 403 Forbidden"]
    records = gateway.wait_records(2)
    assert [(r["request"], r["service"], r["reason"]) for r in records] == [
        (1, "checkout", "allowed"), (2, "payments", "not_allowlisted")]


def test_no_token_is_ever_written_or_forwarded(lab, gateway):
    """After allowed, refused and malformed uses of tokens, no record, log line or origin request holds one."""
    token = gateway.tokens["checkout"]
    curl(lab, gateway, token, f"http://web.test:{lab.http.port}/secret")
    curl(lab, gateway, token[:-4] + "AAAA", f"http://web.test:{lab.http.port}/forged")
    connect(gateway, f"api.test:{lab.tls.port}", f"Bearer {token}")
    gateway.wait_records(3)
    written = gateway.audit_path.read_text() + "".join(gateway.stderr_lines)
    for secret in (token, token[:-4] + "AAAA"):
        assert all(secret[i:i + 20] not in written for i in range(0, len(secret) - 20, 20))


def test_pod_ip_identity_from_the_api_servers_pods(lab, start_proxy, tmp_path):
    """With pod-ip, a pod that sends no token is its service by its address; /readyz waits for the first list.

    The API server is the one accepted stand-in (tests/k8s_api.py): it speaks list and watch from recorded Pods.
    """
    from egressd.lab import LabThread
    from harness import http_get, wait_for
    from k8s_api import KubeApi, pod

    server = KubeApi([pod("checkout-web-7d9c-x2x4", "127.0.0.3", namespace="checkout",
                          serviceaccount="checkout-web")])
    with LabThread() as thread:
        thread.run(server.start())
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        files = {"checkout.yaml": service_file(
            "checkout", "  - namespace: checkout\n    serviceAccount: checkout-web\n",
            f"  - host: web.test\n    ports: [{lab.http.port}]\n")}
        proxy = start_proxy(files, "", "--identity", "pod-ip", "--kubeconfig", kubeconfig)
        wait_for(lambda: http_get(proxy.admin, "/readyz")[0] == 200, what="the first list of Pods")
        authority = f"web.test:{lab.http.port}"
        request = f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()
        for source, status in (("127.0.0.3", b"200"), ("127.0.0.4", b"403")):
            with socket.socket() as sock:
                sock.bind((source, 0))
                sock.settimeout(5)
                sock.connect(proxy.address)
                sock.sendall(request)
                assert recv_head(sock).startswith(b"HTTP/1.1 " + status)
        records = proxy.wait_records(2)
        thread.run(server.stop())
    assert records[0]["service"] == "checkout" and records[0]["identity"]["pod"] == "checkout-web-7d9c-x2x4"
    assert records[0]["identity"]["source"] == "pod-ip"
    assert (records[1]["reason"], records[1]["service"]) == ("no_identity", None)
