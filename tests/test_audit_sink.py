"""When the audit log cannot be written: nothing is dropped or torn, new connections are refused, it recovers.

The writer is tested with a fake write end (the simplest honest way to cut a
write short or make it fail on cue); the proxy with a real full file system (a
tmpfs in a private mount namespace) and a real pipe whose reader stops.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Lab, service_yaml
from egressd import records as audit
from egressd.audit import CLOSE_TIMEOUT, AuditLog
from egressd.auditwriter import AuditWriter
from egressd.metrics import Metrics
from egressd.records import Record
from harness import DEADLINE, ProxyProcess, connect_tunnel, http_get, raw_request, wait_for, write_allowlists

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


# -- the writer, with a fake write end ------------------------------------------------------------------------


class FakeDisk:
    """A write end with ``room`` bytes left: a write gets what fits, then ENOSPC; ``gate`` cleared blocks writes."""

    def __init__(self, room: float = float("inf"), step: int | None = None) -> None:
        self.data = bytearray()
        self.room = room
        self.step = step
        self.gate = threading.Event()
        self.gate.set()

    def write(self, view: memoryview) -> int:
        self.gate.wait()
        n = min(len(view), self.room, self.step or len(view))
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.data += view[: int(n)]
        self.room -= n
        return int(n)

    def lines(self) -> list[dict]:
        """Every record parsed (a torn line fails here), without the final checkpoint."""
        assert self.data.endswith(b"\n") or not self.data
        *records, final = [json.loads(line) for line in self.data.splitlines()]
        assert final[audit.EVENT] == audit.CHECKPOINT_EVENT and final[audit.FINAL] is True
        return records


def record(conn_id: str, reason: str = "allowed", started: float = 1_700_000_000.5) -> Record:
    rec = Record(conn_id, started, "127.0.0.1:40000", "explicit", "svc")
    rec.host, rec.port, rec.protocol, rec.reason = "api.test", 443, "connect", reason
    return rec


def test_partial_writes_keep_the_rest_and_write_it_first():
    """Writes that take a few bytes at a time still deliver every line whole and in order."""
    disk = FakeDisk(step=7)
    log = AuditLog(writer=AuditWriter(disk.write, "fake"))
    for n in range(30):
        log.emit(record(f"c{n}"))
    assert log.close(timeout=DEADLINE) == 0
    assert [r["conn_id"] for r in disk.lines()] == [f"c{n}" for n in range(30)]


def test_full_disk_keeps_every_line_makes_the_log_unavailable_and_recovers():
    """A write cut short by ENOSPC keeps its rest and every later line, counts errors, and writes all once space is
    back."""
    disk = FakeDisk(room=1000)
    log = AuditLog(writer=AuditWriter(disk.write, "fake"))
    for n in range(10):
        log.emit(record(f"c{n}"))
    wait_for(lambda: log.unavailable, what="unavailable")
    assert "No space left on device" in log.unavailable
    assert len(disk.data) == 1000 and log.state()[1] == 10 and log.state()[2] == 0
    disk.room = float("inf")
    wait_for(lambda: log.unavailable is None, what="available again")
    assert log.close(timeout=DEADLINE) == 0
    assert [r["conn_id"] for r in disk.lines()] == [f"c{n}" for n in range(10)]
    assert log.state()[0] >= 1


def test_blocked_write_makes_the_log_unavailable_until_it_ends():
    """A write blocked longer than stall_after (a reader that stopped reading) makes the log unavailable, until it
    ends."""
    disk = FakeDisk()
    disk.gate.clear()
    log = AuditLog(writer=AuditWriter(disk.write, "fake", stall_after=0.2))
    log.emit(record("c0"))
    assert log.unavailable is None
    why = wait_for(lambda: log.unavailable, what="stalled")
    assert "blocked" in why
    disk.gate.set()
    wait_for(lambda: log.unavailable is None, what="available again")
    assert log.close(timeout=DEADLINE) == 0 and [r["conn_id"] for r in disk.lines()] == ["c0"]


def test_refusals_past_the_bound_are_counted_and_summed_up_in_one_gap_record():
    """Admitted connections' records are always kept; refusals past max_pending become one egress.audit_gap
    record."""
    disk = FakeDisk(room=0)
    log = AuditLog(writer=AuditWriter(disk.write, "fake"), max_pending=4)
    log.emit(record("a0"))
    wait_for(lambda: log.state()[0] >= 1, what="a failed write")  # a0 is held by the writer from now on
    log.emit(record("a1"))
    log.emit(record("a2"))
    for n in range(10):
        log.emit(record(f"r{n}", "audit_unavailable", 1_700_000_100.0 + n))
    log.emit(record("a3"))
    assert log.unrecorded == 8
    disk.room = float("inf")
    assert log.close(timeout=DEADLINE) == 0
    *kept, gap = disk.lines()
    assert [r["conn_id"] for r in kept] == ["a0", "a1", "a2", "r0", "r1", "a3"]
    assert set(gap) == set(audit.GAP_FIELDS) and gap[audit.EVENT] == audit.GAP_EVENT
    assert (gap[audit.REFUSED], gap[audit.TS], gap[audit.LAST_TS]) == (
        8, audit.rfc3339(1_700_000_102.0), audit.rfc3339(1_700_000_109.0)
    )
    assert log.unrecorded == 0


def test_close_gives_up_at_its_deadline_and_says_how_many_lines_are_left():
    """Closing with a write that never ends returns after the deadline with the number of unwritten lines."""
    disk = FakeDisk()
    disk.gate.clear()
    log = AuditLog(writer=AuditWriter(disk.write, "fake"))
    for n in range(3):
        log.emit(record(f"c{n}"))
    started = time.monotonic()
    assert log.close(timeout=0.3) == 3
    assert time.monotonic() - started < 2
    disk.gate.set()


def test_workers_audit_state_is_summed():
    """The supervisor's metrics sum the workers' failed writes and waiting records; available only if all are."""
    workers = []
    for state in ((2, 5, 1), (3, 7, 0)):
        metrics = Metrics()
        metrics.audit_source = lambda state=state: state
        workers.append(metrics.snapshot())
    total = Metrics()
    total.load_sum(workers)
    assert total.audit() == (5, 12, 0)


# -- the proxy, with a real full file system and a real stalled pipe ------------------------------------------


@pytest.fixture
def launch(lab: Lab, tmp_path: Path) -> Iterator:
    """Start egressd allowing CONNECT to the echo origin; stopped (or killed) after the test."""
    started: list[ProxyProcess] = []

    def start(*extra: str, audit_path: Path | None = None, prefix: list | None = None, stdout: int) -> ProxyProcess:
        rule = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n"
        directory = write_allowlists(tmp_path / f"allowlists{len(started)}", {"svc.yaml": service_yaml(rule)})
        args = [
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--workers", "1",
            "--allowlists", str(directory), "--service", "svc",
            "--resolver", f"{lab.dns.address[0]}:{lab.dns.address[1]}", "--allow-cidr", "127.0.0.0/8",
            *extra,
        ]
        proxy = ProxyProcess(args, audit_path, wrap=prefix, stdout=stdout)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def tunnel(proxy: ProxyProcess, lab: Lab) -> bytes:
    """One CONNECT to the echo origin, closed again at once; the proxy's answer head."""
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    sock.close()
    return head


