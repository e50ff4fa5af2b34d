"""The chain of audit lines: canonical JSON, seq and chain values, checkpoints by count and by time, signed, sealed
in the order lines are written; stream names and signing keys; the auditor's recipes of docs/forensics.md (its
Python checker and its jq queries) run as printed."""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from egressd import records as audit
from egressd.audit import AuditLog
from egressd.auditchain import (
    WORKER_ENV,
    AuditKeyError,
    Chain,
    Line,
    Signer,
    default_stream,
    genesis,
    key_id,
    link,
    load_signer,
    signed_message,
    stream_name,
    verify,
)
from egressd.auditformats import FORMATS
from egressd.auditwriter import AuditWriter
from harness import Clock, wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs" / "forensics.md"
STREAM = "pod-a/1/2026-11-23T05:21:12.123456Z"


def sample(n: int, service: str = "svc", decision: str = "deny") -> dict[str, Any]:
    """The native fields of connection record n (what Record.fields() gives, with its event)."""
    rec = audit.Record(f"c{n}", 1_700_000_000.5 + n, f"10.1.0.{n % 250}:{40000 + n}", "explicit", service)
    rec.host, rec.port, rec.protocol, rec.decision = "api.test", 443, "connect", decision
    rec.reason = "allowed" if decision == "allow" else "not_allowlisted"
    rec.duration_ms, rec.detail = 1.5 + n, "naïve ünïcode ✓"
    return {**rec.fields(), audit.EVENT: rec.event}


def signer() -> Signer:
    key = Ed25519PrivateKey.generate()
    return Signer(key, key_id(key.public_key()))


class Disk:
    """A write end that keeps what it is given (the writer thread writes to it)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def write(self, view: memoryview) -> int:
        with self.lock:
            self.data += view
        return len(view)

    def records(self) -> list[dict]:
        with self.lock:
            return [json.loads(line) for line in bytes(self.data).splitlines()]

    def lines(self) -> list[Line]:
        with self.lock:
            return [Line(f"disk:{n}", raw) for n, raw in enumerate(bytes(self.data).splitlines(), 1)]


def stdlib_chain(lines: list[bytes], path: tuple[str, ...]) -> list[str]:
    """Each line's chain value recomputed with the standard library only, the chain taken from ``path``."""
    values, previous = [], None
    for raw in lines:
        record = json.loads(raw)
        node = record
        for key in path[:-1]:
            node = node[key]
        claimed = node.pop(path[-1])
        stream = record.get("stream") or record.get("egressd", {}).get("stream") or record["unmapped"]["stream"]
        canon = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        previous = hashlib.sha256((previous or hashlib.sha256(stream.encode()).hexdigest()).encode() + canon)
        previous = previous.hexdigest()
        assert previous == claimed
        values.append(previous)
    return values


def test_a_native_line_is_its_canonical_json_with_the_chain_value_appended():
    """A native line without its chain field is byte for byte the sorted, spaceless JSON the chain covers."""
    chain = Chain(STREAM)
    line = chain.record(sample(1))
    canon, tail = line.rsplit(b',"chain":"', 1)
    assert tail == chain.last.encode() + b'"}'
    record = json.loads(line)
    assert (record["stream"], record["seq"]) == (STREAM, 1)
    del record["chain"]
    assert canon + b"}" == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert chain.last == link(genesis(STREAM), canon + b"}") == hashlib.sha256(
        hashlib.sha256(STREAM.encode()).hexdigest().encode() + canon + b"}").hexdigest()


@pytest.mark.parametrize("fmt", ["native", "ecs", "ocsf"])
def test_each_line_chains_to_the_one_before_from_the_genesis_value(fmt):
    """Recomputed independently, every line's chain value covers the one before and its own canonical JSON, in each
    format, checkpoints included."""
    layout = FORMATS[fmt]
    chain = Chain(STREAM, layout, signer(), every_records=3)
    lines = []
    for n in range(7):
        lines.append(chain.record(sample(n)))
        if chain.due():
            lines.append(chain.checkpoint(1_700_000_100.0))
    lines.append(chain.checkpoint(1_700_000_200.0, final=True))
    assert stdlib_chain(lines, layout.chain_path)[-1] == chain.last
    natives = [layout.to_native(json.loads(line)) for line in lines]
    assert [n["seq"] for n in natives] == list(range(1, 11))
    assert [n["event"] == audit.CHECKPOINT_EVENT for n in natives] == [False] * 3 + [True] + [False] * 3 + [True] + [
        False, True]


