"""The audit writer: one JSON line per record, emitted once, whole lines only."""

from __future__ import annotations

import asyncio
import io
import json
import re

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


def test_records_of_one_loop_iteration_are_written_as_whole_lines_in_one_batch():
    """Records emitted in one event-loop turn reach the stream in a single write of complete lines."""
    writes: list[str] = []

    class Stream(io.StringIO):
        def write(self, data: str) -> int:
            writes.append(data)
            return len(data)

    async def go():
        log = AuditLog()
        log._writer._stream = Stream()
        for n in range(50):
            log.emit(make_record(f"c{n}"))
        await asyncio.sleep(0)

    asyncio.run(go())
    assert len(writes) == 1 and writes[0].endswith("\n")
    assert [json.loads(line)["conn_id"] for line in writes[0].splitlines()] == [f"c{n}" for n in range(50)]


def test_notes_accumulate():
    """Remarks added to a record are all kept, in order."""
    rec = make_record()
    rec.note("first")
    rec.note("second")
    assert rec.detail == "first; second"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", audit.rfc3339(0.25))
