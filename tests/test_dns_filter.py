"""The DNS filter end to end: egressd with --dns-listen, the lab's DNS server upstream, dig and dnspython as clients."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import time

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dns.rdtypes.svcbbase import ParamKey

from conftest import service_yaml
from egressd.lab.dns import Records, Slow
from harness import ProxyProcess, connect_tunnel, wait_for

ECH = "AEn+DQBFKwAgACABWIHUGj4u+PIggYXcR5JF0gYk3dCRioBW8uJq9H4mKAAIAAEAAQABAANAEnB1YmxpYy50bHMtZWNoLmRldgAA"
BIG = tuple(f"127.0.1.{i}" for i in range(1, 101))  # 100 A records: about 1,600 bytes, more than 1232
ZONE = {
    "api.dnsf.test": ("127.0.0.1", "::1"),
    "seed.dnsf.test": ("127.0.0.1",),
    "seed6.dnsf.test": ("127.0.0.1", "::1"),
    "evil.dnsf.test": ("127.0.0.1",),
    "paste.dnsf.test": ("127.0.0.1",),
    "db.ns.svc.cluster.local": ("127.0.0.1",),
    "db.evilcluster.local": ("127.0.0.1",),
    "big.dnsf.test": BIG,
    "https.dnsf.test": Records((("HTTPS", f'1 . alpn="h2" ech="{ECH}" mandatory=alpn,ech'), ("A", "127.0.0.1"))),
    "slow.dnsf.test": Slow(5.0, ("127.0.0.1",)),
}
GLOBAL = "version: v1\nglobal: true\ndeny:\n  - host: paste.dnsf.test\n"
DNS_FIELDS = {
    "event", "ts", "service", "client", "qname", "qtype", "rcode", "answers", "decision", "reason", "detail", "rule",
    "policy_version", "upstream_ms", "limit", "stream", "seq", "chain",
}
DNS_ONLY = ("--listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0", "--dns-passthrough", "cluster.local")


@pytest.fixture(scope="module", autouse=True)
def zone(lab):
    """This module's names in the lab's zone (the lab is shared by the session), removed afterwards."""
    lab.dns.zone.update(ZONE)
    yield
    for name in ZONE:
        lab.dns.zone.pop(name, None)


def allowlists(lab, mode: str = "enforce") -> dict[str, str]:
    rules = (
        "  - host: api.dnsf.test\n"  # line 5
        f"  - host: seed.dnsf.test\n    ports: [{lab.echo.port}]\n"  # line 6
        f"  - host: seed6.dnsf.test\n    ports: [{lab.echo.port}]\n"
        "  - host: big.dnsf.test\n"
        "  - host: https.dnsf.test\n"
        "  - host: slow.dnsf.test\n"
        "  - host: paste.dnsf.test\n"
        "  - host: servfail.test\n"
        '  - host: "**.dnsf-pipe.test"\n'
    )
    return {"svc.yaml": service_yaml(rules, mode=mode), "_global.yaml": GLOBAL}


@pytest.fixture
def proxy(lab, start_proxy):
    return start_proxy(allowlists(lab), "svc", *DNS_ONLY)


def dig(address: tuple[str, int], *args: str) -> str:
    out = subprocess.run(
        ["dig", f"@{address[0]}", "-p", str(address[1]), *args, "+tries=1", "+time=3"],
        capture_output=True, text=True, timeout=15,
    )
    return out.stdout


def status(dig_output: str) -> str:
    return re.search(r"status: (\w+)", dig_output).group(1)


def header_flags(dig_output: str) -> set[str]:
    return set(re.search(r";; flags: ([a-z ]*);", dig_output).group(1).split())


def ask(address: tuple[str, int], name: str, rdtype: str = "A", tcp: bool = False, **kw) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, address[0], port=address[1], timeout=5)


def dns_records(proxy: ProxyProcess, n: int) -> list[dict]:
    """Wait for n egress.dns records; return them all."""
    def found():
        records = [r for r in proxy.records() if r["event"] == "egress.dns"]
        return records if len(records) >= n else None

    return wait_for(found, what=f"{n} egress.dns records")


class Upstream:
    """What the lab's DNS server (shared by the session) was asked since this test began."""

    def __init__(self, lab) -> None:
        self.dns = lab.dns
        self.start = (len(lab.dns.queries), len(lab.dns.received))

    def asked(self, name: str) -> list[str]:
        """The types asked for ``name``, in order."""
        return [rdtype for qname, rdtype in list(self.dns.queries)[self.start[0]:] if qname == name]

    def received(self, name: str) -> list[tuple[str, dns.message.Message]]:
        """(transport, query) of each query for ``name``."""
        since = list(self.dns.received)[self.start[1]:]
        return [(t, m) for t, m in since if m.question[0].name.to_text() == name + "."]