def auditors_script() -> str:
    """The standard-library checker of docs/forensics.md, as printed there."""
    text = DOCS.read_text()
    section = text[text.index("## The chain, exactly"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_auditors_python_in_the_docs_checks_a_log_and_finds_an_edit(tmp_path):
    """The ten lines of Python in docs/forensics.md accept a log of two interleaved streams and name an edited line."""
    script = tmp_path / "check.py"
    script.write_text(auditors_script())
    first, second = Chain(STREAM), Chain("pod-b/7/2026-11-23T05:21:13.000001Z", signer=signer())
    lines = []
    for n in range(6):
        lines.append((first if n % 2 else second).record(sample(n)))
    lines += [first.checkpoint(1_700_000_100.0, final=True), second.checkpoint(1_700_000_100.0, final=True)]
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"\n".join(lines) + b"\n")
    done = subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines[3] = lines[3].replace(b'"decision":"deny"', b'"decision":"allow"')
    log.write_bytes(b"\n".join(lines) + b"\n")
    done = subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "line 4: edited" in done.stderr


def test_checkpoints_follow_every_n_records_and_the_last_one_is_final():
    """With N=3 a checkpoint follows records 3 and 6 at once, vouching for the line before it; close adds the final
    one."""
    disk = Disk()
    log = AuditLog(writer=AuditWriter(disk.write, "disk"), chain=Chain(STREAM, every_records=3, every_seconds=3600))
    for n in range(7):
        log.emit(audit.Record(f"c{n}", 1_700_000_000.0, "10.0.0.1:1", "explicit", "svc"))
    assert log.close(timeout=5) == 0
    lines = disk.records()
    kinds = ["C" if r["event"] == audit.CHECKPOINT_EVENT else "r" for r in lines]
    assert "".join(kinds) == "rrrCrrrCrC"
    assert [r["seq"] for r in lines] == list(range(1, 11))
    for n, record in enumerate(lines):
        if kinds[n] == "C":
            before = lines[n - 1]
            assert (record["covers_seq"], record["covers_chain"]) == (before["seq"], before["chain"])
            assert record["records"] == kinds[:n].count("r") and record["final"] == (n == 9)
            assert record["key_id"] is None and record["signature"] is None


@pytest.mark.parametrize(
    ("since", "elapsed", "due"),
    [(0, 0, False), (0, 120, False), (1, 59, False), (1, 60, True), (10, 0, True), (9, 0, False)],
    ids=["nothing", "idle-long", "early", "interval", "count", "below-count"],
)
def test_a_checkpoint_is_due_after_n_records_or_t_seconds_with_records(since, elapsed, due):
    """Due at every_records records, or after every_seconds when at least one record was written since."""
    clock = Clock()
    chain = Chain(STREAM, every_records=10, every_seconds=60, clock=clock)
    for n in range(since):
        chain.record(sample(n))
    clock.now += elapsed
    assert chain.due() is due


def test_the_writer_thread_writes_the_checkpoint_due_by_time_by_itself():
    """Records then the interval passing: a checkpoint is written without any further emit."""
    clock, disk = Clock(), Disk()
    log = AuditLog(writer=AuditWriter(disk.write, "disk"),
                   chain=Chain(STREAM, every_records=1000, every_seconds=0.05, clock=clock))
    log.emit(audit.Record("c1", 1_700_000_000.0, "10.0.0.1:1", "explicit", "svc"))
    wait_for(lambda: len(disk.records()) == 1, what="the record")
    clock.now += 1
    wait_for(lambda: len(disk.records()) == 2, what="the checkpoint")
    assert disk.records()[1]["event"] == audit.CHECKPOINT_EVENT and disk.records()[1]["covers_seq"] == 1
    assert log.close(timeout=5) == 0


def test_a_signed_checkpoint_verifies_with_the_public_key_over_the_documented_message():
    """The signature is Ed25519 over the one-line message naming stream, covers_seq, covers_chain, records, final."""
    key = signer()
    chain = Chain(STREAM, signer=key)
    chain.record(sample(1))
    checkpoint = json.loads(chain.checkpoint(1_700_000_100.0, final=True))
    message = f"egressd-checkpoint-v1 {STREAM} 1 {checkpoint['covers_chain']} 1 1".encode()
    assert signed_message(STREAM, 1, checkpoint["covers_chain"], 1, True) == message
    key.key.public_key().verify(base64.b64decode(checkpoint["signature"]), message)
    assert checkpoint["key_id"] == key.key_id and re.fullmatch(r"sha256:[0-9a-f]{64}", key.key_id)


def test_lines_sealed_on_two_threads_keep_seq_in_the_order_they_are_written():
    """Records emitted on one thread while the writer thread adds checkpoints by time: seq runs 1, 2, 3... in file
    order and the whole log verifies."""
    disk = Disk()
    log = AuditLog(writer=AuditWriter(disk.write, "disk"), chain=Chain(STREAM, every_records=10**6,
                                                                      every_seconds=1e-4))
    emitted = 0
    while log.checkpoints < 3 and emitted < 500_000:  # until the writer thread has sealed some of its own
        log.emit(audit.Record(f"c{emitted}", 1_700_000_000.0, "10.0.0.1:1", "explicit", "svc"))
        emitted += 1
    assert log.close(timeout=10) == 0
    records = disk.records()
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert sum(r["event"] == audit.CHECKPOINT_EVENT for r in records) >= 4 and len(records) > emitted
    report = verify(disk.lines(), require_final=True)
    assert report.ok and not report.findings, report.findings


class BrokenKey:
    """A signing key whose every signature fails."""

    def sign(self, message: bytes) -> bytes:
        raise RuntimeError("the key is gone")


def test_a_checkpoint_that_cannot_be_signed_never_holds_up_a_record():
    """Checkpoints that fail (on the emitting thread, the writer thread, at close) are logged; every record is still
    written, and close reports none unwritten."""
    disk = Disk()
    chain = Chain(STREAM, signer=Signer(BrokenKey(), "sha256:0"), every_records=2)
    log = AuditLog(writer=AuditWriter(disk.write, "disk"), chain=chain)
    with structlog.testing.capture_logs() as logs:
        for n in range(3):
            log.emit(audit.Record(f"c{n}", 1_700_000_000.0, "10.0.0.1:1", "explicit", "svc"))
        assert log.close(timeout=5) == 0
    assert [r["conn_id"] for r in disk.records()] == ["c0", "c1", "c2"]
    failures = [e for e in logs if e["event"] == "audit.checkpoint_failed"]
    assert len(failures) >= 3 and {e["error"] for e in failures} == {"RuntimeError('the key is gone')"}


@pytest.mark.parametrize(
    ("host", "pid", "worker", "expected"),
    [
        ("payments-api-7c9f-xk2lp", 1, None, "payments-api-7c9f-xk2lp/1/2023-11-14T22:13:20.500000Z"),
        ("gw-0", 4242, "1", "gw-0/4242/2023-11-14T22:13:20.500000Z/w1"),
        ("a host", 7, None, "a-host/7/2023-11-14T22:13:20.500000Z"),
        ("", 7, None, "localhost/7/2023-11-14T22:13:20.500000Z"),
    ],
    ids=["sidecar-pod", "worker", "space-in-host", "no-host"],
)
def test_stream_names_are_host_pid_start_and_worker(host, pid, worker, expected):
    """A stream is named by host, pid and start time (µs), and the worker's index; never with whitespace."""
    assert stream_name(host, pid, 1_700_000_000.5, worker) == expected


def test_a_worker_names_its_index_from_the_supervisor(monkeypatch):
    """The supervisor's environment variable makes a worker's stream end in /w<N>."""
    monkeypatch.setenv(WORKER_ENV, "3")
    assert default_stream().endswith("/w3")
    monkeypatch.delenv(WORKER_ENV)
    assert not default_stream().endswith("/w3")


def pem(key: Any, private: bool = True, password: bytes | None = None) -> bytes:
    if not private:
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        (b"not a key\n", "not an unencrypted PEM private key"),
        (pem(generate_private_key(65537, 2048)), "not an Ed25519 key"),
        (pem(Ed25519PrivateKey.generate(), password=b"secret"), "not an unencrypted PEM private key"),
        (pem(Ed25519PrivateKey.generate(), private=False), "not an unencrypted PEM private key"),
    ],
    ids=["missing", "garbage", "rsa", "encrypted", "public-key"],
)
def test_a_signing_key_that_cannot_be_used_is_refused_with_the_file_and_the_fix(tmp_path, content, message):
    """A missing, unreadable, encrypted, public or non-Ed25519 key stops the start, naming the flag, file and fix."""
    path = tmp_path / "audit.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AuditKeyError, match=message) as caught:
        load_signer(str(path))
    assert f"--audit-signing-key {path}" in str(caught.value)


