"""The lab's loopback DNS server and origins, exercised with real clients: dnspython, httpx, curl, sockets."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import dns.asyncresolver
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import httpx
import pytest
import trustme

from egressd.lab import (
    DnsServer,
    EchoOrigin,
    HttpOrigin,
    LabThread,
    OriginRequest,
    Servfail,
    Slow,
    TlsOrigin,
    client_ssl_context,
    make_ca,
)
from egressd.lab.origins import plan_reply

S = TypeVar("S")
TIMEOUT = 5.0  # seconds any single client operation may take

ZONE = {
    "a.test": ("127.0.0.1",),
    "six.test": ("::1",),
    "both.test": ("127.0.0.2", "::2"),
    "broken.test": Servfail(),
    "slow.test": Slow(0.3, ("127.0.0.3",)),
    "big.test": tuple(f"127.0.1.{i}" for i in range(1, 101)),
}

requires_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def lab() -> Iterator[LabThread]:
    with LabThread() as lab:
        yield lab


@pytest.fixture(autouse=True)
def no_lab_errors(lab: LabThread, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test also checks that the lab loop reported no error and nothing logged a warning."""
    lab.errors.clear()
    yield
    assert lab.errors == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.fixture
def serve(lab: LabThread) -> Iterator[Callable[..., S]]:
    started = []

    def serve(server: S, host: str = "127.0.0.1") -> S:
        lab.run(server.start(host))
        started.append(server)
        return server

    yield serve
    for server in reversed(started):
        lab.run(server.stop())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return make_ca()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lab") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def resolver(server: DnsServer, lifetime: float = TIMEOUT) -> dns.asyncresolver.Resolver:
    res = dns.asyncresolver.Resolver(configure=False)
    host, port = server.address
    res.nameservers = [host]
    res.port = port
    res.lifetime = res.timeout = lifetime
    res.cache = None
    return res


def addresses(answer: dns.resolver.Answer) -> list[str]:
    return sorted(rdata.address for rdata in answer)


# --- DNS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("a.test", "A", ["127.0.0.1"]),
        ("six.test", "AAAA", ["::1"]),
        ("both.test", "A", ["127.0.0.2"]),
        ("both.test", "AAAA", ["::2"]),
        ("A.Test.", "A", ["127.0.0.1"]),
    ],
)
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_resolves_addresses_by_family(lab, serve, name, rdtype, expected, tcp):
    """A name's IPv4 addresses answer A and its IPv6 ones AAAA, case-insensitively, over UDP and TCP."""
    server = serve(DnsServer(ZONE))
    answer = lab.run(resolver(server).resolve(name, rdtype, tcp=tcp))
    assert addresses(answer) == expected
    assert answer.rrset.ttl == 30


@pytest.mark.parametrize(
    ("name", "rdtype", "error"),
    [
        ("missing.test", "A", dns.resolver.NXDOMAIN),
        ("sub.a.test", "A", dns.resolver.NXDOMAIN),
        ("a.test", "AAAA", dns.resolver.NoAnswer),
        ("six.test", "A", dns.resolver.NoAnswer),
        ("a.test", "MX", dns.resolver.NoAnswer),
        ("broken.test", "A", dns.resolver.NoNameservers),
    ],
)
def test_negative_answers(lab, serve, name, rdtype, error):
    """Absent names are NXDOMAIN, a missing family or other type is NOERROR/no data, Servfail is SERVFAIL."""
    server = serve(DnsServer(ZONE))
    with pytest.raises(error):
        lab.run(resolver(server).resolve(name, rdtype))


def test_answers_are_authoritative_with_the_given_ttl(serve):
    """Answers carry the AA flag and the TTL the server was built with."""
    server = serve(DnsServer(ZONE, ttl=7))
    host, port = server.address
    response = dns.query.tcp(dns.message.make_query("a.test", "A"), host, port=port, timeout=TIMEOUT)
    assert response.flags & dns.flags.AA
    assert response.answer[0].ttl == 7
    missing = dns.query.udp(dns.message.make_query("nope.test", "A"), host, port=port, timeout=TIMEOUT)
    assert (missing.rcode(), bool(missing.flags & dns.flags.AA)) == (dns.rcode.NXDOMAIN, True)


