"""The explicit listener against hostile CONNECTs: authorities, every IP-literal form, and the ClientHello after.

One egressd serves every row of this module (see :mod:`hostile.explicit`). A
CONNECT names ``host:port``: user-info, ports 0 and 65536, octal, hex, short
and integer IPv4, zone ids, missing brackets and mapped IPv6 are refused before
anything is resolved. On a TLS port the first bytes after ``200`` must be a
ClientHello naming the CONNECT host: split into 1-byte writes or 4-byte records
it still is; cut short, oversized, with two names, a NUL, another name or an
address it is not, and nothing goes upstream. Rows that already have a test in
``tests/test_connect.py`` are marked "(regression)".
"""

from __future__ import annotations

import ssl
import time

import pytest

from harness import recv_head
from hostile import hello
from hostile.explicit import API, SLOW, Served, bad, connect, one_record_each, run_row
from hostile.table import Case, params
from hostile.wire import dial_tcp, raw, slow_clients, trickle, tunnel

REAL = hello.real("api.test")
CONNECTS = [
    bad("connect-userinfo", connect("user:pw@" + API)),
    bad("connect-port-0", connect("api.test:0")),
    bad("connect-port-65536", connect("api.test:65536")),
    bad("connect-port-leading-zero", connect("api.test:0443")),
    bad("connect-port-missing", connect("api.test")),  # (regression)
    bad("connect-absolute-url", connect("http://" + API + "/")),
    bad("connect-asterisk", connect("*")),
    bad("connect-port-signed", connect("api.test:+443")),
    bad("connect-two-ports", connect("api.test:443:443")),
    bad("connect-percent-encoded-name", connect("api%2etest:{tls}")),
    bad("connect-name-over-253", connect("a." * 127 + "test:{tls}")),
    bad("connect-label-over-63", connect("a" * 64 + ".test:{tls}")),
    bad("connect-bad-punycode", connect("xn--zz.test:{tls}")),
    bad("connect-3000-character-name", b"CONNECT " + b"a" * 3000 + b".test:{tls} HTTP/1.1\r\n\r\n"),
    bad("connect-with-content-length", connect(API, "Content-Length: 5\r\n") + b"hello", host="api.test"),
    bad("connect-with-transfer-encoding", connect(API, "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
        host="api.test"),
    Case("connect-with-content-length-0", tunnel(API, REAL, headers="Content-Length: 0\r\n"), "tunnel+tls",
         "allowed"),
    bad("connect-bare-lf", b"CONNECT api.test:{tls} HTTP/1.1\nHost: api.test\n\n"),
    bad("ip-decimal", connect("2130706433:{echo}")),  # (regression)
    bad("ip-octal", connect("0177.0.0.1:{echo}")),  # (regression)
    bad("ip-hex-parts", connect("0x7f.0.0.1:{echo}")),  # (regression)
    bad("ip-hex-integer", connect("0x7f000001:{echo}")),
    bad("ip-short-two-parts", connect("127.1:{echo}")),  # (regression)
    bad("ip-short-three-parts", connect("127.0.1:{echo}")),
    bad("ip-leading-zeros", connect("127.000.000.001:{echo}")),
    bad("ip-trailing-dot", connect("127.0.0.1.:{echo}")),
    bad("ip-part-over-255", connect("127.0.0.256:{echo}")),
    bad("ipv6-zone-id-encoded", connect("[fe80::1%25eth0]:{echo}")),  # (regression)
    bad("ipv6-zone-id", connect("[fe80::1%eth0]:{echo}")),
    bad("ipv6-without-brackets", connect("::1:{echo}")),
    bad("ipv4-in-brackets", connect("[127.0.0.1]:{echo}")),
    Case("ipv4-mapped-metadata", raw(connect("[::ffff:169.254.169.254]:{echo}")), "403", "forbidden_address",
         {"host": "::ffff:169.254.169.254", "upstream": None}, marks=(pytest.mark.isolated,)),
    Case("ipv4-mapped-metadata-hex", raw(connect("[::ffff:a9fe:a9fe]:{echo}")), "403", "forbidden_address",
         {"host": "::ffff:169.254.169.254", "upstream": None}, marks=(pytest.mark.isolated,)),
    Case("ipv4-compatible-ipv6", raw(connect("[::127.0.0.1]:{echo}")), "403", "not_allowlisted"),
    Case("connect-upper-case-trailing-dot", tunnel("API.TEST.:{tls}", hello.real("api.test")), "tunnel+tls",
         "allowed", {"host": "api.test", "sni": "api.test"}),
]

HELLOS = [
    Case("hello-in-1-byte-writes", tunnel(API, REAL, step=1), "tunnel+tls", "allowed", {"sni": "api.test"}),
    Case("hello-in-4-byte-records", tunnel(API, hello.refragment(REAL, 4)), "tunnel+tls", "allowed",
         {"sni": "api.test"}),
    Case("hello-in-1-byte-records", tunnel(API, hello.refragment(REAL, 1)), "tunnel+closed", "sni_missing"),
    Case("hello-truncated-then-close", tunnel(API, REAL[:40], half_close=True), "tunnel+closed", "sni_missing"),
    Case("hello-truncated-then-silent", tunnel(API, REAL[:40]), "tunnel+closed", "sni_missing"),
    Case("hello-oversized", tunnel(API, hello.made(hello.sni(b"api.test"), hello.padding(65_450))),
         "tunnel+closed", "sni_missing"),
    Case("hello-two-host-names", tunnel(API, hello.made(hello.sni(b"api.test", b"evil.test"))), "tunnel+closed",
         "sni_missing"),
    Case("hello-two-sni-extensions", tunnel(API, hello.made(hello.sni(b"api.test"), hello.sni(b"evil.test"))),
         "tunnel+closed", "sni_missing"),
    Case("hello-sni-with-nul", tunnel(API, hello.made(hello.sni(b"api.test\x00.evil.test"))), "tunnel+closed",
         "sni_missing"),
    Case("hello-sni-utf8", tunnel(API, hello.made(hello.sni("bücher.test".encode()))), "tunnel+closed",
         "sni_missing"),
    Case("hello-sni-16k-name", tunnel(API, hello.made(hello.sni(b"a" * 16_000 + b".test"))), "tunnel+closed",
         "sni_mismatch"),
    Case("hello-sni-upper-case", tunnel(API, hello.made(hello.sni(b"API.TEST"))), "tunnel+tls", "allowed",
         {"sni": "api.test"}),
    Case("hello-sni-trailing-dot", tunnel(API, hello.made(hello.sni(b"api.test."))), "tunnel+tls", "allowed",
         {"sni": "api.test"}),
    Case("hello-sni-other-name", tunnel(API, hello.real("evil.test")), "tunnel+closed", "sni_mismatch",
         {"sni": "evil.test"}),  # (regression)
    Case("hello-sni-longer-name", tunnel(API, hello.made(hello.sni(b"api.test.evil.test"))), "tunnel+closed",
         "sni_mismatch"),
    Case("hello-sni-ip-literal", tunnel(API, hello.made(hello.sni(b"127.0.0.1"))), "tunnel+closed",
         "sni_mismatch"),
    Case("hello-sni-decimal-ip", tunnel(API, hello.made(hello.sni(b"2130706433"))), "tunnel+closed",
         "sni_mismatch"),
    Case("hello-sni-other-name-type", tunnel(API, hello.made(hello.sni(b"api.test", name_type=7))),
         "tunnel+closed", "sni_missing", {"sni": None}),
    Case("hello-without-sni", tunnel(API, hello.real(None)), "tunnel+closed", "sni_missing"),  # (regression)
    Case("hello-sslv2", tunnel(API, hello.SSLV2), "tunnel+closed", "sni_missing"),
    Case("ip-connect-hello-without-sni", tunnel("127.0.0.1:{tls}", hello.real(None)), "tunnel+tls", "allowed",
         {"sni": None}),
    Case("ip-connect-hello-with-a-name", tunnel("127.0.0.1:{tls}", REAL), "tunnel+closed", "sni_mismatch"),
    Case("ip-connect-hello-with-the-same-ip", tunnel("127.0.0.1:{tls}", hello.made(hello.sni(b"127.0.0.1"))),
         "tunnel+closed", "sni_mismatch"),
    Case("http-on-a-tls-port", tunnel(API, b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n"), "tunnel+closed",
         "sni_missing"),  # (regression)
]

ROWS = CONNECTS + HELLOS


@pytest.mark.parametrize("case", params(ROWS))
def test_row(lab, explicit: Served, case: Case) -> None:
    """Each hostile CONNECT or ClientHello gets its answer and exactly one record with its reason; a denied one
    sends nothing upstream."""
    run_row(lab, explicit, case)


def test_slowloris_on_the_client_hello_while_a_normal_client_is_served(lab, explicit: Served) -> None:
    """Many tunnels whose ClientHello comes a byte at a time are each closed sni_missing with a record, and a
    normal TLS client is served meanwhile."""
    explicit.ledger.begin()
    socks = slow_clients(explicit.proxy.address, SLOW, "127.0.0.3")
    authority = f"api.test:{lab.tls.port}"
    try:
        for sock in socks:
            sock.sendall(connect(authority))
        for sock in socks:
            sock.settimeout(10)
            assert recv_head(sock, size=1).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(lab.ca_file))
        with dial_tcp(explicit.proxy.address) as normal:
            normal.sendall(connect(authority))
            assert recv_head(normal, size=1).startswith(b"HTTP/1.1 200")
            with context.wrap_socket(normal, server_hostname="api.test") as tls:
                tls.sendall(b"GET /normal HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
                assert tls.recv(100).startswith(b"HTTP/1.1 200")
        outcomes = trickle(socks, REAL, time.monotonic() + 30)
    finally:
        for sock in socks:
            sock.close()
    assert {o.data for o in outcomes} == {b""}
    records = explicit.ledger.take(SLOW + 1, "of the slow tunnels and the normal one")
    slow = [r for r in records if r["client"].startswith("127.0.0.3:")]
    assert len(slow) == SLOW and {(r["reason"], r["bytes_up"]) for r in slow} == {("sni_missing", 0)}
    assert [r["reason"] for r in records if r["client"].startswith("127.0.0.1:")] == ["allowed"]


def test_every_connection_of_the_module_has_exactly_one_record(explicit: Served) -> None:
    """After all rows, each record is a different connection and their number is what the rows accounted for."""
    one_record_each(explicit)
