"""The transparent listener against hostile first bytes: ClientHellos cut, split, oversized, misnamed; bad HTTP.

::

    network namespace egressd-hostile-XXXX (lo only, 203.0.113.0/24 on it)
      client socket, SO_MARK 0x68 ──iptables nat OUTPUT: -m mark --mark 0x68 -j REDIRECT──▶ egressd 127.0.0.1:15001
      egressd (unmarked) ──▶ TLS origin 203.0.113.10:443 (allowed.test) · HTTP origin 203.0.113.20:80 (web.test)
                             DNS 203.0.113.53:53

Only the test's own sockets carry the mark, so only they are redirected, and
egressd's connections reach the origins. Everything lives in a namespace made
here and removed at the end; it needs root (CI runs as root), and skips with
the reason otherwise. A refused TLS client reads a fatal ``access_denied``
alert, a refused client without a name sees the connection closed; plain HTTP
gets the explicit listener's answers. Rows ``tests/test_transparent.py``
already holds are marked "(regression)".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import service_yaml
from egressd.lab import DnsServer, HttpOrigin, LabThread, TlsOrigin, make_ca
from egressd.lab.netns import Namespace, socket_in
from harness import ProxyProcess, write_allowlists
from hostile import hello
from hostile.table import Case, Ledger, check_answer, check_record, params
from hostile.wire import Target, first_flight, raw, trickle

MARK = 0x68
TLS_IP, WEB_IP, DNS_IP, NORMAL_IP = "203.0.113.10", "203.0.113.20", "203.0.113.53", "203.0.113.2"
LISTEN = 15001
RULES = "  - host: allowed.test\n  - host: web.test\n    ports: [80]\n"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "iptables")),
    reason="needs root, iproute2 and iptables for a network namespace with a REDIRECT rule (CI runs as root)",
)


@dataclass
class Redirected:
    ns: Namespace
    proxy: ProxyProcess
    ledger: Ledger
    ca_file: Path
    web: HttpOrigin

    def dial(self, address: tuple[str, int], source: str | None = None) -> socket.socket:
        """A marked socket in the namespace, connected to ``address``: iptables redirects it to egressd."""
        sock = socket_in(self.ns.name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
        return sock

    def target(self, address: tuple[str, int]) -> Target:
        return Target(address, {}, self.dial)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture(scope="module")
def redirected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redirected]:
    """The namespace, its REDIRECT rule, the origins and DNS in it, and egressd's transparent listener."""
    tmp = tmp_path_factory.mktemp("transparent")
    ns = Namespace(f"egressd-hostile-{secrets.token_hex(3)}")
    ip("netns", "add", ns.name)
    with contextlib.ExitStack() as stack:
        stack.callback(ip, "netns", "del", ns.name)
        ns.ip("link", "set", "lo", "up")
        ns.ip("addr", "add", "203.0.113.1/24", "dev", "lo")
        rule = ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", hex(MARK),
                "-j", "REDIRECT", "--to-ports", str(LISTEN)]
        done = ns.run(rule)
        assert done.returncode == 0, done.stderr
        lab = stack.enter_context(LabThread(netns=ns.name))
        ca = make_ca()
        ca_file = tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        lab.serve(TlsOrigin(ca, ("allowed.test",), label="tls"), host=TLS_IP, port=443)
        web = lab.serve(HttpOrigin(label="web"), host=WEB_IP, port=80)
        lab.serve(DnsServer({"allowed.test": (TLS_IP,), "web.test": (WEB_IP,), "denied.test": (TLS_IP,)}),
                  host=DNS_IP, port=53)
        directory = write_allowlists(tmp / "allowlists", {"svc.yaml": service_yaml(RULES)})
        args = [
            "--listen", "off", "--transparent-listen", f"127.0.0.1:{LISTEN}", "--admin-listen", "127.0.0.1:0",
            "--workers", "1", "--allowlists", str(directory), "--service", "svc", "--resolver", f"{DNS_IP}:53",
            "--allow-cidr", "203.0.113.0/24", "--hello-timeout", "1", "--header-timeout", "1",
            "--max-header-bytes", "4096", "--reload-interval", "0",
        ]
        proxy = ProxyProcess(args, tmp / "audit.jsonl", wrap=["ip", "netns", "exec", ns.name])
        stack.callback(proxy.stop)
        yield Redirected(ns, proxy, Ledger(proxy), ca_file, web)


