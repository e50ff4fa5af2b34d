"""The rows of the hostile-input table and how one is checked.

A :class:`Case` is one named row: what the client does (an action of
:mod:`hostile.wire`, or for the DNS filter a message to send), the answer it
must get, the reason the record must carry, and any other record fields that
matter for the row. :class:`Ledger` holds the records of the one egressd a
module's rows share, and checks that each row added exactly the records it
should: one per connection (per query for the DNS filter), never none, never two.

Answers are written as the client would describe them:

``"400"``, ``"403"``, ...   egressd's own answer: that status, ``X-Egressd-Reason`` the row's reason, then the end
``"200"``                   the origin's answer, forwarded, then the end
``"tunnel+tls"``            ``200 Connection established``, then the origin's TLS bytes (the hello went through)
``"tunnel+closed"``         ``200 Connection established``, then the end, nothing from the origin
``"tunnel+echo"``           ``200 Connection established``, then the echo origin's copy of the bytes sent
``"tls"``                   (transparent) the origin's TLS bytes, nothing of egressd's
``"alert"``                 (transparent) a fatal TLS ``access_denied`` alert, then the end
``"closed"``                nothing at all, then the end
``"gone"``                  nothing: the client reset the connection right after sending
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from harness import ProxyProcess, wait_for
from hostile.wire import TLS_RECORD_TYPES, Outcome

ALERT_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"


@dataclass(frozen=True)
class Case:
    """One row: ``send`` (an action) -> ``answer``, and ``count`` records (one unless said), each with ``reason``
    and the fields in ``record``."""

    name: str
    send: Any
    answer: str
    reason: str | None
    record: dict[str, Any] = field(default_factory=dict)
    marks: tuple = ()
    count: int = 1

    def param(self) -> Any:
        return pytest.param(self, id=self.name, marks=self.marks)


def params(rows: list[Case]) -> list[Any]:
    """The rows as pytest parameters, named; row names must be unique."""
    names = [row.name for row in rows]
    assert len(names) == len(set(names)), f"duplicate row names: {sorted(n for n in names if names.count(n) > 1)}"
    return [row.param() for row in rows]


class Ledger:
    """The records of one egressd shared by a module's rows, with the count each row must leave behind."""

    def __init__(self, proxy: ProxyProcess, event: str = "egress.connection") -> None:
        self.proxy = proxy
        self.event = event
        self.expected = len(self.all())

    def all(self) -> list[dict]:
        """The records of this event written so far: whole lines only (a line may be half written as it is read)."""
        path = self.proxy.audit_path
        text = path.read_text() if path is not None and path.exists() else ""
        lines = text.split("\n")[:-1]
        return [r for r in map(json.loads, filter(None, lines)) if r.get("event") == self.event]

    def begin(self) -> None:
        """Before a row: fail when a record appeared that no row accounts for (an earlier row left it); the count
        is brought in step first, so one failure stays one."""
        before = self.all()
        stray, self.expected = before[self.expected:], len(before)
        assert not stray, f"records no row accounts for (a row before this one left them): {brief(stray)}"

    def take(self, n: int = 1, what: str = "") -> list[dict]:
        """After a row (begun with :meth:`begin`): wait for its n records and return them; fail when more came."""
        start = self.expected
        try:
            wait_for(lambda: len(self.all()) >= start + n, what=f"{n} {self.event} record(s) {what}")
        finally:
            new = self.all()[start:]
            self.expected = start + len(new)
        assert len(new) == n, f"expected {n} record(s), got {len(new)}: {brief(new)}"
        return new


def brief(records: list[dict]) -> list[tuple]:
    """Records shortened for a failure message: client, host, reason, detail (the first ten)."""
    return [(r.get("client"), r.get("host") or r.get("qname"), r.get("reason"), r.get("detail")) for r in records[:10]]


def check_answer(outcome: Outcome, case: Case) -> None:
    """The client saw what the row says (see the module docstring for the words)."""
    answer, data = case.answer, outcome.data
    shown = f"{case.name}: got {data[:300]!r} ({outcome.end})"
    if answer.isdigit():
        assert data.startswith(b"HTTP/1.1 " + answer.encode() + b" "), shown
        if answer != "200":
            assert f"\r\nX-Egressd-Reason: {case.reason}\r\n".encode() in outcome.head + b"\r\n", shown
            assert outcome.end == "eof", shown
    elif answer == "tunnel+tls":
        assert data.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n"), shown
        assert outcome.after_head[:1] and outcome.after_head[0] in TLS_RECORD_TYPES, shown
    elif answer == "tunnel+echo":
        assert data.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n"), shown
        assert outcome.after_head and b"ping".startswith(outcome.after_head), shown
    elif answer == "tunnel+closed":
        assert data == b"HTTP/1.1 200 Connection established\r\n\r\n", shown
        assert outcome.end in ("eof", "reset"), shown
    elif answer == "tls":
        assert data[:1] == b"\x16" and outcome.end == "open", shown
    elif answer == "alert":
        assert data == ALERT_ACCESS_DENIED and outcome.end == "eof", shown
    elif answer == "closed":
        assert data == b"" and outcome.end == "eof", shown
    elif answer == "reset":
        assert outcome.end == "reset", shown
    elif answer == "gone":
        assert outcome.end == "client-reset", shown
    else:
        raise AssertionError(f"{case.name}: unknown answer {answer!r}")


def check_record(rec: dict, case: Case) -> None:
    """The record names the row's reason, a decision that agrees with it, and the row's other fields."""
    assert rec["reason"] == case.reason, (case.name, rec)
    assert rec["client"], (case.name, rec)  # taken from the accepted socket, even after a reset
    allowed = case.reason in ("allowed", "passthrough")
    assert rec["decision"] == ("allow" if allowed else "deny") or "decision" in case.record, (case.name, rec)
    for name, value in case.record.items():
        assert rec[name] == value, (case.name, name, rec)
    if case.answer.isdigit() and case.answer != "200":
        assert rec["status"] == int(case.answer), (case.name, rec)