def test_slow_answer_times_out_a_short_lifetime_and_reaches_a_long_one(lab, serve):
    """A Slow name makes an impatient resolver time out, and a patient one get the addresses."""
    server = serve(DnsServer(ZONE))
    with pytest.raises(dns.resolver.LifetimeTimeout):
        lab.run(resolver(server, lifetime=0.1).resolve("slow.test", "A"))
    assert addresses(lab.run(resolver(server, lifetime=2.0).resolve("slow.test", "A"))) == ["127.0.0.3"]


def test_slow_answer_does_not_hold_up_others(lab, serve):
    """While a Slow answer is pending, other names are answered at once."""
    server = serve(DnsServer(ZONE))
    finished: list[str] = []

    async def lookup(name: str) -> None:
        await resolver(server).resolve(name, "A")
        finished.append(name)

    async def both() -> None:
        await asyncio.gather(lookup("slow.test"), lookup("a.test"))

    lab.run(both())
    assert finished == ["a.test", "slow.test"]


def test_queries_are_recorded_in_order(lab, serve):
    """Every query received is recorded as (name, type), so tests can assert a name was never looked up."""
    server = serve(DnsServer(ZONE))
    lab.run(resolver(server).resolve("a.test", "A"))
    with pytest.raises(dns.resolver.NXDOMAIN):
        lab.run(resolver(server).resolve("Missing.Test", "AAAA"))
    assert server.queries == [("a.test", "A"), ("missing.test", "AAAA")]
    assert ("denied.test", "A") not in server.queries


def test_zone_changes_take_effect_on_the_next_query(lab, serve):
    """Editing ``zone`` between lookups changes the answer, as DNS rebinding tests need."""
    server = serve(DnsServer(ZONE, ttl=0))
    assert addresses(lab.run(resolver(server).resolve("a.test", "A"))) == ["127.0.0.1"]
    server.zone["a.test"] = ("127.0.0.9",)
    assert addresses(lab.run(resolver(server).resolve("a.test", "A"))) == ["127.0.0.9"]
    del server.zone["a.test"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        lab.run(resolver(server).resolve("a.test", "A"))


def test_oversize_udp_answer_is_truncated_and_tcp_carries_it_whole(lab, serve):
    """An answer too big for a datagram comes back with TC set, and the resolver's TCP retry gets all of it."""
    server = serve(DnsServer(ZONE))
    host, port = server.address
    truncated = dns.query.udp(dns.message.make_query("big.test", "A"), host, port=port, timeout=TIMEOUT)
    assert truncated.flags & dns.flags.TC and not truncated.answer
    answer = lab.run(resolver(server).resolve("big.test", "A"))
    assert len(addresses(answer)) == 100
    assert server.queries[-2:] == [("big.test", "A"), ("big.test", "A")]


def test_unparseable_udp_query_is_ignored(serve):
    """A datagram that is not a DNS message gets no answer, and the server goes on answering."""
    server = serve(DnsServer(ZONE))
    query = dns.message.make_query("a.test", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(server.address)
        sock.send(b"\x00garbage")
        sock.send(query.to_wire())
        response = dns.message.from_wire(sock.recv(4096))
    assert response.id == query.id
    assert server.queries == [("a.test", "A")]


def test_unparseable_tcp_query_closes_the_connection(serve):
    """A TCP frame that is not a DNS message makes the server close the connection."""
    server = serve(DnsServer(ZONE))
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        sock.sendall(struct.pack("!H", 3) + b"bad")
        assert sock.recv(4096) == b""


def test_tcp_connection_carries_several_queries(serve):
    """Queries sent one after another on one TCP connection are each answered, in order."""
    server = serve(DnsServer(ZONE))
    queries = [dns.message.make_query(name, "A") for name in ("a.test", "both.test")]
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"".join(q.to_wire(prepend_length=True) for q in queries))
        stream = sock.makefile("rb")
        ids = [dns.message.from_wire(stream.read(struct.unpack("!H", stream.read(2))[0])).id for _ in queries]
    assert ids == [q.id for q in queries]


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_serves_on_ipv6_loopback(lab, serve):
    """The server can listen on ::1 for both UDP and TCP."""
    server = serve(DnsServer(ZONE), host="::1")
    assert server.address[0] == "::1"
    for tcp in (False, True):
        assert addresses(lab.run(resolver(server).resolve("a.test", "A", tcp=tcp))) == ["127.0.0.1"]


def test_bad_zone_entry_added_later_is_reported_and_answered_servfail(lab, serve, caplog):
    """A malformed entry put into a running zone answers SERVFAIL and is reported to the loop."""
    server = serve(DnsServer(ZONE))
    server.zone["bad.test"] = ("not-an-ip",)
    with pytest.raises(dns.resolver.NoNameservers):
        lab.run(resolver(server).resolve("bad.test", "A"))
    assert ["bad zone entry" in e["message"] for e in lab.errors] == [True]
    lab.errors.clear()
    caplog.clear()


@pytest.mark.parametrize(
    ("zone", "ttl", "message"),
    [
        ({"A.test": ("127.0.0.1",)}, 30, "zone name 'A.test' must be lower case without a trailing dot"),
        ({"a.test.": ("127.0.0.1",)}, 30, "zone name 'a.test.' must be lower case without a trailing dot"),
        ({"a.test": ("1.2.3",)}, 30, "zone entry 'a.test': '1.2.3' does not appear to be an IPv4 or IPv6 address"),
        ({"a.test": "127.0.0.1"}, 30, "zone entry 'a.test': addresses must be a tuple of IP strings, not '127."),
        ({"a.test": None}, 30, "zone entry 'a.test': addresses must be a tuple of IP strings, not None"),
        ({}, -1, "ttl must be between 0 and 2**31 - 1 seconds, not -1"),
    ],
)
def test_invalid_zone_is_refused(zone, ttl, message):
    """A zone with a bad name, address or TTL is refused at construction with a message naming it."""
    with pytest.raises(ValueError) as excinfo:
        DnsServer(zone, ttl=ttl)
    assert str(excinfo.value).startswith(message)


def test_slow_refuses_negative_delay():
    """Slow needs a delay of zero seconds or more."""
    with pytest.raises(ValueError, match="Slow delay must be >= 0 seconds, not -1"):
        Slow(-1)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "localhost"])