def test_a_good_signing_key_loads_with_its_key_id(tmp_path):
    """A PKCS#8 Ed25519 PEM gives a signer whose key id is the SHA-256 of its public key's DER form."""
    key = Ed25519PrivateKey.generate()
    (tmp_path / "audit.key").write_bytes(pem(key))
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert load_signer(str(tmp_path / "audit.key")).key_id == "sha256:" + hashlib.sha256(der).hexdigest()


def at_time(clock: str) -> float:
    """Epoch seconds of 2026-11-23 at HH:MM UTC."""
    hours, minutes = clock.split(":")
    return calendar.timegm((2026, 11, 23, int(hours), int(minutes), 0, 0, 0, 0))


def investigation_log() -> bytes:
    """A sidecar's stream (connections and DNS queries) and a gateway's (identified clients), one gap record."""
    sidecar, gateway = Chain(POD + "/1/2026-11-23T05:00:00.000001Z"), Chain("gw-5d8/1/2026-11-23T05:00:00.000002Z")
    lines = []

    def connection(chain: Chain, clock: str, host: str, decision: str, service: str = "payments-api",
                   identity: dict | None = None, would_deny: bool = False) -> None:
        rec = audit.Record(f"c{len(lines)}", at_time(clock), "10.1.0.7:40000", "transparent", service)
        rec.host, rec.port, rec.decision, rec.would_deny, rec.identity = host, 443, decision, would_deny, identity
        rec.reason = "not_allowlisted" if decision == "deny" or would_deny else "allowed"
        lines.append(chain.record({**rec.fields(), audit.EVENT: rec.event}))

    def query(clock: str, name: str, rcode: str) -> None:
        rec = audit.DnsRecord(at_time(clock), "payments-api", "127.0.0.1:5353")
        rec.qname, rec.qtype, rec.rcode = name, "A", rcode
        rec.decision, rec.reason = ("allow", "allowed") if rcode == "NOERROR" else ("deny", "not_allowlisted")
        lines.append(sidecar.record({**rec.fields(), audit.EVENT: rec.event}))

    query("05:09", "api.stripe.test", "NOERROR")
    connection(sidecar, "05:10", "api.stripe.test", "allow")
    query("05:29", "evil.test", "NXDOMAIN")
    connection(sidecar, "05:20", "api.stripe.test", "allow")
    connection(sidecar, "05:30", "evil.test", "deny")
    connection(sidecar, "06:10", "api.stripe.test", "allow")
    billing = {"source": "token", "namespace": "payments", "serviceaccount": "billing", "pod": "billing-1"}
    api = {"source": "pod-ip", "namespace": "payments", "serviceaccount": "payments-api", "pod": "payments-api-2"}
    connection(gateway, "05:40", "hooks.test", "allow", "billing", billing)
    connection(gateway, "05:45", "new.test", "allow", "payments-api", api, would_deny=True)
    lines.append(gateway.record({audit.EVENT: audit.GAP_EVENT, audit.TS: audit.rfc3339(at_time("05:50")),
                                 audit.LAST_TS: audit.rfc3339(at_time("05:51")), audit.REFUSED: 3,
                                 audit.DETAIL: "3 connections refused"}))
    return b"\n".join(lines) + b"\n"


