"""Inspect mode's worker: real clients (curl, httpx over HTTP/1.1 and HTTP/2, websockets) through the mitmproxy
worker alone to trustme TLS origins on loopback, the CONNECT carrying the pinned 127.0.0.1 while the client's SNI
is a name; then the engine's Inspector, which starts the worker, hands it tunnels, turns its lines into
egress.request records and fails closed when it dies; the CA files; and the core never importing mitmproxy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpcore
import httpx
import pytest

from egressd import records
from egressd.errors import UpstreamFailure
from egressd.inspect import ca
from egressd.inspect.client import USER, Inspector, connect_head, decode_inspect, encode_inspect
from egressd.inspect.rules import Inspect, InspectEntry, parse_path
from egressd.lab import TlsOrigin, make_ca
from egressd.metrics import Metrics
from egressd.records import Record
from harness import DEADLINE, recv_head, stop_process, wait_for

pytestmark = [
    pytest.mark.skipif(sys.version_info < (3, 12), reason="inspect mode runs mitmproxy, which needs Python 3.12+"),
    pytest.mark.filterwarnings("ignore:(tagMap|typeMap) is deprecated:DeprecationWarning"),  # ldap3, via mitmproxy
]

SECRET = "worker-secret-for-tests"
RULE = "svc.yaml:3"


def entry(methods: set[str], paths: tuple[str, ...], source: str) -> InspectEntry:
    return InspectEntry(frozenset(methods), paths, tuple(parse_path(p) for p in paths), source=source)


INSPECT = Inspect((
    entry({"GET"}, ("/bytes/*", "/ok/**", "/ws"), "svc.yaml:5"),
    entry({"POST"}, ("/echo",), "svc.yaml:7"),
))
PATTERN = bytes(range(256))


def pattern(n: int) -> bytes:
    return (PATTERN * (n // 256 + 1))[:n]


class Worker:
    """``python -m egressd.inspect.worker`` with its JSON lines collected by a thread."""

    def __init__(self, ca_paths: tuple[Path, Path], upstream_ca: Path) -> None:
        self.ca_cert = ca_paths[0]
        self.proc = subprocess.Popen([sys.executable, "-m", "egressd.inspect.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        config = {"secret": SECRET, "ca_cert": str(ca_paths[0]), "ca_key": str(ca_paths[1]),
                  "upstream_ca": str(upstream_ca), "log_query": False}
        self.proc.stdin.write(json.dumps(config).encode() + b"\n")
        self.proc.stdin.flush()
        self.lines: queue.Queue[dict] = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.lines.get(timeout=DEADLINE)
        assert ready.get("event") == "ready", ready
        self.port = ready["port"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            event = json.loads(line)
            if event.get("event") == "request":
                self.events.append(event)
            else:
                self.lines.put(event)

    def wait_events(self, conn_id: str, n: int = 1) -> list[dict]:
        return wait_for(lambda: len(e := [x for x in self.events if x["conn_id"] == conn_id]) >= n and e,
                        what=f"{n} events of {conn_id}")

    def stop(self) -> None:
        self.proc.stdin.close()
        stop_process(self.proc)


@pytest.fixture(scope="module")
def inspect_ca(tmp_path_factory) -> tuple[Path, Path]:
    return ca.init(tmp_path_factory.mktemp("inspect") / "ca")


@pytest.fixture(scope="module")
def worker(lab, inspect_ca):
    running = Worker(inspect_ca, lab.ca_file)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stranger(lab):
    """An origin for api.test whose certificate comes from a CA nobody trusts."""
    return lab.thread.serve(TlsOrigin(make_ca(), ["api.test"], label="stranger"))


def curl(worker, tmp_path, conn_id, path, *extra, port=None, sni="api.test", auth=f"{USER}:{SECRET}"):
    """curl through the worker; (status, headers of the last response, body bytes)."""
    head, body = tmp_path / f"{conn_id}.head", tmp_path / f"{conn_id}.body"
    cmd = [
        "curl", "-sS", "--path-as-is", "--max-time", "10", "--proxy", f"http://127.0.0.1:{worker.port}",
        "--proxy-header", f"X-Egressd-Conn: {conn_id}", "--proxy-header", f"X-Egressd-Sni: {sni}",
        "--proxy-header", "X-Egressd-Service: svc",
        "--proxy-header", f"X-Egressd-Inspect: {encode_inspect(INSPECT, RULE)}",
        "--cacert", str(worker.ca_cert), "--connect-to", f"{sni}:443:127.0.0.1:{port or worker.origin_port}",
        "-D", str(head), "-o", str(body), "-w", "%{http_code} %{http_connect}", *extra, f"https://{sni}{path}",
    ]
    if auth:
        cmd[1:1] = ["--proxy-user", auth]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    code, connect = out.stdout.split()
    blocks = head.read_text().strip().split("\r\n\r\n") if head.exists() else [""]
    headers = dict(line.lower().split(": ", 1) for line in blocks[-1].splitlines()[1:] if ": " in line)
    return int(code) or int(connect), headers, body.read_bytes() if body.exists() else b""


@pytest.fixture
def through(worker, lab, tmp_path):
    worker.origin_port = lab.tls.port
    return lambda conn_id, path, *extra, **kw: curl(worker, tmp_path, conn_id, path, *extra, **kw)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_allowed_requests_pass_with_bodies_intact_both_ways(through, worker, tmp_path, version):
    """An allowed POST and GET reach the origin; 300 KB up and 400 KB down arrive byte for byte; one event each."""
    upload = os.urandom(300_000)
    (tmp_path / "up").write_bytes(upload)
    conn = f"bodies{version}"
    status, headers, body = through(conn, "/echo", version, "--data-binary", f"@{tmp_path / 'up'}")
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(upload).digest()
    status, _, body = through(conn, "/bytes/400000", version)
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(pattern(400_000)).digest()
    echo, download = worker.wait_events(conn, 2)
    expected = "HTTP/2.0" if version == "--http2" else "HTTP/1.1"
    assert (echo["method"], echo["path"], echo["status"], echo["decision"], echo["reason"], echo["rule"]) == (
        "POST", "/echo", 200, "allow", "allowed", "svc.yaml:7")
    assert (echo["bytes_up"], echo["bytes_down"], echo["http_version"]) == (300_000, 300_000, expected)
    assert (download["bytes_up"], download["bytes_down"], download["rule"]) == (0, 400_000, "svc.yaml:5")
    assert (echo["host"], echo["service"], echo["upstream"]) == ("api.test", "svc", f"127.0.0.1:{worker.origin_port}")


class TunnelBackend(httpcore.NetworkBackend):
    """An httpcore backend whose every connection is a CONNECT to the worker for the pinned 127.0.0.1:port."""

    def __init__(self, worker_port: int, origin_port: int, conn_id: str) -> None:
        self.worker_port, self.origin_port, self.conn_id = worker_port, origin_port, conn_id
        self.inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self.inner.connect_tcp("127.0.0.1", self.worker_port, timeout=timeout)
        rec = Record(self.conn_id, time.time(), "127.0.0.1:5000", "explicit", "svc")
        stream.write(connect_head(SECRET, rec, host, "127.0.0.1", self.origin_port, INSPECT, "svc"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = stream.read(65536, timeout)
            assert chunk, "the worker closed the CONNECT"
            data += chunk
        assert data.split()[1] == b"200", data
        return stream

    def connect_unix_socket(self, *args, **kwargs):
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class PreferH2(ssl.SSLContext):
    """httpcore offers ALPN http/1.1 first and mitmproxy honours the client's order: offer h2 first instead."""

    def set_alpn_protocols(self, protocols) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


