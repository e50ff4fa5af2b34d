"""The explicit listener against hostile requests: smuggling, hop-by-hop tricks, heads, URLs, pipelines.

One egressd serves every row of this module (see :mod:`hostile.explicit`); each
row opens one connection, so each must leave exactly one record. A denied row
must also have sent nothing upstream: its record says ``bytes_up: 0`` and the
HTTP origin saw no new request; no row may make the origin see a request
egressd did not decide (smuggling). Rows that already have a test elsewhere
(``tests/test_http_forward.py``, ``tests/test_sniff_http.py``) are marked
"(regression)" in a comment. CONNECT authorities and ClientHellos are in
``test_explicit_tls.py``.
"""

from __future__ import annotations

import re
import time

import pytest

from egressd.sniff.http import forward_headers
from harness import recv_head, wait_for
from hostile.explicit import SLOW, WEB, Served, bad, chunked, connect, get, one_record_each, post, run_row
from hostile.table import Case, params
from hostile.wire import dial_tcp, raw, slow_clients, then_reset, trickle

SMUGGLING = [
    bad("cl-and-te", post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),  # (regression)
    bad("two-content-lengths", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")),
    bad("two-equal-content-lengths", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello")),
    bad("content-length-list", post(b"Content-Length: 5, 5\r\n", b"hello")),
    bad("content-length-signed", post(b"Content-Length: +5\r\n", b"hello")),
    bad("content-length-hex", post(b"Content-Length: 0x5\r\n", b"hello")),
    bad("content-length-overflow", post(b"Content-Length: 99999999999999999999999\r\n", b"hello")),
    bad("te-chunked-then-identity", post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n")),
    bad("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    bad("te-quoted-chunked", post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n")),
    bad("te-chunked-twice", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    bad("te-chunked-then-gzip", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", b"0\r\n\r\n")),
    bad("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    bad("te-obs-folded", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n")),
    bad("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    bad("te-in-http-1.0", post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", version=b"1.0")),
    bad("te-empty", post(b"Transfer-Encoding: \r\n", b"")),
    bad("chunk-size-not-hex", chunked(b"zz\r\nhello\r\n0\r\n\r\n")),
    bad("chunk-size-negative", chunked(b"-1\r\nhello\r\n0\r\n\r\n")),
    bad("chunk-size-overflow", chunked(b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n")),
    bad("chunk-size-0x-prefix", chunked(b"0x5\r\nhello\r\n0\r\n\r\n")),
    bad("chunk-size-trailing-space", chunked(b"5 \r\nhello\r\n0\r\n\r\n")),
    bad("chunk-longer-than-its-size", chunked(b"3\r\nhello\r\n0\r\n\r\n")),
    bad("chunk-bare-lf", chunked(b"5\nhello\n0\n\n")),
    bad("chunk-extension-bare-cr", chunked(b"5;a=\rb\r\nhello\r\n0\r\n\r\n")),
    bad("bare-cr-between-headers", b"GET http://" + WEB + b"/ HTTP/1.1\r\nHost: " + WEB + b"\rX: y\r\n\r\n"),
    bad("bare-cr-in-value", get(b"http://" + WEB + b"/", extra=b"X: a\rb\r\n")),
    bad("bare-lf-after-request-line", b"GET http://" + WEB + b"/ HTTP/1.1\nHost: " + WEB + b"\r\n\r\n"),
    bad("bare-lf-ends-head", b"GET http://" + WEB + b"/ HTTP/1.1\r\nHost: " + WEB + b"\r\n\n"),
    bad("obs-fold", get(b"http://" + WEB + b"/", extra=b"X: a\r\n b\r\n")),
    bad("nul-in-header", get(b"http://" + WEB + b"/", extra=b"X: a\x00b\r\n")),
    bad("nul-in-url", get(b"http://" + WEB + b"/\x00")),
    bad("space-in-header-name", get(b"http://" + WEB + b"/", extra=b"Bad Name: x\r\n")),
    bad("lower-case-method", b"get http://" + WEB + b"/ HTTP/1.1\r\nHost: " + WEB + b"\r\n\r\n"),
    bad("http-2.0-version", b"GET http://" + WEB + b"/ HTTP/2.0\r\nHost: " + WEB + b"\r\n\r\n"),
    bad("http-0.9-request", b"GET http://" + WEB + b"/\r\n\r\n"),
]

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n"
HOP_BY_HOP = [
    Case("connection-names-content-length", raw(post(
        b"Content-Length: %d\r\nConnection: content-length, close\r\n" % len(SMUGGLED), SMUGGLED)), "200",
        "allowed"),
    Case("connection-names-transfer-encoding", raw(post(
        b"Transfer-Encoding: chunked\r\nConnection: transfer-encoding, close\r\n",
        b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n")), "200", "allowed"),
    Case("trailer-host", raw(post(b"Transfer-Encoding: chunked\r\nConnection: close\r\n",
                                  b"5\r\nhello\r\n0\r\nHost: evil.test\r\n\r\n")), "200", "allowed"),
    Case("trailer-proxy-authorization", raw(post(b"Transfer-Encoding: chunked\r\nConnection: close\r\n",
                                                 b"5\r\nhello\r\n0\r\nProxy-Authorization: Bearer x\r\n\r\n")),
         "200", "allowed"),
    bad("trailer-content-length", chunked(b"5\r\nhello\r\n0\r\nContent-Length: 4\r\n\r\n")),
    Case("connection-names-host", raw(get(b"http://" + WEB + b"/", extra=b"Connection: host\r\n")), "200", "allowed"),
]

HEADS = [
    bad("head-over-limit", get(b"http://" + WEB + b"/", extra=b"X-Big: " + b"a" * 5000 + b"\r\n"), "431"),
    bad("request-line-over-limit", get(b"http://" + WEB + b"/" + b"a" * 5000), "431"),
    bad("many-small-headers", get(b"http://" + WEB + b"/", extra=b"a: b\r\n" * 1000), "431"),
    bad("head-over-limit-in-1k-writes", get(b"http://" + WEB + b"/", extra=b"X: " + b"a" * 6000 + b"\r\n"), "431"),
    Case("head-in-1-byte-writes", raw(get(b"http://" + WEB + b"/slow"), step=1), "200", "allowed"),
    bad("head-never-finished", b"GET http://" + WEB + b"/ HTTP/1.1\r\nHost: web.test\r\n", "408"),  # (regression)
    Case("head-cut-by-close", raw(b"GET http://" + WEB + b"/ HTTP/1.1\r\nHo", half_close=True), "400", "bad_request"),
    Case("nothing-then-close", raw(b"", half_close=True), "closed", "bad_request", {"status": None}),
    bad("tls-bytes-as-a-head", b"\x16\x03\x01garbage\r\n\r\n"),  # (regression)
    Case("denied-connect-then-reset", then_reset(connect("evil.test:443")), "gone", "not_allowlisted",
         {"host": "evil.test"}),
    Case("bad-head-then-reset", then_reset(b"GET http://" + WEB + b"/ HTTP/1.1\r\nHost: web.test\r\n\x00\r\n\r\n"),
         "gone", "bad_request"),
]

URLS = [
    bad("url-decimal-ip", get(b"http://2130706433:{http}/", b"2130706433:{http}")),
    bad("url-port-0", get(b"http://web.test:0/", b"web.test:0")),
    bad("url-port-65536", get(b"http://web.test:65536/", b"web.test:65536")),
    bad("url-userinfo", get(b"http://user@" + WEB + b"/")),  # (regression)
    bad("url-userinfo-like-host-port", get(b"http://" + WEB + b"@evil.test/", b"evil.test")),
    bad("url-two-at-signs", get(b"http://a@b@evil.test/", b"evil.test")),
    bad("url-ipv6-without-brackets", get(b"http://::1/", b"[::1]")),
    bad("url-empty-port", get(b"http://web.test:/", b"web.test")),
    bad("url-zone-id", get(b"http://[fe80::1%25eth0]:{http}/", b"[fe80::1%25eth0]:{http}")),
    bad("url-percent-encoded-host", get(b"http://web%2etest:{http}/")),
    bad("url-backslash-in-authority", get(b"http://web.test\\@evil.test:{http}/")),
    bad("url-fragment-in-authority", get(b"http://web.test#@evil.test:{http}/")),
    bad("url-https", get(b"https://web.test/", b"web.test"), host="web.test", port=443),  # (regression)
    bad("url-origin-form", get(b"/local")),  # (regression)
    bad("url-no-host", get(b"http:///", b"web.test")),
    bad("host-header-twice", get(b"http://" + WEB + b"/", extra=b"Host: evil.test\r\n"), host="web.test"),
    Case("host-header-other", raw(get(b"http://" + WEB + b"/", b"evil.test")), "403", "host_mismatch",
         {"host": "web.test"}),  # (regression)
    Case("host-header-empty", raw(get(b"http://" + WEB + b"/", b"")), "403", "host_mismatch"),
    Case("host-header-other-port", raw(get(b"http://" + WEB + b"/", b"web.test:1")), "403", "host_mismatch"),
    Case("host-header-missing", raw(get(b"http://" + WEB + b"/", None)), "400", "bad_request",
         {"host": "web.test", "protocol": "http"}),
    Case("host-upper-case-trailing-dot", raw(get(b"http://WEB.TEST.:{http}/", b"Web.Test.:{http}")), "200",
         "allowed", {"host": "web.test", "status": 200}),
    Case("url-ipv4-mapped-private", raw(get(b"http://[::ffff:10.0.0.1]:{http}/", b"[::ffff:10.0.0.1]:{http}")),
         "403", "forbidden_address", {"host": "::ffff:10.0.0.1"}, marks=(pytest.mark.isolated,)),
]

ROWS = SMUGGLING + HOP_BY_HOP + HEADS + URLS

KEEP = b"GET http://" + WEB + b"/first HTTP/1.1\r\nHost: " + WEB + b"\r\n\r\n"
WS = (b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
      b"Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==\r\n\r\n")
PIPELINES = [  # (name, requests sent in one write, (status, reason) of each answer in order)
    ("get-then-denied-get", KEEP + get(b"http://evil.test/", b"evil.test"),
     [(200, "allowed"), (403, "not_allowlisted")]),  # (regression: tests/test_http_forward.py, one at a time)
    ("get-then-denied-connect", KEEP + connect("evil.test:443"), [(200, "allowed"), (403, "not_allowlisted")]),
    ("get-then-denied-websocket", KEEP + b"GET ws://evil.test/ HTTP/1.1\r\nHost: evil.test" + WS,
     [(200, "allowed"), (403, "not_allowlisted")]),
    ("get-then-websocket-not-switched", KEEP + b"GET ws://" + WEB + b"/ws HTTP/1.1\r\nHost: " + WEB + WS,
     [(200, "allowed"), (200, "allowed")]),
]



@pytest.mark.parametrize("case", params(ROWS))
def test_row(lab, explicit: Served, case: Case) -> None:
    """Each hostile request gets its answer and exactly one record with its reason; a denied one sends nothing
    upstream."""
    run_row(lab, explicit, case)


@pytest.mark.parametrize(("data", "answers"), [pytest.param(d, a, id=n) for n, d, a in PIPELINES])
def test_pipelined_requests_are_each_answered_and_recorded(lab, explicit: Served, data: bytes, answers: list) -> None:
    """Requests sent in one write, a CONNECT or a WebSocket upgrade behind a plain request included, are each
    answered in order and each get a record; none is dropped unanswered."""
    explicit.ledger.begin()
    outcome = raw(data)(explicit.target)
    records = explicit.ledger.take(len(answers))
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", outcome.data)]
    assert list(zip(statuses, [r["reason"] for r in records], strict=True)) == answers, outcome.data[:400]
    assert [r["request"] for r in records] == [1, 2] and len({r["conn_id"] for r in records}) == 1


@pytest.mark.parametrize("listed", [b"content-length", b"Transfer-Encoding", b"host", b"close, Content-Length"])
def test_connection_header_never_removes_framing_or_host(listed: bytes) -> None:
    """Whatever a Connection header lists, the fields that frame a message and name its host cross the hop, on a
    request as on a response; what it lists besides them does not."""
    headers = [(b"host", b"web.test"), (b"content-length", b"5"), (b"transfer-encoding", b"chunked"),
               (b"x-hop", b"1"), (b"connection", listed + b", x-hop")]
    assert forward_headers(headers) == headers[:3]


def test_slowloris_on_the_head_while_a_normal_client_is_served(lab, explicit: Served) -> None:
    """Many clients sending their request heads a byte at a time each get 408 and a record, and a normal client
    is served meanwhile."""
    explicit.ledger.begin()
    socks = slow_clients(explicit.proxy.address, SLOW, "127.0.0.2")
    try:
        for sock in socks:
            sock.send(b"G")
        wait_for(lambda: explicit.proxy.metric("egressd_active_connections", service="svc") >= SLOW,
                 what="the slow clients to be accepted")
        with dial_tcp(explicit.proxy.address) as normal:
            normal.sendall(explicit.target.fill(get(b"http://" + WEB + b"/normal")))
            assert recv_head(normal).startswith(b"HTTP/1.1 200 OK")
        outcomes = trickle(socks, b"ET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n", time.monotonic() + 30)
    finally:
        for sock in socks:
            sock.close()
    assert all(o.data.startswith(b"HTTP/1.1 408 ") and o.end == "eof" for o in outcomes)
    records = explicit.ledger.take(SLOW + 1, "of the slow clients and the normal one")
    normal_records = [r for r in records if r["client"].startswith("127.0.0.1:")]
    assert [r["reason"] for r in normal_records] == ["allowed"]
    slow = [r for r in records if r["client"].startswith("127.0.0.2:")]
    assert len(slow) == SLOW and {(r["reason"], r["status"]) for r in slow} == {("bad_request", 408)}


def test_every_connection_of_the_module_has_exactly_one_record(explicit: Served) -> None:
    """After all rows, each record is a different connection (or request of one) and their number is what the rows
    accounted for."""
    one_record_each(explicit)
