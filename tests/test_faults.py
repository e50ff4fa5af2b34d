"""Faults survived, failing closed: DNS down, slow or answering garbage; an upstream that resets mid-stream;
the allowlists emptied, deleted or half-written under a running proxy; SIGTERM with a thousand open tunnels.

Each fault is made for real on loopback (a resolver port with nothing behind it, a UDP server answering
noise, an origin that resets), and each test checks both halves: refused with its reason while the fault
lasts, and served again, by itself, once it is gone.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from conftest import service_yaml
from egressd.lab import DnsServer, LabThread
from harness import ProxyProcess, connect_tunnel, raw_request, wait_for, write_allowlists

DEADLINE = 15.0


def echo_rule(lab, host: str = "echo.test") -> str:
    return f"  - host: {host}\n    ports: [{lab.echo.port}]\n"


def connect(proxy, authority: str) -> bytes:
    return raw_request(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def noise_server(port: int) -> Iterator[None]:
    """A UDP server on ``port`` that answers every datagram with bytes that are no DNS message."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.1)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(data[:2] + b"\xff" * 5, peer)  # its query ID, then a header cut short

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        sock.close()


@pytest.mark.parametrize("fault", ["down", "garbage"])
def test_a_resolver_down_or_answering_garbage_denies_dns_failure_then_recovers_by_itself(lab, tmp_path, fault):
    """While the only resolver is down (nothing on its port) or answers noise, connections are denied 502
    dns_failure; once a real resolver answers on that port, the same proxy serves again with no restart."""
    port = free_udp_port()
    directory = write_allowlists(tmp_path / "allowlists", {"svc.yaml": service_yaml(echo_rule(lab))})
    proxy = ProxyProcess(
        ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--workers", "1", "--allowlists", str(directory),
         "--service", "svc", "--resolver", f"127.0.0.1:{port}", "--allow-cidr", "127.0.0.0/8", "--dns-timeout", "0.5"],
        tmp_path / "audit.jsonl",
    )
    try:
        _fail_then_recover(lab, proxy, port, fault)
    finally:
        proxy.stop()


def _fail_then_recover(lab, proxy: ProxyProcess, port: int, fault: str) -> None:
    with noise_server(port) if fault == "garbage" else contextlib.nullcontext():
        answer = connect(proxy, f"echo.test:{lab.echo.port}")
        assert answer.startswith(b"HTTP/1.1 502 ") and b"X-Egressd-Reason: dns_failure" in answer, answer
    with LabThread() as thread:
        thread.serve(DnsServer({"echo.test": ("127.0.0.1",)}), "127.0.0.1", port)

        def served() -> bool:
            sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
            sock.close()
            return head.startswith(b"HTTP/1.1 200")

        wait_for(served, DEADLINE, "served again once the resolver answers")
    records = wait_for(lambda: (r := proxy.records()) and r[-1]["reason"] == "allowed" and r, DEADLINE, "records")
    assert records[0]["reason"] == "dns_failure"
    assert proxy.proc.poll() is None


class ResettingOrigin:
    """A TCP origin that reads a line, sends ``size`` bytes and, once told (:attr:`reset`), resets the
    connection (RST, not FIN) with the tunnel still open."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"d" * self.size)
            self.reset.wait(DEADLINE)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


def test_an_upstream_that_resets_mid_stream_gets_one_record_with_the_bytes_that_passed(lab, start_proxy):
    """An origin that sends 100,000 bytes and then resets ends the tunnel (the client sees the reset or EOF);
    its one record counts exactly the bytes that went each way."""
    origin = ResettingOrigin(100_000)
    try:
        proxy = start_proxy({"svc.yaml": service_yaml(f"  - host: echo.test\n    ports: [{origin.port}]\n")})
        sock, head = connect_tunnel(proxy.address, f"echo.test:{origin.port}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200")
            sock.sendall(b"hello\n")
            received = 0
            while received < 100_000 and (chunk := sock.recv(65536)):
                received += len(chunk)
            origin.reset.set()  # every byte is through: the reset cannot take any back (TCP drops unread data)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        assert received == 100_000
        [record] = proxy.wait_records(1)
        assert (record["bytes_up"], record["bytes_down"]) == (6, 100_000)
        wait_for(lambda: proxy.metric("egressd_active_connections", service="svc") == 0, what="closed")
        assert len(proxy.records()) == 1
    finally:
        origin.close()


def _emptied(directory) -> None:
    for path in directory.iterdir():
        path.unlink()


def _deleted(directory) -> None:
    shutil.rmtree(directory)


def _half_written(directory) -> None:
    path = directory / "svc.yaml"
    text = path.read_text()
    path.write_text(text[: text.index("ports: [") + len("ports: [") + 2])  # a write cut inside a flow list


@pytest.mark.parametrize("fault", [_emptied, _deleted, _half_written], ids=["emptied", "deleted", "half-written"])
def test_allowlists_emptied_deleted_or_half_written_keep_the_last_good_policy(lab, start_proxy, tmp_path, fault):
    """Under a running proxy the allowlist directory is emptied, deleted or left with a half-written file: the
    reload fails (counted as result="error"), the last good policy keeps deciding, and restoring the files
    reloads by itself."""
    good = {"svc.yaml": service_yaml(echo_rule(lab) + echo_rule(lab, "api.test"))}
    proxy = start_proxy(good)
    directory = tmp_path / "allowlists0"
    fault(directory)
    wait_for(lambda: proxy.metric("egressd_policy_reloads_total", result="error") >= 1, DEADLINE, "reload failed")
    assert proxy.metric("egressd_policy_last_reload_success") == 0
    sock, head = connect_tunnel(proxy.address, f"api.test:{lab.echo.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert connect(proxy, "nope.test:443").startswith(b"HTTP/1.1 403 ")
    directory.mkdir(exist_ok=True)
    (directory / "svc.yaml").write_text(good["svc.yaml"])
    wait_for(lambda: proxy.metric("egressd_policy_last_reload_success") == 1, DEADLINE, "reloaded after the fix")


def test_sigterm_with_a_thousand_open_tunnels_flushes_every_record(lab, start_proxy):
    """SIGTERM while 1,000 tunnels are open: the drain ends them all and every one has exactly one record."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096  # this process holds both ends' clients here, and the lab's origin sockets
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} file descriptors in the test process; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    proxy = start_proxy({"svc.yaml": service_yaml(echo_rule(lab))}, "svc", "--drain-timeout", "0.5",
                        "--max-connections-per-client", "2000")
    tunnels = []
    try:
        for _ in range(1000):
            sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
            tunnels.append(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
        wait_for(lambda: proxy.metric("egressd_active_connections", service="svc") == 1000, DEADLINE, "1,000 open")
        proxy.signal(signal.SIGTERM)
        assert proxy.proc.wait(DEADLINE) == 0
    finally:
        for sock in tunnels:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    records = proxy.records()
    assert len(records) == 1000 and len({r["conn_id"] for r in records}) == 1000
    assert all(r["event"] == "egress.connection" and r["decision"] == "allow" for r in records)
