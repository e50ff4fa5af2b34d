"""The audit writer: one JSON line per record, emitted once, whole lines only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select

from egressd import audit
from egressd.audit import AuditLog, Record


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
    [line] = path.read_text().splitlines()
    fields = json.loads(line)
    assert fields[audit.EVENT] == audit.CONNECTION_EVENT
    assert fields[audit.TS] == "2023-11-14T22:13:20.500000Z"
    assert fields[audit.HOST] == "api.test" and fields[audit.DECISION] == "deny"


def test_every_field_name_is_a_module_constant():
    """The record's keys are exactly the constants of egressd.audit."""
    constants = {v for k, v in vars(audit).items() if k.isupper() and isinstance(v, str) and k != "CONNECTION_EVENT"}
    assert set(make_record().fields()) | {audit.EVENT} == constants


def test_records_of_one_loop_iteration_are_written_as_whole_lines_in_pipe_atomic_chunks():
    """Records emitted in one event-loop turn reach a pipe in writes of whole lines, each at most PIPE_BUF bytes."""
    read_fd, write_fd = os.pipe()

    async def go():
        with os.fdopen(write_fd, "w") as stream:
            log = AuditLog()
            log._writer._stream = stream
            for n in range(50):
                log.emit(make_record(f"c{n}"))
            assert os.get_blocking(read_fd)
            log.flush()  # what the FLUSH_DELAY timer (or shutdown) does

    asyncio.run(go())
    data = b""
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    assert data.endswith(b"\n")
    assert [json.loads(line)["conn_id"] for line in data.splitlines()] == [f"c{n}" for n in range(50)]
    pieces = list(audit._chunks([json.dumps(make_record(f"c{n}").fields()).encode() for n in range(50)]))
    assert len(pieces) > 1 and all(len(p) <= select.PIPE_BUF and p.endswith(b"\n") for p in pieces)


def test_notes_accumulate():
    """Remarks added to a record are all kept, in order."""
    rec = make_record()
    rec.note("first")
    rec.note("second")
    assert rec.detail == "first; second"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", audit.rfc3339(0.25))