@pytest.mark.parametrize("make", [lambda: DnsServer({}), HttpOrigin, EchoOrigin], ids=["dns", "http", "echo"])
def test_refuses_to_listen_beyond_loopback(lab, make, host):
    """A lab server refuses any host that is not a loopback (or documentation) IP literal, before opening a socket."""
    with pytest.raises(ValueError, match="lab servers bind"):
        lab.run(make().start(host))


# --- origins ------------------------------------------------------------------------------------


def tls_client(ca: trustme.CA) -> httpx.Client:
    return httpx.Client(verify=client_ssl_context(ca), trust_env=False, timeout=TIMEOUT)


def get_as(client: httpx.Client, origin: TlsOrigin, name: str, path: str, **kwargs) -> httpx.Response:
    """Fetch ``path`` from ``origin`` as if ``name`` resolved to it: SNI and Host are ``name``."""
    url = f"https://127.0.0.1:{origin.port}{path}"
    method = kwargs.pop("method", "GET")
    return client.request(method, url, headers={"Host": name}, extensions={"sni_hostname": name}, **kwargs)


def test_tls_origin_says_what_it_saw(serve, ca):
    """A TLS origin answers with its label, the method, target, Host and SNI, and records the request."""
    origin = serve(TlsOrigin(ca, ["a.test", "b.test"], label="alpha"))
    with tls_client(ca) as client:
        response = get_as(client, origin, "b.test", "/path?q=1")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["x-origin"] == "alpha"
    assert response.text == "alpha saw GET /path?q=1 host=b.test sni=b.test\n"
    assert origin.requests == [OriginRequest("GET", "/path?q=1", "b.test", "b.test", 0, 1)]


def test_tls_origin_keeps_connections_alive(serve, ca):
    """Two requests from one client share one connection."""
    origin = serve(TlsOrigin(ca, ["a.test"]))
    with tls_client(ca) as client:
        for _ in range(2):
            get_as(client, origin, "a.test", "/").raise_for_status()
    assert origin.connections == 1
    assert [r.connection for r in origin.requests] == [1, 1]


def test_tls_origin_streams_bytes(serve, ca):
    """``/bytes/<n>`` answers exactly n bytes of the repeating 00..ff pattern."""
    origin = serve(TlsOrigin(ca, ["a.test"]))
    with tls_client(ca) as client:
        body = get_as(client, origin, "a.test", "/bytes/1000000").content
    assert len(body) == 1_000_000
    assert body == (bytes(range(256)) * 3907)[:1_000_000]