@pytest.mark.parametrize("http2", [False, True])
def test_httpx_over_http1_and_http2(worker, lab, http2):
    """httpx (HTTP/2 when asked, by ALPN) gets an allowed POST echoed intact and a refused GET answered 403."""
    context = PreferH2(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(worker.ca_cert))
    conn = f"httpx-{http2}"
    transport = httpx.HTTPTransport(verify=context, http2=http2)
    transport._pool = httpcore.ConnectionPool(ssl_context=context, http2=http2,
                                              network_backend=TunnelBackend(worker.port, lab.tls.port, conn))
    upload = os.urandom(200_000)
    with httpx.Client(transport=transport, timeout=10) as client:
        echoed = client.post("https://api.test/echo", content=upload)
        refused = client.get("https://api.test/secret")
    assert echoed.status_code == 200 and echoed.content == upload
    assert echoed.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert refused.status_code == 403 and refused.headers["x-egressd-reason"] == "request_not_allowed"
    events = worker.wait_events(conn, 2)
    assert [(e["method"], e["decision"], e["client"]) for e in events] == [
        ("POST", "allow", "127.0.0.1:5000"), ("GET", "deny", "127.0.0.1:5000")]


REFUSED = [
    ("other method", "DELETE", "/echo"),
    ("other method on a GET path", "POST", "/bytes/10"),
    ("other path", "GET", "/secret"),
    ("encoded dot segments", "GET", "/ok/%2e%2e/secret"),
    ("dot segments", "GET", "/ok/../secret"),
    ("doubled slash", "GET", "//secret"),
    ("semicolon parameter", "GET", "/ok/x;/../../secret"),
    ("encoded slash", "GET", "/ok%2F..%2Fsecret"),
    ("encoded slash in a segment", "GET", "/ok/..%2fsecret"),
    ("case", "GET", "/OK/x"),
    ("method case", "get", "/ok/x"),
]