def denied(proxy: ProxyProcess) -> bytes:
    """One CONNECT to a name no rule allows; the proxy's answer."""
    return raw_request(proxy.address, b"CONNECT nope.test:443 HTTP/1.1\r\nHost: nope.test:443\r\n\r\n")


def until_refused(attempt, served: bytes) -> int:
    """Call attempt() until it is answered 503 audit_unavailable; return how many were served before."""
    end = time.monotonic() + DEADLINE
    count = 0
    while True:
        answer = attempt()
        if not answer.startswith(served):
            assert answer.startswith(b"HTTP/1.1 503") and b"X-Egressd-Reason: audit_unavailable" in answer, answer
            return count
        count += 1
        assert time.monotonic() < end, f"still served after {count} connections"


def assert_refusing(proxy: ProxyProcess, why: str) -> None:
    assert http_get(proxy.admin, "/healthz")[0] == 200
    status, body = http_get(proxy.admin, "/readyz")
    assert status == 503 and "audit log cannot be written" in body and why in body, body
    assert proxy.metric("egressd_audit_available") == 0
    assert proxy.metric("egressd_connections_total", reason="audit_unavailable", decision="deny") >= 1


def whole_lines(data: bytes) -> list[dict]:
    """Every record parsed (a torn line fails; checkpoints left out), conn_ids unique (no record written twice)."""
    assert data.endswith(b"\n")
    lines = [json.loads(line) for line in data.splitlines()]
    records = [r for r in lines if r["event"] != audit.CHECKPOINT_EVENT]
    assert len({r["conn_id"] for r in records}) == len(records)
    return records