def test_tls_origin_echoes_the_request_body(serve, ca):
    """``/echo`` answers with the request body, and the request records its length."""
    origin = serve(TlsOrigin(ca, ["a.test"]))
    payload = bytes(range(256)) * 1000
    with tls_client(ca) as client:
        response = get_as(client, origin, "a.test", "/echo", method="POST", content=payload)
    assert response.content == payload
    assert origin.requests[0].body_length == len(payload)


def test_tls_origin_certificate_covers_only_its_names(serve, ca):
    """A client asking for a name the origin's certificate does not cover fails verification."""
    origin = serve(TlsOrigin(ca, ["a.test"]))
    with tls_client(ca) as client, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        get_as(client, origin, "other.test", "/")
    assert origin.requests == []


@requires_curl
def test_tls_origin_with_curl(serve, ca, ca_file):
    """curl, resolving the test name to loopback, verifies the lab CA and sends the name as SNI."""
    origin = serve(TlsOrigin(ca, ["a.test"], label="alpha"))
    url = f"https://a.test:{origin.port}/hello"
    body = curl("--cacert", str(ca_file), "--resolve", f"a.test:{origin.port}:127.0.0.1", url)
    assert body == b"alpha saw GET /hello host=a.test:%d sni=a.test\n" % origin.port
    assert origin.requests[0].sni == "a.test"


@requires_curl
def test_origin_answers_expect_100_continue(serve):
    """A client that waits for ``100 Continue`` before sending its body gets it at once."""
    origin = serve(HttpOrigin())
    started = time.monotonic()
    url = f"http://127.0.0.1:{origin.port}/echo"
    body = curl("-H", "Expect: 100-continue", "--expect100-timeout", "5", "--data-binary", "ping", url)
    assert body == b"ping"
    assert time.monotonic() - started < 4


def test_http_origin_says_what_it_saw(serve):
    """A plain HTTP origin answers like a TLS one, with no SNI."""
    origin = serve(HttpOrigin(label="plain"))
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as client:
        response = client.get(f"http://127.0.0.1:{origin.port}/x", headers={"Host": "a.test"})
        echoed = client.post(f"http://127.0.0.1:{origin.port}/echo", content=b"hello")
    assert response.text == "plain saw GET /x host=a.test sni=-\n"
    assert echoed.content == b"hello"
    assert origin.connections == 1


@requires_curl
def test_http_origin_with_curl(serve):
    """curl fetches from the plain HTTP origin under a test name resolved to loopback."""
    origin = serve(HttpOrigin(label="plain"))
    url = f"http://a.test:{origin.port}/bytes/70000"
    body = curl("--resolve", f"a.test:{origin.port}:127.0.0.1", url)
    assert len(body) == 70000
    assert origin.requests == [OriginRequest("GET", "/bytes/70000", f"a.test:{origin.port}", None, 0, 1)]


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("GET", "/status/404", 404, b"o saw GET /status/404 host=h sni=-\n"),
        ("GET", "/status/503", 503, b"o saw GET /status/503 host=h sni=-\n"),
        ("GET", "/status/204", 204, b""),
        ("GET", "/status/099", 400, b"o saw GET /status/099 host=h sni=-\n"),
        ("HEAD", "/", 200, b""),
    ],
)
def test_status_paths_and_bodiless_replies(serve, method, path, status, body):
    """``/status/<code>`` answers that status; 204 and HEAD replies have no body."""
    origin = serve(HttpOrigin(label="o"))
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as client:
        response = client.request(method, f"http://127.0.0.1:{origin.port}{path}", headers={"Host": "h"})
    assert (response.status_code, response.content) == (status, body)


def test_malformed_request_gets_400_and_close(serve):
    """A request h11 cannot parse is answered 400 and the connection closed."""
    origin = serve(HttpOrigin())
    with socket.create_connection(origin.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(4096), b""))
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert origin.requests == []