@pytest.mark.parametrize(("case", "method", "path"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_requests_get_403_and_never_reach_the_origin(through, worker, lab, case, method, path):
    """Other methods, other paths and each normalisation trick get 403 request_not_allowed and an event."""
    before = len(lab.tls.requests)
    conn = f"refused-{case}"
    status, headers, body = through(conn, path, "--http1.1", "-X", method)
    assert status == 403 and headers["x-egressd-reason"] == "request_not_allowed"
    assert body.count(b"\n") == 1 and body.startswith(b"egressd denied ") and b"request_not_allowed" in body
    [event] = worker.wait_events(conn)
    assert (event["method"], event["path"], event["status"]) == (method, path, 403)
    assert (event["decision"], event["reason"], event["rule"]) == ("deny", "request_not_allowed", RULE)
    assert len(lab.tls.requests) == before


def test_the_origin_gets_the_normalised_path_and_the_event_no_query(through, worker, lab):
    """An allowed path is forwarded as it was checked (dot segments resolved); the event drops the query."""
    status, _, body = through("normalised", "/ok/a/../b?token=x", "--http1.1")
    assert status == 200 and b"saw GET /ok/b?token=x " in body
    [event] = worker.wait_events("normalised")
    assert event["path"] == "/ok/a/../b" and "forwarded as /ok/b?token=x" in event["detail"]


@pytest.mark.parametrize("case", ["untrusted CA", "another name"])
def test_a_bad_origin_certificate_is_502_upstream_failure(through, worker, stranger, case):
    """The worker verifies the origin for the tunnel's name: an untrusted or misnamed certificate gives 502."""
    port, sni = (stranger.port, "api.test") if case == "untrusted CA" else (None, "web.test")
    status, _, body = through(f"badcert-{case}", "/ok/x", port=port, sni=sni)
    assert status == 502, body
    [event] = worker.wait_events(f"badcert-{case}")
    assert (event["decision"], event["reason"], event["status"]) == ("deny", "upstream_failure", 502)
    assert "certificate" in event["detail"].lower()


def test_the_host_header_must_name_the_tunnel(through, worker, lab):
    """A request whose Host is another name (domain fronting) gets 421 host_mismatch and is not forwarded."""
    before = len(lab.tls.requests)
    status, headers, _ = through("fronting", "/ok/x", "--http1.1", "-H", "Host: evil.test")
    assert status == 421 and headers["x-egressd-reason"] == "host_mismatch"
    assert worker.wait_events("fronting")[0]["reason"] == "host_mismatch" and len(lab.tls.requests) == before


def test_an_upgrade_other_than_websocket_is_refused(through, worker):
    """Upgrade: h2c on an allowed path is refused: only WebSocket upgrades are inspected."""
    status, headers, _ = through("h2c", "/ok/x", "--http1.1", "-H", "Connection: Upgrade", "-H", "Upgrade: h2c")
    assert status == 403 and headers["x-egressd-reason"] == "request_not_allowed"


def connect(worker, head: bytes) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", worker.port), timeout=5)
    sock.sendall(head)
    return sock, recv_head(sock, size=1)


def auth_head(target: str, token: str | None, extra: str = "") -> bytes:
    auth = f"Proxy-Authorization: Basic {token}\r\n" if token else ""
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}X-Egressd-Conn: x\r\nX-Egressd-Sni: api.test\r\n" \
           f"X-Egressd-Inspect: {encode_inspect(INSPECT, RULE)}\r\n{extra}\r\n".encode()


def basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("token", [None, basic(USER, "wrong"), basic("other", SECRET), "not-base64!"])
def test_a_connect_without_the_secret_is_refused(worker, lab, token):
    """No, or a wrong, Proxy-Authorization gets 407: nothing in the pod can use the worker as an open proxy."""
    sock, head = connect(worker, auth_head(f"127.0.0.1:{lab.tls.port}", token))
    sock.close()
    assert head.startswith(b"HTTP/1.1 407")


def test_a_connect_to_a_name_is_refused(worker):
    """The worker never resolves: a CONNECT whose target is a name gets 400."""
    sock, head = connect(worker, auth_head("api.test:443", basic(USER, SECRET)))
    body = sock.recv(4096)
    sock.close()
    assert head.startswith(b"HTTP/1.1 400") and b"never resolves" in head + body


def test_a_plain_proxy_request_is_refused(worker, lab):
    """An absolute-form request with the right secret is not forwarded: the worker only takes TLS tunnels."""
    before = len(lab.tls.requests)
    sock, head = connect(worker, f"GET http://127.0.0.1:{lab.http.port}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 f"Proxy-Authorization: Basic {basic(USER, SECRET)}\r\n\r\n".encode())
    sock.close()
    assert head.startswith(b"HTTP/1.1 403") and len(lab.tls.requests) == before


def test_plaintext_inside_a_tunnel_is_closed(worker, lab):
    """After the 200, bytes that are not a TLS ClientHello close the tunnel; nothing reaches the origin."""
    before = len(lab.tls.requests)
    sock, head = connect(worker, auth_head(f"127.0.0.1:{lab.tls.port}", basic(USER, SECRET)))
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /ok/x HTTP/1.1\r\nHost: api.test\r\n\r\n")
    assert sock.recv(4096) == b""
    sock.close()
    assert len(lab.tls.requests) == before


@pytest.fixture(scope="module")
def ws_origin(lab):
    """A WebSocket echo server over TLS for api.test (the lab CA), in the lab thread."""
    from websockets.asyncio.server import serve

    cert = lab.ca.issue_cert("api.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def start():
        return await serve(echo, "127.0.0.1", 0, ssl=context)

    server = lab.thread.run(start())
    yield server.sockets[0].getsockname()[1]

    async def stop():
        server.close()
        await server.wait_closed()

    lab.thread.run(stop())


def test_websocket_upgrade_only_on_an_allowed_get_path(worker, ws_origin, inspect_ca):
    """A WebSocket on an allowed GET path echoes through and is one event (101, message bytes); elsewhere 403."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    context = ssl.create_default_context(cafile=str(inspect_ca[0]))
    for path in ("/ws", "/secret"):
        rec = Record(f"ws{path}", time.time(), "127.0.0.1:5000", "explicit", "svc")
        sock, head = connect(worker, connect_head(SECRET, rec, "api.test", "127.0.0.1", ws_origin, INSPECT, "svc"))
        assert head.startswith(b"HTTP/1.1 200")
        if path == "/secret":
            with pytest.raises(InvalidStatus) as refused:
                ws_connect(f"wss://api.test{path}", sock=sock, ssl=context, server_hostname="api.test")
            assert refused.value.response.status_code == 403
            continue
        with ws_connect(f"wss://api.test{path}", sock=sock, ssl=context, server_hostname="api.test") as ws:
            ws.send("hello inspect")
            assert ws.recv(timeout=5) == "hello inspect"
    [allowed] = worker.wait_events("ws/ws")
    [refused_event] = worker.wait_events("ws/secret")
    assert (allowed["status"], allowed["decision"]) == (101, "allow")
    assert (allowed["bytes_up"], allowed["bytes_down"]) == (13, 13)
    assert (refused_event["status"], refused_event["reason"]) == (403, "request_not_allowed")


# -- the engine's side: Inspector ------------------------------------------------------------------------------


def run(coro):
    import uvloop  # the engine's loop

    return asyncio.run(coro, loop_factory=uvloop.new_event_loop)


async def until(predicate, what: str, timeout: float = DEADLINE):
    end = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < end, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)
    return value


def tunnel_record(conn_id: str) -> Record:
    rec = Record(conn_id, time.time(), "127.0.0.1:4000", "explicit", "svc")
    rec.rule, rec.policy_version = RULE, "v1"
    return rec


async def curl_via_inspector(inspector: Inspector, conn_id: str, origin_port: int, ca_cert: Path, path: str) -> str:
    """Accept curl's TLS on a loopback port as a listener would, hand the tunnel over with open(), splice."""
    from egressd.relay import Side, splice

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []

    async def handle(client: Side) -> None:
        while not client.buffer and not client.eof:
            await client.read_more()  # the ClientHello, buffered: splice writes it first
        upstream = await inspector.open(tunnel_record(conn_id), "api.test", "127.0.0.1", origin_port, INSPECT, "svc")
        splice(client, upstream)

    class Accepted(Side):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            tasks.append(loop.create_task(handle(self)))

    server = await loop.create_server(lambda: Accepted(loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--cacert", str(ca_cert), "--connect-to", f"api.test:443:127.0.0.1:{port}",
        f"https://api.test{path}", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
        await asyncio.gather(*tasks)
    server.close()
    assert proc.returncode == 0, err
    return out.decode()


def test_inspector_starts_the_worker_on_first_use_and_records_each_request(lab, inspect_ca, tmp_path):
    """The worker starts on the first open(); each request in the tunnel becomes one egress.request record through
    the emit callable, counted in metrics.inspected; close() stops the worker."""
    from egressd.audit import AuditLog

    async def go():
        emitted: list[records.RequestRecord] = []
        metrics = Metrics()
        inspector = Inspector(str(inspect_ca[0]), str(inspect_ca[1]), str(lab.ca_file), False, emitted.append, metrics)
        try:
            assert inspector.pid is None
            assert "tls-origin saw GET /ok/x" in await curl_via_inspector(inspector, "t1", lab.tls.port,
                                                                           inspect_ca[0], "/ok/x?q=1")
            assert "request_not_allowed" in await curl_via_inspector(inspector, "t2", lab.tls.port, inspect_ca[0],
                                                                     "/no")
            pid = inspector.pid
            await until(lambda: len(emitted) >= 2, "two records")
        finally:
            await inspector.close()
        assert inspector.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        return emitted, metrics

    (allowed, refused), metrics = run(go())
    assert allowed.event == records.REQUEST_EVENT
    assert (allowed.conn_id, allowed.service, allowed.client, allowed.host, allowed.policy_version) == (
        "t1", "svc", "127.0.0.1:4000", "api.test", "v1")
    assert (allowed.method, allowed.path, allowed.status, allowed.decision, allowed.rule) == (
        "GET", "/ok/x", 200, "allow", "svc.yaml:5")
    assert (refused.conn_id, refused.status, refused.reason, refused.rule) == ("t2", 403, "request_not_allowed", RULE)
    assert dict(metrics.inspected) == {("svc", "allow", "allowed"): 1, ("svc", "deny", "request_not_allowed"): 1}
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    assert log.emit(allowed) and not log.emit(allowed)
    log.close()
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])
    assert line["event"] == "egress.request" and line["method"] == "GET" and line["bytes_down"] > 0


def test_a_dead_worker_fails_tunnels_closed_and_the_next_open_restarts_it(lab, inspect_ca):
    """A tunnel being handed over when the worker dies fails with upstream_failure ("the inspection worker is
    down"), never passes uninspected; the next open starts a new worker."""
    from egressd.policy.model import Reason

    async def go():
        inspector = Inspector(str(inspect_ca[0]), str(inspect_ca[1]), str(lab.ca_file), False, lambda r: None,
                              Metrics())
        args = ("api.test", "127.0.0.1", lab.tls.port, INSPECT, "svc")
        try:
            (await inspector.open(tunnel_record("d1"), *args)).close()
            first = inspector.pid
            os.kill(first, signal.SIGSTOP)
            try:
                handover = asyncio.get_running_loop().create_task(inspector.open(tunnel_record("d2"), *args))
                done, _ = await asyncio.wait([handover], timeout=0.3)
                assert not done  # waiting for the stopped worker's 200, not going anywhere else
            finally:
                os.kill(first, signal.SIGKILL)
            with pytest.raises(UpstreamFailure) as failed:
                await handover
            await until(lambda: inspector.pid is None, "the death to be noticed")
            (await inspector.open(tunnel_record("d3"), *args)).close()
            second = inspector.pid
        finally:
            await inspector.close()
        return failed.value, first, second

    failed, first, second = run(go())
    assert failed.reason is Reason.UPSTREAM_FAILURE and failed.status == 502
    assert "the inspection worker is down" in str(failed) and "uninspected" in str(failed)
    assert second is not None and second != first


def test_a_worker_that_cannot_start_fails_closed_with_its_reason_and_backs_off(lab, inspect_ca, tmp_path):
    """A worker that cannot load the CA fails the open with the worker's own reason; repeated failures back off."""

    async def go():
        inspector = Inspector(str(inspect_ca[0]), str(tmp_path / "missing.key"), None, False, lambda r: None,
                              Metrics())
        failures = []
        try:
            for n in range(3):
                with pytest.raises(UpstreamFailure) as failed:
                    await inspector.open(tunnel_record(f"s{n}"), "api.test", "127.0.0.1", lab.tls.port, INSPECT, "svc")
                failures.append(str(failed.value))
        finally:
            await inspector.close()
        return failures

    first, second, third = run(go())
    assert "the inspection worker is down" in first and "cannot read the inspection CA" in first
    assert "missing.key" in second
    assert "next start in" in third


# -- the CA ------------------------------------------------------------------------------------------------------


def test_init_makes_a_ca_whose_key_only_its_user_reads_and_never_overwrites(tmp_path):
    """inspect-ca init writes ca.crt and ca.key (0600); load accepts them; a second init refuses to overwrite."""
    from egressd.cli import main

    assert main(["inspect-ca", "init", str(tmp_path / "ca")]) == 0
    cert_path, key_path = tmp_path / "ca" / ca.CERT_FILE, tmp_path / "ca" / ca.KEY_FILE
    assert key_path.stat().st_mode & 0o777 == 0o600 and (tmp_path / "ca").stat().st_mode & 0o777 == 0o700
    cert, _ = ca.load(cert_path, key_path)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert main(["inspect-ca", "init", str(tmp_path / "ca")]) == 2


from cryptography import x509  # noqa: E402  (used by the CA tests only)
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402


def _bad_ca(kind: str, tmp_path: Path, lab) -> tuple[Path, Path]:
    cert, key = ca.init(tmp_path / "good")
    if kind == "key readable by others":
        key.chmod(0o644)
    elif kind == "key of another CA":
        key.chmod(0o600)
        key.write_bytes(ca.init(tmp_path / "other")[1].read_bytes())
    elif kind == "Ed25519 key":
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        key.write_bytes(pem)
    elif kind == "not a CA":
        leaf = lab.ca.issue_cert("leaf.test")
        cert.write_bytes(leaf.cert_chain_pems[0].bytes())
        key.write_bytes(leaf.private_key_pem.bytes())
    elif kind == "missing key":
        key.unlink()
    return cert, key


@pytest.mark.parametrize(("kind", "message"), [
    ("key readable by others", "other users may read the CA key"),
    ("key of another CA", "is not the key of"),
    ("Ed25519 key", "cannot sign mitmproxy's leaf certificates"),
    ("not a CA", "is not a CA certificate"),
    ("missing key", "cannot read the inspection CA"),
])
def test_load_refuses_a_ca_it_cannot_use_safely(tmp_path, lab, kind, message):
    """Each unusable CA is refused with what is wrong and what to do."""
    cert, key = _bad_ca(kind, tmp_path, lab)
    with pytest.raises(ca.CaError, match=message):
        ca.load(cert, key)


# -- isolation and the pure parts ---------------------------------------------------------------------------------


def test_the_core_never_imports_mitmproxy():
    """egressd, its engine, listeners, CLI and the engine's side of inspection import no mitmproxy module."""
    code = (
        "import sys, egressd, egressd.connection, egressd.app, egressd.cli, egressd.listeners.explicit, "
        "egressd.listeners.transparent, egressd.inspect.client, egressd.inspect.rules, egressd.inspect.ca; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mitmproxy', 'mitmproxy_rs')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_inspect_header_round_trips_and_refuses_garbage():
    """The engine's X-Egressd-Inspect value decodes to the same entries, sources and rule; garbage is refused."""
    inspect, rule = decode_inspect(encode_inspect(INSPECT, RULE))
    assert inspect == INSPECT and rule == RULE
    assert [e.source for e in inspect.entries] == ["svc.yaml:5", "svc.yaml:7"]
    def b64(data: dict) -> str:
        import base64

        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()

    for bad in ("", "not base64!", b64({"entries": []}), b64({"entries": [{"methods": ["get"], "paths": ["/x"]}]}),
                b64({"entries": [{"methods": ["GET"], "paths": ["x"]}]}), b64({"rule": "f:1"})):
        with pytest.raises(ValueError, match="X-Egressd-Inspect"):
            decode_inspect(bad)


@pytest.mark.parametrize(("normalised", "raw", "forwarded"), [
    ("/ok/b", "/ok/a/../b?x=1#frag", "/ok/b?x=1"),
    ("/ok/b", "/ok//b", "/ok/b"),
    ("/caf\u00e9/a b", "/caf%C3%A9/a%20b", "/caf%C3%A9/a%20b"),
    ("/ok/", "/ok/", "/ok/"),
])
def test_the_forwarded_target_is_the_checked_path_reencoded(normalised, raw, forwarded):
    """The origin is sent the normalised path, percent-encoded again, with the client's query."""
    from egressd.inspect.addon import forwarded_target

    assert forwarded_target(normalised, raw) == forwarded


def _headers(**extra: str):
    from mitmproxy import http

    fields = {"Proxy-Authorization": f"Basic {basic(USER, SECRET)}", "X-Egressd-Conn": "c9",
              "X-Egressd-Sni": "API.test.", "X-Egressd-Inspect": encode_inspect(INSPECT, RULE), **extra}
    return http.Headers([(k.encode(), v.encode()) for k, v in fields.items() if v is not None])


@pytest.mark.parametrize(("extra", "host", "status"), [
    ({"Proxy-Authorization": None}, "127.0.0.1", 407),
    ({"Proxy-Authorization": "Bearer " + SECRET}, "127.0.0.1", 407),
    ({}, "api.test", 400),
    ({"X-Egressd-Sni": None}, "127.0.0.1", 400),
    ({"X-Egressd-Inspect": "e30="}, "127.0.0.1", 400),
])
def test_admit_refuses_a_connect_it_must_not_serve(extra, host, status):
    """admit() wants the secret, an IP literal target and well-formed metadata."""
    from egressd.inspect.addon import Refused, admit

    with pytest.raises(Refused) as refused:
        admit(_headers(**extra), host, 443, SECRET)
    assert refused.value.status == status


@pytest.mark.parametrize(("log_query", "logged"), [(False, "/ok/x"), (True, "/ok/x?token=1")])
def test_the_query_string_is_logged_only_when_asked(log_query, logged):
    """The event's path has no query string unless --inspect-log-query."""
    from mitmproxy.test import tflow

    from egressd.inspect.addon import Inspection, admit

    events: list[dict] = []
    addon = Inspection(SECRET, events.append, log_query)
    flow = tflow.tflow(resp=True)
    flow.client_conn.tls = True
    flow.request.host, flow.request.port, flow.request.path = "127.0.0.1", 443, "/ok/x?token=1"
    flow.request.headers["host"] = "api.test"
    addon.tunnels[flow.client_conn.id] = admit(_headers(), "0:0::0:127.0.0.1", 443, SECRET)
    addon.tunnels[flow.client_conn.id].ip = "127.0.0.1"
    addon.requestheaders(flow)
    addon.response(flow)
    [event] = events
    assert event["path"] == logged and event["decision"] == "allow" and event["host"] == "api.test"
