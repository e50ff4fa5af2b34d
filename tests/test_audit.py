"""The audit writer: one JSON line per record, emitted once, whole lines only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select

from egressd import records as audit
from egressd.audit import AuditLog
from egressd.auditwriter import AuditWriter
from egressd.records import Record


def make_record(conn_id: str = "c1") -> Record:
    rec = Record(conn_id, 1_700_000_000.5, "127.0.0.1:40000", "explicit", "svc")
    rec.host, rec.port, rec.protocol = "api.test", 443, "connect"
    return rec


def test_record_is_emitted_once(tmp_path):
    """A second emit of the same record writes nothing and says so."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    rec = make_record()
    assert log.emit(rec) is True
    assert log.emit(rec) is False
    log.close()
    line, final = path.read_text().splitlines()
    fields = json.loads(line)
    assert fields[audit.EVENT] == audit.CONNECTION_EVENT and fields[audit.SEQ] == 1
    assert json.loads(final)[audit.EVENT] == audit.CHECKPOINT_EVENT
    assert fields[audit.TS] == "2023-11-14T22:13:20.500000Z"
    assert fields[audit.HOST] == "api.test" and fields[audit.DECISION] == "deny"


def test_every_field_name_is_a_module_constant():
    """The keys of the connection, DNS, request, gap and checkpoint records are exactly the public constants of
    egressd.records."""
    constants = {
        v for k, v in vars(audit).items()
        if k.isupper() and not k.startswith("_") and isinstance(v, str) and not k.endswith("_EVENT")
    }
    dns = set(audit.DnsRecord(0.0, "svc", "127.0.0.1:1").fields())
    request = set(audit.RequestRecord(0.0, "c1", "svc", "127.0.0.1:1").fields())
    chain = {audit.STREAM, audit.SEQ, audit.CHAIN}
    records = set(make_record().fields()) | {audit.EVENT} | set(audit.GAP_FIELDS) | dns | request | chain
    assert records | set(audit.CHECKPOINT_FIELDS) == constants


def test_records_of_one_loop_iteration_are_written_as_whole_lines_in_pipe_atomic_chunks():
    """Records emitted in one event-loop turn reach a pipe in writes of whole lines, each at most PIPE_BUF bytes."""
    read_fd, write_fd = os.pipe()
    writes: list[bytes] = []

    def write(data: memoryview) -> int:
        writes.append(bytes(data))
        return os.write(write_fd, data)

    async def go():
        log = AuditLog(writer=AuditWriter(write, "a pipe"))
        for n in range(50):
            log.emit(make_record(f"c{n}"))
        assert not writes  # nothing is written on the event loop's turn
        assert log.close(timeout=5) == 0

    asyncio.run(go())
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    assert data.endswith(b"\n")
    *lines, final = [json.loads(line) for line in data.splitlines()]
    assert [r["conn_id"] for r in lines] == [f"c{n}" for n in range(50)]
    assert final[audit.EVENT] == audit.CHECKPOINT_EVENT
    assert len(writes) > 1 and all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)


def test_notes_accumulate():
    """Remarks added to a record are all kept, in order."""
    rec = make_record()
    rec.note("first")
    rec.note("second")
    assert rec.detail == "first; second"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", audit.rfc3339(0.25))