@pytest.fixture
def upstream(lab) -> Upstream:
    return Upstream(lab)


def test_allowed_name_is_forwarded_answered_and_recorded(lab, upstream, proxy):
    """An allowlisted name is asked upstream once, answered, and recorded with every field."""
    out = dig(proxy.dns[0], "api.dnsf.test", "A")
    assert status(out) == "NOERROR" and re.search(r"api\.dnsf\.test\.\s+30\s+IN\s+A\s+127\.0\.0\.1", out)
    [rec] = dns_records(proxy, 1)
    assert set(rec) == DNS_FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", rec["ts"])
    assert (rec["event"], rec["service"], rec["qname"], rec["qtype"], rec["rcode"]) == (
        "egress.dns", "svc", "api.dnsf.test", "A", "NOERROR"
    )
    assert (rec["decision"], rec["reason"], rec["detail"]) == ("allow", "allowed", None)
    assert rec["answers"] == [{"address": "127.0.0.1", "ttl": 30}]
    assert rec["rule"].endswith("svc.yaml:5") and len(rec["policy_version"]) == 16
    assert rec["client"].startswith("127.0.0.1:") and rec["upstream_ms"] > 0
    assert upstream.asked("api.dnsf.test") == ["A"]
    assert proxy.metric("egressd_dns_queries_total", service="svc", decision="allow", reason="allowed") == 1
    assert proxy.metric("egressd_dns_upstream_seconds_count") == 1


def test_cached_answers_count_down_their_ttl_without_asking_upstream_again(lab, upstream, proxy):
    """A repeated query is answered from the filter's cache, TTL lowered by the time held, with no upstream query."""
    first = ask(proxy.dns[0], "api.dnsf.test", "AAAA")
    assert first.answer[0].ttl == 30
    answers = [first]

    def lower_ttl() -> dns.message.Message | None:
        answers.append(ask(proxy.dns[0], "api.dnsf.test", "AAAA"))
        return answers[-1] if answers[-1].answer[0].ttl < 30 else None

    again = wait_for(lower_ttl, 5, "a TTL below 30")
    assert [rd.address for rd in again.answer[0]] == ["::1"] and again.answer[0].ttl == 29
    assert upstream.asked("api.dnsf.test") == ["AAAA"]
    records = dns_records(proxy, len(answers))
    assert records[0]["upstream_ms"] > 0 and records[-1]["upstream_ms"] is None
    assert records[-1]["answers"] == [{"address": "::1", "ttl": again.answer[0].ttl}]


@pytest.mark.parametrize(
    ("name", "reason", "rule"),
    [("evil.dnsf.test", "not_allowlisted", None), ("paste.dnsf.test", "denylisted", "_global.yaml:4")],
    ids=["not-allowlisted", "global-deny"],
)
def test_denied_name_gets_nxdomain_and_is_never_asked_upstream(lab, upstream, proxy, name, reason, rule):
    """A name the policy denies is answered NXDOMAIN (not REFUSED) at once, and the upstream server never sees it."""
    out = dig(proxy.dns[0], name, "A")
    assert status(out) == "NXDOMAIN" and "ra" in header_flags(out)
    [rec] = dns_records(proxy, 1)
    assert (rec["decision"], rec["reason"], rec["rcode"], rec["qname"]) == ("deny", reason, "NXDOMAIN", name)
    assert (rec["rule"] or "").endswith(rule or "") and (rec["rule"] is None) == (rule is None)
    assert rec["upstream_ms"] is None and rec["answers"] == []
    assert upstream.asked(name) == []
    assert proxy.metric("egressd_dns_queries_total", service="svc", decision="deny", reason=reason) == 1