def vanish(sock: socket.socket) -> None:
    """Close ``sock`` with a reset, as a client that crashed would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_http_client_vanishing_mid_request_is_quiet(lab, serve):
    """A client that resets the connection halfway through a request body leaves no error behind."""
    origin = serve(HttpOrigin())
    sock = socket.create_connection(origin.address, timeout=TIMEOUT)
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\nabc")
    vanish(sock)
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as client:
        client.get(f"http://127.0.0.1:{origin.port}/").raise_for_status()
    lab.run(origin.wait_idle())
    assert [r.target for r in origin.requests] == ["/"]


def test_tls_client_vanishing_is_quiet(lab, serve, ca):
    """Clients that send garbage instead of a handshake, or reset mid-request, leave no error behind."""
    origin = serve(TlsOrigin(ca, ["a.test"]))
    with socket.create_connection(origin.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        b"".join(iter(lambda: sock.recv(4096), b""))  # the server answers with an alert and closes
    raw = socket.create_connection(origin.address, timeout=TIMEOUT)
    tls = client_ssl_context(ca).wrap_socket(raw, server_hostname="a.test")
    tls.sendall(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nab")
    vanish(tls)
    with tls_client(ca) as client:
        get_as(client, origin, "a.test", "/done").raise_for_status()
    lab.run(origin.wait_idle())
    assert [r.target for r in origin.requests] == ["/done"]


def test_echo_origin_echoes_and_half_closes(lab, serve):
    """The echo origin sends back every byte and closes its side once the client has closed its own."""
    origin = serve(EchoOrigin())
    payload = b"0123456789" * 50_000
    with socket.create_connection(origin.address, timeout=TIMEOUT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = b"".join(iter(lambda: sock.recv(65536), b""))
    assert echoed == payload
    lab.run(origin.wait_idle())
    assert (origin.bytes_received, origin.connections) == (len(payload), 1)


@pytest.mark.parametrize(
    ("target", "body", "status", "reply"),
    [
        ("/", b"", 200, b"o saw GET / host=h sni=s\n"),
        ("http://h/echo?x", b"abc", 200, b"abc"),
        ("/bytes/3", b"", 200, b"\x00\x01\x02"),
        ("/bytes/x", b"", 200, b"o saw GET /bytes/x host=h sni=s\n"),
        ("/status/418", b"", 418, b"o saw GET /status/418 host=h sni=s\n"),
        ("/status/600", b"", 400, b"o saw GET /status/600 host=h sni=s\n"),
    ],
)
def test_plan_reply(target, body, status, reply):
    """plan_reply maps each path to its status and body, without I/O."""
    planned = plan_reply("o", OriginRequest("GET", target, "h", "s", len(body), 1), body)
    assert (planned.status, b"".join(planned.chunks), planned.length) == (status, reply, len(reply))


# --- the lab thread -----------------------------------------------------------------------------


def test_lab_thread_runs_coroutines_and_times_out():
    """run() returns a coroutine's result, passes its exception on, and raises TimeoutError past the timeout."""

    async def fail() -> None:
        raise KeyError("boom")

    with LabThread() as lab:
        assert lab.run(asyncio.sleep(0, result=42)) == 42
        with pytest.raises(KeyError):
            lab.run(fail())
        with pytest.raises(TimeoutError, match="did not finish within 0.05s"):
            lab.run(asyncio.sleep(30), timeout=0.05)
        assert lab.errors == []


def test_lab_thread_stops_what_it_serves():
    """Leaving the context stops the servers started with serve() and ends the thread."""
    with LabThread() as lab:
        origin = lab.serve(HttpOrigin())
        address = origin.address
        thread = lab._thread
    assert thread is not None and not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=TIMEOUT).close()


def test_lab_thread_runs_on_uvloop(ca):
    """The lab servers work the same on a uvloop event loop (as benchmarks may run them)."""
    uvloop = pytest.importorskip("uvloop")
    with LabThread(uvloop.new_event_loop) as lab:
        server = lab.serve(DnsServer(ZONE))
        assert addresses(lab.run(resolver(server).resolve("six.test", "AAAA", tcp=True))) == ["::1"]
        origin = lab.serve(TlsOrigin(ca, ["a.test"]))
        with tls_client(ca) as client:
            assert get_as(client, origin, "a.test", "/").text == "origin saw GET / host=a.test sni=a.test\n"
        assert lab.errors == []


# --- helpers ------------------------------------------------------------------------------------


def curl(*args: str) -> bytes:
    """Run curl against the lab (no config file, no proxy from the environment) and return the body."""
    done = subprocess.run(
        ["curl", "-q", "-sS", "--fail", "--noproxy", "*", "--max-time", str(TIMEOUT), *args],
        capture_output=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout
