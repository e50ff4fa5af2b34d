"""The explicit listener that the two explicit modules attack: its rules, request builders, and the row check.

Each module gets its own egressd (the ``explicit`` fixture of ``conftest.py``)
with ``--max-header-bytes 4096``, ``--header-timeout 1`` and ``--hello-timeout
1``. Request bytes name the lab's ports as ``{http}``, ``{tls}``, ``{echo}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from conftest import service_yaml
from harness import ProxyProcess
from hostile.table import Case, Ledger, check_answer, check_record
from hostile.wire import Target, raw

RULES = """  - host: web.test
    ports: [{http}]
  - host: api.test
    ports: [{tls}]
    tls: true
  - host: echo.test
    ports: [{echo}]
  - cidr: 127.0.0.0/8
    ports: [{echo}, {http}]
  - cidr: "::ffff:0:0/96"
    ports: [{echo}, {http}]
  - cidr: 127.0.0.1/32
    ports: [{tls}]
    tls: true
"""
WEB = b"web.test:{http}"
API = "api.test:{tls}"


def post(headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    """A POST to the allowed HTTP origin with these extra header lines (each ending in CRLF) and body."""
    return b"POST http://" + WEB + b"/ HTTP/" + version + b"\r\nHost: " + WEB + b"\r\n" + headers + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n", body)


def get(url: bytes, host: bytes | None = WEB, extra: bytes = b"") -> bytes:
    """A GET in absolute-form (a Host header unless ``host`` is None); the connection closes after it."""
    line = b"GET " + url + b" HTTP/1.1\r\n"
    return line + (b"Host: " + host + b"\r\n" if host is not None else b"") + extra + b"Connection: close\r\n\r\n"


def connect(authority: str, extra: str = "") -> bytes:
    """A CONNECT head for ``authority`` with these extra header lines (each ending in CRLF)."""
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()


def bad(name: str, data: bytes, answer: str = "400", **record) -> Case:
    """A row whose bytes egressd must refuse as a bad request (400 unless said), nothing forwarded."""
    return Case(name, raw(data), answer, "bad_request", record)


SLOW = 150  # slow clients at once: hundreds, bounded to fit CI's time


@dataclass
class Served:
    proxy: ProxyProcess
    ledger: Ledger
    target: Target


def serve(lab, module_proxy) -> Served:
    """egressd for one module: web.test (HTTP), api.test (TLS) and echo.test by name, 127.0.0.0/8 by cidr."""
    ports = {"http": lab.http.port, "tls": lab.tls.port, "echo": lab.echo.port}
    files = {"svc.yaml": service_yaml(RULES.format(**ports))}
    proxy = module_proxy(files, "--max-header-bytes", "4096", "--header-timeout", "1", "--hello-timeout", "1")
    return Served(proxy, Ledger(proxy), Target(proxy.address, ports))


def run_row(lab, explicit: Served, case: Case) -> None:
    """Send the row, then check its answer, its one record, and that a denied row sent nothing upstream and that
    the origin saw no request egressd did not decide."""
    requests = len(lab.http.requests)
    explicit.ledger.begin()
    outcome = case.send(explicit.target)
    [rec] = explicit.ledger.take(1, case.name)
    check_answer(outcome, case)
    check_record(rec, case)
    assert rec["listener"] == "explicit"
    assert len(rec["detail"] or "") <= 1024 and len(rec["sni"] or "") <= 300, f"{case.name}: the record quotes too much"
    if rec["decision"] == "deny":
        assert rec["bytes_up"] == 0 and len(lab.http.requests) == requests, rec
    seen = [(r.method, r.target, r.host) for r in lab.http.requests[requests:]]
    assert len(seen) <= 1, f"{case.name}: the origin saw requests egressd decided once: {seen}"


def one_record_each(explicit: Served) -> None:
    """Each record is a different connection (or request of one), and there are as many as the rows accounted for."""
    records = explicit.ledger.all()
    assert len(records) == explicit.ledger.expected
    assert len({(r["conn_id"], r["request"]) for r in records}) == len(records)