def test_answers_seed_the_resolver_so_connections_dial_what_the_app_was_told(lab, upstream, proxy):
    """After the app's A and AAAA queries, a connection to the name dials the answer the app got, without a lookup."""
    assert ask(proxy.dns[0], "seed.dnsf.test", "A").answer[0][0].address == "127.0.0.1"
    assert ask(proxy.dns[0], "seed.dnsf.test", "AAAA").answer == []
    lab.dns.zone["seed.dnsf.test"] = ("127.0.0.2",)  # what a fresh lookup would now get (nothing listens there)
    try:
        sock, head = connect_tunnel(proxy.address, f"seed.dnsf.test:{lab.echo.port}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200"), head
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
    finally:
        lab.dns.zone["seed.dnsf.test"] = ("127.0.0.1",)
    conn = wait_for(lambda: [r for r in proxy.records() if r["event"] == "egress.connection"], what="the record")[0]
    assert conn["resolved"] == ["127.0.0.1"] and conn["dns_ms"] is None
    assert upstream.asked("seed.dnsf.test") == ["A", "AAAA"]


def test_seeding_one_family_leaves_the_other_to_a_lookup(lab, upstream, proxy):
    """When the app asked only A, a connection uses the seeded A answer and looks up AAAA alone."""
    assert ask(proxy.dns[0], "seed6.dnsf.test", "A").answer[0][0].address == "127.0.0.1"
    sock, head = connect_tunnel(proxy.address, f"seed6.dnsf.test:{lab.echo.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    conn = wait_for(lambda: [r for r in proxy.records() if r["event"] == "egress.connection"], what="the record")[0]
    assert conn["resolved"] == ["127.0.0.1", "::1"] and conn["dns_ms"] is not None
    assert upstream.asked("seed6.dnsf.test") == ["A", "AAAA"]


def test_passthrough_suffix_is_forwarded_on_label_boundaries_only(lab, upstream, proxy):
    """A name under --dns-passthrough is forwarded without an allowlist rule; a name merely ending in it is not."""
    assert status(dig(proxy.dns[0], "db.ns.svc.cluster.local", "A")) == "NOERROR"
    assert status(dig(proxy.dns[0], "db.evilcluster.local", "A")) == "NXDOMAIN"
    forwarded, denied = dns_records(proxy, 2)
    assert (forwarded["decision"], forwarded["reason"], forwarded["rule"]) == ("allow", "passthrough", None)
    assert "cluster.local" in forwarded["detail"]
    assert (denied["decision"], denied["reason"]) == ("deny", "not_allowlisted")
    assert upstream.asked("db.ns.svc.cluster.local") == ["A"] and upstream.asked("db.evilcluster.local") == []


def test_https_records_lose_their_ech_parameter(lab, proxy):
    """An HTTPS record reaches the app without its ech SvcParam (nor ech in mandatory), the rest intact."""
    out = dig(proxy.dns[0], "https.dnsf.test", "HTTPS")
    assert status(out) == "NOERROR" and 'mandatory=alpn alpn="h2"' in out and "ech=" not in out
    response = ask(proxy.dns[0], "https.dnsf.test", "HTTPS", use_edns=0, want_dnssec=True)
    [rd] = response.answer[0]
    assert ParamKey.ECH not in rd.params and list(rd.params) == [ParamKey.MANDATORY, ParamKey.ALPN]
    assert not response.flags & dns.flags.AD
    rec = dns_records(proxy, 1)[0]
    assert (rec["qtype"], rec["reason"], rec["answers"]) == ("HTTPS", "allowed", [])
    assert "ech removed from 1 HTTPS/SVCB record(s)" in rec["detail"]


def test_tcp_answers_pipelined_queries_on_one_connection(lab, proxy):
    """Over TCP, two queries sent back to back on one connection get their two answers, matched by ID."""
    assert status(dig(proxy.dns[0], "api.dnsf.test", "A", "+tcp")) == "NOERROR"
    allowed = dns.message.make_query("api.dnsf.test", "AAAA")
    denied = dns.message.make_query("evil.dnsf.test", "A")
    with socket.create_connection(proxy.dns[0], timeout=5) as sock:
        sock.sendall(allowed.to_wire(prepend_length=True) + denied.to_wire(prepend_length=True))
        answers = {}
        for _ in range(2):
            wire = _recv_exactly(sock, int.from_bytes(_recv_exactly(sock, 2), "big"))
            message = dns.message.from_wire(wire)
            answers[message.id] = message
    assert answers[allowed.id].rcode() == dns.rcode.NOERROR and answers[allowed.id].answer[0][0].address == "::1"
    assert answers[denied.id].rcode() == dns.rcode.NXDOMAIN
    assert len(dns_records(proxy, 3)) == 3


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection closed early"
        data += chunk
    return data


def test_large_answers_are_truncated_over_udp_and_whole_over_tcp(lab, upstream, proxy):
    """An answer larger than the client's UDP size comes back with TC and no records; over TCP it is whole."""
    out = dig(proxy.dns[0], "big.dnsf.test", "A", "+bufsize=512", "+ignore")
    assert "tc" in header_flags(out) and "ANSWER: 0" in out
    out = dig(proxy.dns[0], "big.dnsf.test", "A", "+noedns", "+ignore")
    assert "tc" in header_flags(out) and "ANSWER: 0" in out
    out = dig(proxy.dns[0], "big.dnsf.test", "A", "+tcp")
    assert "tc" not in header_flags(out) and "ANSWER: 100" in out
    out = dig(proxy.dns[0], "big.dnsf.test", "A", "+bufsize=4096")
    assert "tc" not in header_flags(out) and "ANSWER: 100" in out
    assert [t for t, _ in upstream.received("big.dnsf.test")] == ["udp", "tcp"]
    udp512, noedns, tcp, udp4096 = dns_records(proxy, 4)
    assert "truncated" in udp512["detail"] and udp512["answers"] == [] and "512" in noedns["detail"]
    assert len(tcp["answers"]) == 100 and len(udp4096["answers"]) == 100 and tcp["detail"] is None


def test_client_edns_options_go_upstream_without_client_subnet(lab, upstream, proxy):
    """The upstream query keeps the client's DO bit and EDNS options, except client subnet."""
    options = [dns.edns.ECSOption("192.0.2.0", 24), dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")]
    response = ask(proxy.dns[0], "api.dnsf.test", "A", use_edns=0, want_dnssec=True, options=options)
    assert response.ednsflags & dns.flags.DO and response.payload == 1232
    [(_, sent)] = upstream.received("api.dnsf.test")
    assert sent.ednsflags & dns.flags.DO and sent.flags & dns.flags.RD
    assert [o.otype for o in sent.options] == [dns.edns.OptionType.COOKIE]


def _udp_exchange(address: tuple[str, int], wire: bytes, timeout: float = 3.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(wire, address)
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def test_malformed_messages_get_formerr_and_a_record_and_the_listener_keeps_answering(lab, proxy):
    """Garbage gets FORMERR with its ID, other misfits FORMERR/NOTIMP/BADVERS or nothing, each a record; the
    listener then still answers."""
    address = proxy.dns[0]
    formerr = _udp_exchange(address, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07garbage")
    assert formerr[:2] == b"\x12\x34" and formerr[3] & 0x0F == dns.rcode.FORMERR and formerr[2] & 0x80
    two = dns.message.make_query("api.dnsf.test", "A")
    two.question.append(dns.message.make_query("evil.dnsf.test", "A").question[0])
    assert dns.message.from_wire(_udp_exchange(address, two.to_wire())).rcode() == dns.rcode.FORMERR
    notify = dns.message.make_query("api.dnsf.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(_udp_exchange(address, notify.to_wire())).rcode() == dns.rcode.NOTIMP
    v1 = dns.message.make_query("api.dnsf.test", "A", use_edns=1)
    assert dns.message.from_wire(_udp_exchange(address, v1.to_wire())).rcode() == dns.rcode.BADVERS
    response = dns.message.make_response(dns.message.make_query("api.dnsf.test", "A"))
    assert _udp_exchange(address, response.to_wire(), timeout=0.5) is None  # a response is dropped, unanswered
    bad_name = dns.message.make_query("bad\\032name.dnsf.test", "A")
    assert dns.message.from_wire(_udp_exchange(address, bad_name.to_wire())).rcode() == dns.rcode.NXDOMAIN
    assert status(dig(address, "api.dnsf.test", "A")) == "NOERROR"
    records = dns_records(proxy, 7)
    assert [(r["reason"], r["rcode"]) for r in records] == [
        ("bad_request", "FORMERR"), ("bad_request", "FORMERR"), ("bad_request", "NOTIMP"),
        ("bad_request", "BADVERS"), ("bad_request", None), ("bad_request", "NXDOMAIN"), ("allowed", "NOERROR"),
    ]
    assert all(r["decision"] == "deny" for r in records[:6]) and records[5]["qname"] == "bad\\032name.dnsf.test"
    assert proxy.metric("egressd_dns_queries_total", service="svc", decision="deny", reason="bad_request") == 6
    assert proxy.proc.poll() is None and "Traceback" not in "".join(proxy.stderr_lines)


@pytest.mark.parametrize(
    ("name", "extra", "detail"),
    [
        ("servfail.test", (), "answered SERVFAIL"),
        ("slow.dnsf.test", ("--dns-timeout", "0.3"), "did not answer within 0.3s"),
    ],
    ids=["servfail", "timeout"],
)
def test_upstream_failure_gives_servfail(lab, start_proxy, name, extra, detail):
    """SERVFAIL or silence from every upstream resolver is answered SERVFAIL, reason dns_failure."""
    proxy = start_proxy(allowlists(lab), "svc", *DNS_ONLY, *extra)
    assert status(dig(proxy.dns[0], name, "A")) == "SERVFAIL"
    [rec] = dns_records(proxy, 1)
    assert (rec["decision"], rec["reason"], rec["rcode"]) == ("allow", "dns_failure", "SERVFAIL")
    assert detail in rec["detail"] and rec["upstream_ms"] >= 0
    assert proxy.metric("egressd_dns_queries_total", service="svc", decision="allow", reason="dns_failure") == 1


def test_unreachable_resolver_gives_servfail(lab, tmp_path):
    """With its only resolver's port closed, the filter answers SERVFAIL at once, saying what failed."""
    directory = tmp_path / "allowlists"
    directory.mkdir()
    for file, text in allowlists(lab).items():
        (directory / file).write_text(text)
    proxy = ProxyProcess(
        ["--listen", "off", "--admin-listen", "127.0.0.1:0", "--workers", "1", "--allowlists", str(directory),
         "--service", "svc", "--resolver", f"127.0.0.1:{lab.closed_port}", "--dns-listen", "127.0.0.1:0",
         "--dns-passthrough", "cluster.local"],
        tmp_path / "audit.jsonl",
    )
    try:
        started = time.monotonic()
        assert status(dig(proxy.dns[0], "api.dnsf.test", "A")) == "SERVFAIL"
        assert time.monotonic() - started < 2
        [rec] = dns_records(proxy, 1)
        assert rec["reason"] == "dns_failure" and f"127.0.0.1:{lab.closed_port}" in rec["detail"]
    finally:
        assert proxy.stop() == 0


def test_audit_mode_forwards_what_it_would_deny_but_not_global_denies(lab, upstream, start_proxy):
    """In audit mode a name outside the allowlist is forwarded and recorded as would-deny; a global deny is not."""
    proxy = start_proxy(allowlists(lab, mode="audit"), "svc", *DNS_ONLY)
    assert status(dig(proxy.dns[0], "evil.dnsf.test", "A")) == "NOERROR"
    assert status(dig(proxy.dns[0], "paste.dnsf.test", "A")) == "NXDOMAIN"
    audited, denied = dns_records(proxy, 2)
    assert (audited["decision"], audited["reason"], audited["rcode"]) == ("allow", "not_allowlisted", "NOERROR")
    assert "would be denied" in audited["detail"] and audited["answers"] == [{"address": "127.0.0.1", "ttl": 30}]
    assert (denied["decision"], denied["reason"]) == ("deny", "denylisted")
    assert upstream.asked("evil.dnsf.test") == ["A"] and upstream.asked("paste.dnsf.test") == []


def test_dns_audit_denied_writes_only_denials_but_counts_everything(lab, start_proxy):
    """With --dns-audit denied, allowed queries get no record but are still counted."""
    proxy = start_proxy(allowlists(lab), "svc", *DNS_ONLY, "--dns-audit", "denied")
    assert status(dig(proxy.dns[0], "api.dnsf.test", "A")) == "NOERROR"
    assert status(dig(proxy.dns[0], "evil.dnsf.test", "A")) == "NXDOMAIN"
    [rec] = dns_records(proxy, 1)
    assert rec["qname"] == "evil.dnsf.test"
    assert proxy.metric("egressd_dns_queries_total", service="svc", decision="allow", reason="allowed") == 1
    proxy.stop()
    assert [r["qname"] for r in proxy.records()] == ["evil.dnsf.test"]


def test_dns_only_on_ipv4_and_ipv6_loopback(lab, start_proxy):
    """With --listen off, the filter serves several --dns-listen addresses, each on a free port of its own."""
    proxy = start_proxy(allowlists(lab), "svc", "--listen", "off", "--dns-listen", "127.0.0.1:0",
                        "--dns-listen", "[::1]:0", "--dns-passthrough", "cluster.local")
    assert proxy.address == () and [host for host, _ in proxy.dns] == ["127.0.0.1", "::1"]
    assert status(dig(proxy.dns[1], "api.dnsf.test", "A", "+tcp")) == "NOERROR"
    assert status(dig(proxy.dns[1], "evil.dnsf.test", "A")) == "NXDOMAIN"
    allowed, denied = dns_records(proxy, 2)
    assert allowed["client"].startswith("[::1]:") and denied["client"].startswith("[::1]:")


def test_shutdown_records_the_queries_still_waiting_upstream(lab, upstream, start_proxy):
    """SIGTERM while a query waits for a slow resolver: egressd exits promptly and the query still has its record."""
    proxy = start_proxy(allowlists(lab), "svc", *DNS_ONLY)
    query = dns.message.make_query("slow.dnsf.test", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(query.to_wire(), proxy.dns[0])
        wait_for(lambda: upstream.asked("slow.dnsf.test"), what="the upstream query")
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.proc.wait(10) == 0 and time.monotonic() - started < 4
    [rec] = [r for r in proxy.records() if r["event"] == "egress.dns"]
    assert (rec["qname"], rec["reason"]) == ("slow.dnsf.test", "dns_failure") and "shut down" in rec["detail"]


# -- TCP limits, with the proxy in this process (the limits are module constants) ----------------------------------
async def _serving(lab, tmp_path, monkeypatch, dns_max_tcp_connections: int = 256, **limits):
    """egressd's Proxy on this loop with only a DNS listener, the listener's limits lowered as given."""
    from egressd.app import Proxy
    from egressd.config import Config
    from egressd.listeners import dns as listener

    for name, value in limits.items():
        monkeypatch.setattr(listener, name, value)
    directory = tmp_path / "allowlists"
    directory.mkdir(exist_ok=True)
    for file, text in allowlists(lab).items():
        (directory / file).write_text(text)
    config = Config(
        allowlists=directory, service="svc", listen=None, admin_listen=None, dns_listen=(("127.0.0.1", 0),),
        resolvers=(lab.dns.address,), audit_log=str(tmp_path / "audit.jsonl"), reload_interval=0,
        dns_max_tcp_connections=dns_max_tcp_connections,
    )
    proxy = Proxy(config)
    await proxy.start()
    return proxy, proxy.bound["dns"][0]


async def _tcp_query(reader, writer, name: str) -> dns.message.Message:
    writer.write(dns.message.make_query(name, "A").to_wire(prepend_length=True))
    async with asyncio.timeout(5):
        length = int.from_bytes(await reader.readexactly(2), "big")
        return dns.message.from_wire(await reader.readexactly(length))


async def _closed_by_server(reader) -> bool:
    async with asyncio.timeout(5):
        try:
            return await reader.read(1) == b""
        except ConnectionResetError:
            return True


def test_tcp_connections_are_closed_when_idle(lab, tmp_path, monkeypatch):
    """A TCP connection is closed after the idle timeout: after its answers, with nothing sent, or mid-message."""

    async def go():
        proxy, address = await _serving(lab, tmp_path, monkeypatch, TCP_IDLE_TIMEOUT=0.3)
        try:
            answered = await asyncio.open_connection(*address)
            silent = await asyncio.open_connection(*address)
            partial = await asyncio.open_connection(*address)
            partial[1].write(b"\x00\x30\x12")  # a length and one byte of 48, then nothing
            assert (await _tcp_query(*answered, "evil.dnsf.test")).rcode() == dns.rcode.NXDOMAIN
            for reader, writer in (answered, silent, partial):
                assert await _closed_by_server(reader)
                writer.close()
        finally:
            await proxy.stop()

    asyncio.run(go())


def test_tcp_connections_past_the_cap_close_the_idlest_of_the_client_with_the_most(lab, tmp_path, monkeypatch):
    """Past --dns-max-tcp-connections a new connection is served, and the idlest connection of the client holding
    the most is closed: a client that holds connections open pushes out its own, never another client's."""

    async def go():
        proxy, address = await _serving(lab, tmp_path, monkeypatch, dns_max_tcp_connections=3)
        try:
            other = await asyncio.open_connection(*address, local_addr=("127.0.0.2", 0))
            assert (await _tcp_query(*other, "evil.dnsf.test")).rcode() == dns.rcode.NXDOMAIN
            held = []
            for _ in range(2):
                held.append(await asyncio.open_connection(*address))
                assert (await _tcp_query(*held[-1], "evil.dnsf.test")).rcode() == dns.rcode.NXDOMAIN
            newest = await asyncio.open_connection(*address)  # the fourth: the oldest of 127.0.0.1's two goes
            assert (await _tcp_query(*newest, "evil.dnsf.test")).rcode() == dns.rcode.NXDOMAIN
            assert await _closed_by_server(held[0][0])
            for client in (other, held[1], newest):  # still served
                assert (await _tcp_query(*client, "evil.dnsf.test")).rcode() == dns.rcode.NXDOMAIN
            assert proxy.metrics.limit_hits["dns_max_tcp_connections"] == 1
            for client in (other, *held, newest):
                client[1].close()
        finally:
            await proxy.stop()

    asyncio.run(go())


def test_tcp_pipeline_past_its_cap_is_read_once_answers_go_out(lab, tmp_path, monkeypatch):
    """With at most two queries in flight per connection, six pipelined queries that wait upstream all get answers."""

    async def go():
        proxy, address = await _serving(lab, tmp_path, monkeypatch, MAX_PIPELINE=2)
        try:
            reader, writer = await asyncio.open_connection(*address)
            queries = [dns.message.make_query(f"q{i}.dnsf-pipe.test", "A") for i in range(6)]
            writer.write(b"".join(q.to_wire(prepend_length=True) for q in queries))
            answers = []
            async with asyncio.timeout(10):
                for _ in queries:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    answers.append(dns.message.from_wire(await reader.readexactly(length)))
            writer.close()
            return queries, answers
        finally:
            await proxy.stop()

    for i in range(6):
        lab.dns.zone[f"q{i}.dnsf-pipe.test"] = Slow(0.1, ("127.0.0.1",))
    try:
        queries, answers = asyncio.run(go())
    finally:
        for i in range(6):
            lab.dns.zone.pop(f"q{i}.dnsf-pipe.test", None)
    assert sorted(a.id for a in answers) == sorted(q.id for q in queries)
    assert all(a.rcode() == dns.rcode.NOERROR for a in answers)
