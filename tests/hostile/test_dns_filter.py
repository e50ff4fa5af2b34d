"""The DNS filter against hostile messages: truncated, oversized, compression loops, odd questions, a flood.

One egressd with ``--dns-listen`` serves every row; the lab's DNS server is
its upstream, with ``api.dnsh.test`` allowed. Each row sends one message (or
one TCP conversation) and must get the answer a resolver gives (FORMERR,
NXDOMAIN, ... or none at all) and exactly the records it names: one per
message the filter took, none for bytes that never made a message. Rows that
``tests/test_dns_filter.py`` or ``tests/test_dns_messages.py`` already hold
are marked "(regression)".
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import dns.message
import dns.opcode
import dns.rcode
import pytest

from conftest import service_yaml
from egressd.lab.dns import Records
from harness import ProxyProcess
from hostile.dnswire import header, name, query, question, rcode_of, tcp, udp, with_opcode
from hostile.table import Case, Ledger, params

ZONE = {
    "api.dnsh.test": ("127.0.0.1",),
    "denied.dnsh.test": ("127.0.0.1",),
    "soa.dnsh.test": Records((("SOA", "ns.dnsh.test. host.dnsh.test. 1 2 3 4 60"),)),
}
API = name(b"api", b"dnsh", b"test")
Q = query("api.dnsh.test")
RULES = service_yaml("  - host: api.dnsh.test\n  - host: soa.dnsh.test\n")


def formerr(label: str, wire: bytes, **record) -> Case:
    return Case(label, udp(wire), "FORMERR", "bad_request", {"rcode": "FORMERR", **record})


def two_opt_records() -> bytes:
    """A query whose additional section holds two OPT records (RFC 6891 6.1.1: FORMERR)."""
    wire = query("api.dnsh.test", use_edns=0)
    return wire[:10] + b"\x00\x02" + wire[12:] + wire[-11:]


def tsig_signed() -> bytes:
    """A query signed with a TSIG key the filter does not have."""
    import dns.tsigkeyring

    message = dns.message.make_query("api.dnsh.test", "A")
    message.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0c2VjcmV0"}), keyname="k.")
    return message.to_wire()


ROWS = [
    formerr("header-cut-short", Q[:6]),
    formerr("question-cut-short", Q[:20]),
    formerr("qtype-cut-off", Q[:-2]),
    Case("one-byte", udp(b"\x12"), "none", "bad_request", {"rcode": None}),  # (regression)
    Case("empty-datagram", udp(b""), "none", "bad_request", {"rcode": None}),
    formerr("oversized-udp", Q + b"\x00" * 60_000),
    Case("oversized-tcp", tcp(header() + b"\xff" * 65_523), "FORMERR", "bad_request", {"rcode": "FORMERR"}),
    formerr("compression-points-at-itself", header() + question(b"\xc0\x0c")),
    formerr("compression-two-pointers-loop", header() + question(b"\xc0\x0e\xc0\x0c")),
    formerr("compression-label-then-loop", header() + question(b"\x01a\xc0\x0c")),
    formerr("compression-points-forward", header() + question(b"\xc0\x20") + bytes(30)),
    formerr("name-over-255-octets", header() + question(name(*[b"a" * 63] * 4, b"abc"))),
    formerr("label-type-0x40", header() + question(b"\x40" + b"a" * 64 + b"\x00")),
    formerr("many-questions", header(qd=100) + question(API) * 100),
    formerr("question-count-65535", header(qd=65535) + question(API)),
    formerr("no-question", header(qd=0)),  # (regression)
    formerr("answer-count-lies", header(an=1000) + question(API)),
    formerr("two-opt-records", two_opt_records()),
    formerr("opt-in-answer-section", (lambda w: w[:6] + b"\x00\x01" + w[8:10] + b"\x00\x00" + w[12:])(
        query("api.dnsh.test", use_edns=0))),
    formerr("tsig-with-an-unknown-key", tsig_signed()),
    Case("nul-in-label", udp(header() + question(name(b"a\x00b", b"dnsh", b"test"))), "NXDOMAIN", "bad_request",
         {"qname": "a\\000b.dnsh.test"}),
    Case("dot-in-label", udp(header() + question(name(b"api.dnsh", b"test"))), "NXDOMAIN", "bad_request"),
    Case("utf8-bytes-in-label", udp(header() + question(name("bücher".encode(), b"test"))), "NXDOMAIN",
         "bad_request"),
    Case("root-name", udp(header() + question(b"\x00")), "NXDOMAIN", "bad_request"),
    Case("numeric-name", udp(query("2130706433")), "NXDOMAIN", "bad_request"),
    Case("unknown-type-allowed-name", udp(header() + question(API, qtype=65280)), "NOERROR", "allowed",
         {"qtype": "TYPE65280", "qname": "api.dnsh.test"}),
    Case("unknown-type-denied-name", udp(header() + question(name(b"denied", b"dnsh", b"test"), qtype=65280)),
         "NXDOMAIN", "not_allowlisted", {"qtype": "TYPE65280"}),
    Case("unknown-class-allowed-name", udp(header() + question(API, qclass=42)), "NOERROR", "allowed"),
    Case("chaos-version-bind", udp(query("version.bind", "TXT", rdclass="CH")), "NXDOMAIN", "not_allowlisted"),
    Case("qtype-any-denied-name", udp(query("denied.dnsh.test", "ANY")), "NXDOMAIN", "not_allowlisted"),
    Case("soa-query-allowed-name", udp(query("soa.dnsh.test", "SOA")), "NOERROR", "allowed", {"qtype": "SOA"}),
    Case("upper-case-name", udp(query("API.DNSH.TEST")), "NOERROR", "allowed", {"qname": "api.dnsh.test"}),
    Case("response-sent-as-query", udp(header(flags=0x8180) + question(API)), "none", "bad_request",
         {"rcode": None}),  # (regression)
    Case("opcode-update", udp(with_opcode("api.dnsh.test", dns.opcode.UPDATE)), "NOTIMP", "bad_request"),
    Case("edns-version-1", udp(query("api.dnsh.test", use_edns=1)), "BADVERS", "bad_request"),  # (regression)
    Case("tcp-zero-length-then-a-query", tcp(b"", Q), "NOERROR", "allowed", count=2),
    Case("tcp-query-in-1-byte-writes", tcp(Q, step=1), "NOERROR", "allowed"),
    Case("tcp-length-past-the-end", tcp(raw=b"\xff\xff" + Q), "none", None, count=0),
    Case("tcp-100-pipelined-queries", tcp(*[query(f"q{i}.denied.dnsh.test") for i in range(100)]), "NXDOMAIN",
         "not_allowlisted", count=100),
]


@dataclass
class Filter:
    proxy: ProxyProcess
    ledger: Ledger
    address: tuple[str, int]


@pytest.fixture(scope="module")
def dns_filter(lab, module_proxy) -> Filter:
    """One egressd with a DNS filter for the module; this module's names are in the lab's zone meanwhile.
    Every row comes from 127.0.0.1: the rate limit per client is out of their way (it has its own test)."""
    lab.dns.zone.update(ZONE)
    proxy = module_proxy({"svc.yaml": RULES}, "--dns-listen", "127.0.0.1:0", "--dns-max-qps-per-client", "1000000")
    yield Filter(proxy, Ledger(proxy, "egress.dns"), proxy.dns[0])
    for key in ZONE:
        lab.dns.zone.pop(key, None)


@pytest.mark.parametrize("case", params(ROWS))
def test_row(dns_filter: Filter, case: Case) -> None:
    """Each hostile message gets the answer a resolver gives, or none, and exactly its records: a message that
    cannot be answered is still recorded as a bad request."""
    dns_filter.ledger.begin()
    exchange, records = case.send(dns_filter.address, dns_filter.ledger, case.count)
    sent = [r for r in records if r["rcode"] is not None]  # a record with an rcode is a message answered
    assert len(exchange.answers) == len(sent), (case.name, exchange.answers[:3])
    if case.answer == "none":
        assert exchange.answers == [], case.name
    for answer in exchange.answers:
        assert answer[2] & 0x80, f"{case.name}: the answer has no QR bit"
    if exchange.answers:
        assert rcode_of(exchange.answers[-1]) == case.answer, (case.name, exchange.answers[-1][:40])
    for rec in records:
        if rec["rcode"] is None:  # a message egressd took but could not answer: a bad request, recorded
            assert (rec["reason"], rec["decision"]) == ("bad_request", "deny"), (case.name, rec)
            continue
        assert rec["reason"] == case.reason, (case.name, rec)
        assert rec["decision"] == ("allow" if case.reason == "allowed" else "deny"), (case.name, rec)
        for field, value in case.record.items():
            assert rec[field] == value, (case.name, field, rec)


def test_answers_carry_the_query_id(dns_filter: Filter) -> None:
    """A FORMERR for bytes that do not parse still carries the two-byte ID of the message."""
    dns_filter.ledger.begin()
    exchange, _ = udp(b"\xbe\xef" + Q[2:20])(dns_filter.address, dns_filter.ledger, 1)
    assert [a[:2] for a in exchange.answers] == [b"\xbe\xef"]


FLOOD = 2000  # queries from one client, at most WINDOW unanswered at a time (no kernel buffer drops them)
WINDOW = 50
BURST = 500  # queries sent at once, before any answer is read


def test_flood_from_one_client_is_refused_past_its_rate_and_others_are_served(lab, module_proxy) -> None:
    """A client that sends thousands of queries back to back gets every answer (NXDOMAIN within its rate, then
    REFUSED) and a record for each, naming the limit past it; another client is answered in the middle of it."""
    lab.dns.zone.update(ZONE)
    proxy = module_proxy({"svc.yaml": RULES}, "--dns-listen", "127.0.0.1:0", "--dns-max-qps-per-client", "100")
    ledger, address = Ledger(proxy, "egress.dns"), proxy.dns[0]
    ledger.begin()
    rcodes: dict[str, int] = {}
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.2", 0))
        flood.settimeout(10)
        other.settimeout(10)
        sent = answered = 0
        for _ in range(WINDOW):
            flood.sendto(query(f"f{sent}.denied.dnsh.test"), address)
            sent += 1
        while answered < FLOOD:
            rcode = rcode_of(flood.recv(65536))
            rcodes[rcode] = rcodes.get(rcode, 0) + 1
            answered += 1
            if sent < FLOOD:
                flood.sendto(query(f"f{sent}.denied.dnsh.test"), address)
                sent += 1
            if answered == FLOOD // 2:
                other.sendto(Q, address)
                assert rcode_of(other.recv(65536)) == "NOERROR"
    elapsed = time.monotonic() - started
    assert set(rcodes) == {"NXDOMAIN", "REFUSED"}
    assert 200 <= rcodes["NXDOMAIN"] <= 200 + 100 * elapsed + 1  # the burst (2 s worth), then 100 a second
    records = ledger.take(FLOOD + 1, "of the flood and the other client")
    refused = [r for r in records if r["rcode"] == "REFUSED"]
    assert len(refused) == rcodes["REFUSED"]
    assert {(r["reason"], r["limit"], r["client"].split(":")[0]) for r in refused} == {
        ("overloaded", "dns_max_qps_per_client", "127.0.0.1")}
    assert "127.0.0.1 sent more than 100 queries a second, the --dns-max-qps-per-client limit" in refused[0]["detail"]
    assert sum(r["reason"] == "not_allowlisted" for r in records) == rcodes["NXDOMAIN"]
    assert [r["qname"] for r in records if r["reason"] == "allowed"] == ["api.dnsh.test"]
    metric = f'egressd_limit_hits_total{{limit="dns_max_qps_per_client"}} {float(rcodes["REFUSED"])}'
    assert metric in proxy.metrics()


def _rmem_max() -> int:
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except OSError:
        return 0


@pytest.mark.skipif(_rmem_max() < 1 << 20, reason="net.core.rmem_max caps the filter's UDP receive buffer below 1 MiB")
def test_a_burst_of_queries_sent_at_once_is_all_answered(dns_filter: Filter) -> None:
    """Hundreds of queries sent back to back before any answer is read all wait in the filter's receive buffer
    and are answered, none dropped."""
    dns_filter.ledger.begin()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as burst:
        burst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        burst.settimeout(10)
        for i in range(BURST):
            burst.sendto(query(f"b{i}.denied.dnsh.test"), dns_filter.address)
        answers = [burst.recv(65536) for _ in range(BURST)]
    assert {rcode_of(a) for a in answers} == {"NXDOMAIN"}
    assert len(dns_filter.ledger.take(BURST, "of the burst")) == BURST