TLS = (TLS_IP, 443)
WEB = (WEB_IP, 80)
REAL = hello.real("allowed.test")


def tls(name: str, data: bytes, answer: str, reason: str, record: dict | None = None, **kw) -> Case:
    """A row that sends ``data`` as a TLS client's first flight to the TLS origin's address."""
    return Case(name, (TLS, first_flight(data, **kw)), answer, reason, {"protocol": "tls", **(record or {})})


def http(name: str, data: bytes, answer: str = "400", reason: str = "bad_request", **record) -> Case:
    """A row that sends ``data`` to the HTTP origin's address (port 80)."""
    return Case(name, (WEB, raw(data)), answer, reason, record)


GET = b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: denied.test\r\n\r\n"
ROWS = [
    tls("hello", REAL, "tls", "allowed", {"sni": "allowed.test", "upstream": f"{TLS_IP}:443"}),  # (regression)
    tls("hello-in-1-byte-writes", REAL, "tls", "allowed", {"sni": "allowed.test"}, step=1),
    tls("hello-in-4-byte-records", hello.refragment(REAL, 4), "tls", "allowed", {"sni": "allowed.test"}),
    tls("hello-in-1-byte-records", hello.refragment(REAL, 1), "alert", "bad_request"),
    Case("hello-truncated-then-close", (TLS, first_flight(REAL[:40], half_close=True)), "closed", "no_name",
         {"protocol": None}),
    Case("hello-truncated-then-silent", (TLS, first_flight(REAL[:40])), "closed", "no_name", {"protocol": None}),
    tls("hello-oversized", hello.made(hello.sni(b"allowed.test"), hello.padding(65_450)), "alert", "bad_request"),
    tls("hello-two-host-names", hello.made(hello.sni(b"allowed.test", b"denied.test")), "alert", "bad_request"),
    tls("hello-two-sni-extensions", hello.made(hello.sni(b"allowed.test"), hello.sni(b"denied.test")), "alert",
        "bad_request"),
    tls("hello-sni-with-nul", hello.made(hello.sni(b"allowed.test\x00.denied.test")), "alert", "bad_request"),
    tls("hello-sni-utf8", hello.made(hello.sni("bücher.test".encode())), "alert", "bad_request"),
    tls("hello-sni-16k-name", hello.made(hello.sni(b"a" * 16_000 + b".test")), "alert", "bad_request"),
    tls("hello-sni-upper-case", hello.made(hello.sni(b"ALLOWED.TEST")), "tls", "allowed", {"sni": "allowed.test"}),
    tls("hello-sni-trailing-dot", hello.made(hello.sni(b"allowed.test.")), "tls", "allowed", {"sni": "allowed.test"}),
    tls("hello-sni-denied-name", hello.real("denied.test"), "alert", "not_allowlisted"),  # (regression)
    tls("hello-sni-ip-literal", hello.made(hello.sni(TLS_IP.encode())), "alert", "not_allowlisted"),
    tls("hello-sni-decimal-ip", hello.made(hello.sni(b"3405803786")), "alert", "bad_request"),
    tls("hello-sni-other-name-type", hello.made(hello.sni(b"allowed.test", name_type=7)), "alert", "no_name"),
    tls("hello-without-sni", hello.real(None), "alert", "no_name"),  # (regression)
    Case("hello-sslv2", (TLS, first_flight(hello.SSLV2)), "closed", "no_name", {"protocol": "tcp"}),
    Case("binary-bytes", (TLS, first_flight(b"\x00\x01binary")), "closed", "no_name"),  # (regression)
    Case("nothing-then-close", (TLS, first_flight(b"", half_close=True)), "closed", "no_name"),
    http("http", GET, "200", "allowed", host="web.test"),  # (regression)
    http("http-cl-and-te", b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    http("http-te-in-http-1.0", b"POST / HTTP/1.0\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    http("http-connection-names-content-length", b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: %d\r\n"
         b"Connection: content-length, close\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED), "200", "allowed"),
    http("http-obs-fold", b"GET / HTTP/1.1\r\nHost: web.test\r\nX: a\r\n b\r\n\r\n"),
    http("http-absolute-form", b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n"),
    http("http-connect", b"CONNECT web.test:80 HTTP/1.1\r\nHost: web.test:80\r\n\r\n"),
    http("http-host-userinfo", b"GET / HTTP/1.1\r\nHost: user@web.test\r\n\r\n"),
    http("http-host-port-0", b"GET / HTTP/1.1\r\nHost: web.test:0\r\n\r\n"),
    http("http-host-port-65536", b"GET / HTTP/1.1\r\nHost: web.test:65536\r\n\r\n"),
    http("http-host-decimal-ip", b"GET / HTTP/1.1\r\nHost: 3405803796\r\n\r\n"),
    http("http-host-zone-id", b"GET / HTTP/1.1\r\nHost: [fe80::1%eth0]\r\n\r\n"),
    http("http-two-hosts", b"GET / HTTP/1.1\r\nHost: web.test\r\nHost: denied.test\r\n\r\n"),
    http("http-host-other-port", b"GET / HTTP/1.1\r\nHost: web.test:8080\r\n\r\n", "403", "host_mismatch"),
    http("http-host-missing", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", "403", "no_name"),
    http("http-head-over-limit", b"GET / HTTP/1.1\r\nHost: web.test\r\nX: " + b"a" * 5000 + b"\r\n\r\n", "431"),
    http("http-head-never-finished", b"GET / HTTP/1.1\r\nHost: web.test\r\n", "408"),
]


@pytest.mark.parametrize("case", params(ROWS))
def test_row(redirected: Redirected, case: Case) -> None:
    """Each hostile first flight gets its answer (an alert, a close, or an HTTP answer) and exactly one record,
    and a refused one sends nothing upstream."""
    address, action = case.send
    requests = len(redirected.web.requests)
    redirected.ledger.begin()
    outcome = action(redirected.target(address))
    [rec] = redirected.ledger.take(1, case.name)
    check_answer(outcome, case)
    check_record(rec, case)
    assert rec["listener"] == "transparent" and rec["original_dst"] == f"{address[0]}:{address[1]}"
    assert len(rec["detail"] or "") <= 1024 and len(rec["sni"] or "") <= 300, f"{case.name}: the record quotes too much"
    if rec["decision"] == "deny":
        assert rec["bytes_up"] == 0 and rec["upstream"] is None, rec
    seen = [(r.method, r.target, r.host) for r in redirected.web.requests[requests:]]
    assert len(seen) <= 1, f"{case.name}: the origin saw requests egressd decided once: {seen}"


SLOW = 150  # slow clients at once: hundreds, bounded to fit CI's time


def test_slowloris_on_the_client_hello_while_a_normal_client_is_served(redirected: Redirected) -> None:
    """Many redirected clients sending their ClientHello a byte at a time are each closed no_name with a record,
    and a normal TLS client is served meanwhile."""
    redirected.ledger.begin()
    socks = [redirected.dial(TLS) for _ in range(SLOW)]
    try:
        for sock in socks:
            sock.send(REAL[:1])
        context = ssl.create_default_context(cafile=str(redirected.ca_file))
        with redirected.dial(TLS, source=NORMAL_IP) as normal, \
                context.wrap_socket(normal, server_hostname="allowed.test") as client:
            client.sendall(b"GET /normal HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
            assert client.recv(100).startswith(b"HTTP/1.1 200")
        outcomes = trickle(socks, REAL[1:], time.monotonic() + 30)
    finally:
        for sock in socks:
            sock.close()
    assert {(o.data, o.end) for o in outcomes} <= {(b"", "eof"), (b"", "reset")}
    records = redirected.ledger.take(SLOW + 1, "of the slow clients and the normal one")
    assert [r["reason"] for r in records if r["client"].startswith(NORMAL_IP + ":")] == ["allowed"]
    slow = [r for r in records if not r["client"].startswith(NORMAL_IP + ":")]
    assert len(slow) == SLOW and {(r["reason"], r["bytes_up"]) for r in slow} == {("no_name", 0)}


def test_every_connection_of_the_module_has_exactly_one_record(redirected: Redirected) -> None:
    """After all rows, each record is a different connection (or request of one) and their number is what the rows
    accounted for."""
    records = redirected.ledger.all()
    assert len(records) == redirected.ledger.expected
    assert len({(r["conn_id"], r["request"]) for r in records}) == len(records)