POD = "payments-api-7c9f-xk2lp"
INVESTIGATIONS = {  # the first comment line of each query in docs/forensics.md -> its output, a line a tuple
    "which pods reached which names": {("2", POD, "api.stripe.test", "443"), ("1", "billing-1", "hooks.test", "443"),
                                       ("1", "payments-api-2", "new.test", "443")},
    "everything one service account did": {("2026-11-23T05:45:00.000000Z", "egress.connection", "new.test", "443",
                                            "allow", "not_allowlisted")},
    "every denial for a service": {
        ("2026-11-23T05:29:00.000000Z", "egress.dns", "evil.test", None, "not_allowlisted", None),
        ("2026-11-23T05:30:00.000000Z", "egress.connection", "evil.test", "443", "not_allowlisted", None),
        ("2026-11-23T05:45:00.000000Z", "egress.connection", "new.test", "443", "not_allowlisted", None)},
    "the DNS queries of one pod": {("2026-11-23T05:09:00.000000Z", "api.stripe.test", "A", "NOERROR", "allow"),
                                   ("2026-11-23T05:29:00.000000Z", "evil.test", "A", "NXDOMAIN", "deny")},
    "connections refused without a record": {("2026-11-23T05:50:00.000000Z", "2026-11-23T05:51:00.000000Z", "3")},
}


def output_rows(stdout: str) -> set[tuple]:
    rows = set()
    for line in stdout.splitlines():
        if line.startswith("{"):
            rows.add(tuple(str(v) if isinstance(v, int) and not isinstance(v, bool) else v
                           for v in json.loads(line).values()))
        else:
            rows.add(tuple(line.split()))
    return rows


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq (install.sh installs it)")
@pytest.mark.parametrize("name", list(INVESTIGATIONS))
def test_the_investigators_jq_queries_of_the_docs_find_what_they_say(tmp_path, name):
    """Each jq query of docs/forensics.md, run as printed over a log of a sidecar and a gateway, returns exactly the
    records its comment promises."""
    text = DOCS.read_text()
    section = text[text.index("## Investigating with jq"):text.index("## SIEM formats")]
    [query] = [q for q in re.findall(r"```sh\n(.*?)```", section, re.S) if q.startswith(f"# {name}")]
    (tmp_path / "audit.jsonl").write_bytes(investigation_log())
    done = subprocess.run(["bash", "-c", query], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert output_rows(done.stdout) == INVESTIGATIONS[name]