def tmpfs_prefix(mount: Path) -> list[str]:
    """A command prefix that runs the proxy in a private mount namespace with a 64 KiB tmpfs on ``mount``."""
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"', str(mount)]


def fill(directory: Path) -> None:
    """Fill the file system of ``directory`` to the last byte with a file named filler (ENOSPC)."""
    filler = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)  # unbuffered: nothing left to flush
    try:
        while True:
            os.write(filler, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(filler)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs in a private mount namespace needs root")
def test_full_file_system_refuses_new_connections_loses_no_record_and_recovers(lab, launch, tmp_path):
    """With the audit file on a full file system egressd refuses new connections (503 audit_unavailable, /readyz
    503, errors counted), and once space is freed serves again by itself with every record written whole, once."""
    mount = tmp_path / "fs"
    mount.mkdir()
    prefix = tmpfs_prefix(mount)
    proxy = launch(audit_path=mount / "audit.jsonl", prefix=prefix, stdout=subprocess.DEVNULL)
    inside = Path(f"/proc/{proxy.proc.pid}/root") / mount.relative_to("/")  # the tmpfs, seen from here
    audit_file = inside / "audit.jsonl"
    assert tunnel(proxy, lab).startswith(b"HTTP/1.1 200")
    wait_for(lambda: audit_file.stat().st_size > 0, what="the first record")
    fill(inside)
    admitted = 1 + until_refused(lambda: tunnel(proxy, lab), b"HTTP/1.1 200")
    assert_refusing(proxy, "No space left on device")
    assert proxy.metric("egressd_audit_write_errors_total") > 0
    assert tunnel(proxy, lab).startswith(b"HTTP/1.1 503")
    refused = 2
    (inside / "filler").unlink()
    wait_for(lambda: http_get(proxy.admin, "/readyz")[0] == 200, what="ready again")
    assert tunnel(proxy, lab).startswith(b"HTTP/1.1 200")
    admitted += 1
    wait_for(lambda: (data := audit_file.read_bytes()).count(b"\n") - data.count(b'"egress.checkpoint"')
             == admitted + refused, what="every record")
    records = whole_lines(audit_file.read_bytes())
    assert sum(r["reason"] == "allowed" for r in records) == admitted
    assert sum(r["reason"] == "audit_unavailable" for r in records) == refused
    assert proxy.metric("egressd_audit_available") == 1


def test_stalled_stdout_reader_does_not_freeze_the_proxy(lab, launch):
    """With stdout a pipe nobody reads, /healthz answers at once and new connections get 503 audit_unavailable;
    once the pipe is read again egressd serves by itself and every record arrives whole, once."""
    proxy = launch(stdout=subprocess.PIPE)
    served = until_refused(lambda: denied(proxy), b"HTTP/1.1 403")
    started = time.monotonic()
    assert_refusing(proxy, "blocked")
    assert time.monotonic() - started < 1.0
    assert denied(proxy).startswith(b"HTTP/1.1 503")
    refused = 2
    output = bytearray()

    def read() -> None:
        assert proxy.proc.stdout is not None
        while chunk := os.read(proxy.proc.stdout.fileno(), 65536):
            output.extend(chunk)

    threading.Thread(target=read, daemon=True).start()
    wait_for(lambda: http_get(proxy.admin, "/readyz")[0] == 200, what="ready again")
    assert denied(proxy).startswith(b"HTTP/1.1 403")
    served += 1
    wait_for(lambda: output.count(b"\n") - output.count(b'"egress.checkpoint"') == served + refused,
             what="every record")
    records = whole_lines(bytes(output))
    assert len(output) > 65536  # more than a pipe holds
    assert sum(r["reason"] == "not_allowlisted" for r in records) == served
    assert sum(r["reason"] == "audit_unavailable" for r in records) == refused


def test_sigterm_ends_the_proxy_promptly_while_stdout_is_stalled(lab, launch):
    """SIGTERM ends egressd within seconds while its stdout pipe is full and unread, and stderr says how many records
    were not written."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x" * fcntl.fcntl(write_end, F_GETPIPE_SZ))  # full before egressd writes a byte
        proxy = launch("--drain-timeout", "0.5", stdout=write_end)
        assert denied(proxy).startswith(b"HTTP/1.1 403")
        assert http_get(proxy.admin, "/healthz")[0] == 200
        started = time.monotonic()
        proxy.proc.terminate()
        assert proxy.proc.wait(timeout=CLOSE_TIMEOUT + 5) == 1
        assert time.monotonic() - started < CLOSE_TIMEOUT + 3
        assert proxy.wait_log("audit.unwritten")["records"] == 1
    finally:
        os.close(read_end)
        os.close(write_end)


def dns_rcode(proxy: ProxyProcess, name: str = "echo.test") -> str:
    """The DNS filter's answer code for an A query of ``name`` over UDP."""
    import dns.message
    import dns.query
    import dns.rcode

    answer = dns.query.udp(dns.message.make_query(name, "A"), proxy.dns[0][0], port=proxy.dns[0][1], timeout=5)
    return dns.rcode.to_text(answer.rcode())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs in a private mount namespace needs root")
def test_full_file_system_makes_the_dns_filter_answer_servfail_until_records_can_be_written(lab, launch, tmp_path):
    """The DNS filter fails closed like the proxy: while the audit file's file system is full every query gets
    SERVFAIL with reason audit_unavailable (counted, and recorded once space is back), and it answers again by
    itself when it can write."""
    mount = tmp_path / "fs"
    mount.mkdir()
    prefix = tmpfs_prefix(mount)
    proxy = launch("--dns-listen", "127.0.0.1:0", "--transparent-listen", "127.0.0.1:0",
                   audit_path=mount / "audit.jsonl", prefix=prefix, stdout=subprocess.DEVNULL)
    inside = Path(f"/proc/{proxy.proc.pid}/root") / mount.relative_to("/")
    assert dns_rcode(proxy) == "NOERROR"
    wait_for(lambda: (inside / "audit.jsonl").stat().st_size > 0, what="the first record")
    fill(inside)
    until_refused(lambda: tunnel(proxy, lab), b"HTTP/1.1 200")  # the writer has met the full disk
    assert dns_rcode(proxy) == "SERVFAIL"
    transparent = tuple(proxy.wait_log("egressd.started")["transparent"][0])
    with socket.create_connection(transparent, timeout=5) as redirected, pytest.raises(ConnectionResetError):
        redirected.sendall(b"\x16\x03\x01")  # reset at accept: here, or at the read
        redirected.recv(1)
    assert proxy.metric("egressd_dns_queries_total", service="svc", decision="deny", reason="audit_unavailable") >= 1
    (inside / "filler").unlink()
    wait_for(lambda: http_get(proxy.admin, "/readyz")[0] == 200, what="ready again")
    assert dns_rcode(proxy) == "NOERROR"
    def refusal_recorded() -> bool:
        lines = (inside / "audit.jsonl").read_bytes().splitlines()
        records = map(json.loads, lines)
        refused = {(r["event"], r.get("listener")) for r in records if r.get("reason") == "audit_unavailable"}
        return {("egress.dns", None), ("egress.connection", "transparent")} <= refused

    wait_for(refusal_recorded, what="the refusal recorded")


def test_closed_stdout_pipe_makes_the_dns_filter_answer_servfail(lab, launch):
    """Records to stdout and the reader gone (EPIPE): the DNS filter answers SERVFAIL audit_unavailable and the
    proxy 503, and the process keeps running and answering /healthz."""
    proxy = launch("--dns-listen", "127.0.0.1:0", stdout=subprocess.PIPE)
    assert dns_rcode(proxy) == "NOERROR"
    assert proxy.proc.stdout is not None
    proxy.proc.stdout.close()  # nobody will ever read the records again
    until_refused(lambda: tunnel(proxy, lab), b"HTTP/1.1 200")
    assert_refusing(proxy, "Broken pipe")
    assert dns_rcode(proxy) == "SERVFAIL"
    assert proxy.metric("egressd_dns_queries_total", service="svc", decision="deny", reason="audit_unavailable") >= 1
    assert proxy.proc.poll() is None
