"""The tamper-evident audit trail: canonical JSON, the chain, signed checkpoints, and the walk that verifies them.

Each writing process is one *stream* (:func:`stream_name`); its lines carry
``seq`` 1, 2, 3, ... and ``chain`` (docs/forensics.md says it for auditors)::

    chain(n) = hex SHA-256 of (chain(n-1) as 64 hex characters, then the canonical JSON of line n without chain)
    chain(0) = genesis(stream) = hex SHA-256 of the stream name

(canonical JSON, and where each format puts the chain: :class:`egressd.auditformats.Layout`).
A checkpoint vouches for the line just before it (``covers_seq``,
``covers_chain``, ``records``, ``final``) and, given a key, signs
:func:`signed_message` with Ed25519.

:func:`verify` walks the lines of any number of files, grouped by stream, and
reports with file:line what a deleted, inserted, reordered or edited line, a cut
tail or a checkpoint from another key leaves behind.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from egressd import records as audit
from egressd.auditformats import NATIVE, Layout, canonical

CHECKPOINT_RECORDS = 1000  # default --audit-checkpoint-records
CHECKPOINT_SECONDS = 60.0  # default --audit-checkpoint-seconds
WORKER_ENV = "EGRESSD_WORKER_INDEX"  # set by the supervisor for worker N: its stream names it
MAX_FINDINGS = 100  # per stream; past it they are counted
_HEX64 = re.compile(r"[0-9a-f]{64}")


def genesis(stream: str) -> str:
    """The chain value before a stream's first line."""
    return hashlib.sha256(stream.encode()).hexdigest()


def link(previous: str, canon: bytes) -> str:
    """A line's chain value: SHA-256 over the previous value (its hex text) and the line's canonical JSON."""
    return hashlib.sha256(previous.encode() + canon).hexdigest()


def signed_message(stream: str, covers_seq: int, covers_chain: str, records: int, final: bool) -> bytes:
    """What a checkpoint's key signs: one line of text, fields separated by single spaces."""
    return f"egressd-checkpoint-v1 {stream} {covers_seq} {covers_chain} {records} {int(final)}".encode()


def stream_name(host: str, pid: int, started: float, worker: str | None = None) -> str:
    """``<host>/<pid>/<start time, RFC 3339 UTC, µs>``, and ``/w<N>`` for worker N: unique per process."""
    name = f"{'-'.join(host.split()) or 'localhost'}/{pid}/{audit.rfc3339(started)}"
    return f"{name}/w{worker}" if worker else name


def default_stream() -> str:
    """This process's stream name (the worker index from the supervisor's environment)."""
    return stream_name(socket.gethostname(), os.getpid(), time.time(), os.environ.get(WORKER_ENV))


# -- keys -----------------------------------------------------------------------------------------------------


class AuditKeyError(ValueError):
    """A signing or public key that cannot be used; the message names the file and the fix."""


def key_id(public: Ed25519PublicKey) -> str:
    """``sha256:`` + hex SHA-256 of the public key's DER SubjectPublicKeyInfo (``openssl pkey -pubin -outform DER``)."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class Signer:
    key: Ed25519PrivateKey
    key_id: str

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.key.sign(message)).decode()


def _pem(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise AuditKeyError(f"{flag} {path}: cannot be read ({exc.strerror or exc})") from None


def load_signer(source: str) -> Signer:
    """The --audit-signing-key file: PEM PKCS#8 Ed25519 (``egressd audit keygen`` makes one)."""
    data = _pem(source, "--audit-signing-key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"--audit-signing-key {source}: not an unencrypted PEM private key ({exc}); make one "
                            "with 'egressd audit keygen'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"--audit-signing-key {source}: a {type(key).__name__}, not an Ed25519 key; make one "
                            "with 'egressd audit keygen'")
    return Signer(key, key_id(key.public_key()))


# -- writing: one stream's chain ---------------------------------------------------------------------------------


class Chain:
    """One stream's chain state; its caller seals lines one at a time, in the order they are written."""

    def __init__(self, stream: str, layout: Layout = NATIVE, signer: Signer | None = None,
                 every_records: int = CHECKPOINT_RECORDS, every_seconds: float = CHECKPOINT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.layout, self.signer, self.clock = stream, layout, signer, clock
        self.every_records, self.every_seconds = every_records, every_seconds
        self.last = genesis(stream)  # the chain value of the last line sealed
        self.seq = self.checkpoints = 0
        self.records = self.since = 0  # lines sealed that are not checkpoints; ... since the last checkpoint
        self._checked = clock()  # when the last checkpoint was sealed (or the chain began)

    def seal(self, fields: dict[str, Any]) -> bytes:
        """The next line: fields (native, without stream, seq and chain) given their place, mapped and chained."""
        self.seq += 1
        fields[audit.STREAM] = self.stream
        fields[audit.SEQ] = self.seq
        mapped = self.layout.to_format(fields)
        canon = canonical(mapped)
        self.last = link(self.last, canon)
        return self.layout.render(mapped, canon, self.last)

    def record(self, fields: dict[str, Any]) -> bytes:
        """Seal a record (any line but a checkpoint)."""
        line = self.seal(fields)
        self.records += 1
        self.since += 1
        return line

    def due(self) -> bool:
        """A checkpoint is due: every_records records, or records and every_seconds since the last one."""
        since, elapsed = self.since, self.clock() - self._checked
        return since >= self.every_records or (since > 0 and elapsed >= self.every_seconds)

    def checkpoint(self, ts: float, final: bool = False) -> bytes:
        """Seal a checkpoint vouching for the last line sealed (signed when there is a key)."""
        signer, message = self.signer, signed_message(self.stream, self.seq, self.last, self.records, final)
        fields: dict[str, Any] = {
            audit.EVENT: audit.CHECKPOINT_EVENT, audit.TS: audit.rfc3339(ts), audit.COVERS_SEQ: self.seq,
            audit.COVERS_CHAIN: self.last, audit.RECORDS: self.records, audit.FINAL: final,
            audit.KEY_ID: signer and signer.key_id, audit.SIGNATURE: signer and signer.sign(message),
        }
        self.since, self._checked = 0, self.clock()
        self.checkpoints += 1
        return self.seal(fields)


# -- verifying --------------------------------------------------------------------------------------------------

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True, slots=True)
class Line:
    where: str  # file:line
    raw: bytes  # without its newline
    partial: bool = False  # the last line of a file that does not end with a newline


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # error or warning
    where: str
    stream: str | None
    text: str
    order: int  # the line's place among all lines given


@dataclass(frozen=True, slots=True)
class Summary:
    stream: str
    first: str
    last: str
    lines: int
    records: int
    checkpoints: int
    signed: int  # checkpoints whose signature verified against a given key
    final: bool  # ends with a valid final checkpoint (a clean shutdown)


@dataclass(frozen=True, slots=True)
class Report:
    findings: tuple[Finding, ...]
    streams: tuple[Summary, ...]
    lines: int
    signatures_checked: bool
    skipped: int = 0  # egressd's own log lines (stderr, mixed in by `kubectl logs`), not audit records

    @property
    def ok(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)


@dataclass(frozen=True, slots=True)
class _Entry:
    order: int
    where: str
    stream: str
    seq: int
    chain: str
    canon: bytes
    form_ok: bool
    native: dict[str, Any]
    checkpoint: bool


class _Out:
    """Findings, at most MAX_FINDINGS per stream (the rest counted)."""

    def __init__(self) -> None:
        self.items: list[Finding] = []
        self.per_stream: dict[str | None, int] = {}
        self.skipped = 0

    def add(self, level: str, where: str, order: int, stream: str | None, text: str) -> None:
        n = self.per_stream[stream] = self.per_stream.get(stream, 0) + 1
        if n <= MAX_FINDINGS:
            self.items.append(Finding(level, where, stream, text, order))

    def at(self, level: str, entry: _Entry, text: str) -> None:
        self.add(level, entry.where, entry.order, entry.stream, text)


def verify(lines: Iterable[Line], keys: dict[str, Ed25519PublicKey] | None = None,
           detect: Callable[[dict[str, Any]], Layout] = lambda record: NATIVE, require_final: bool = False,
           missing_start: bool = False) -> Report:
    """Check every stream's chain and checkpoints; ``keys`` (key id -> key) makes signed checkpoints required,
    ``require_final`` a final checkpoint at the end of each stream; ``missing_start`` lets a stream begin after
    seq 1 (its first lines rotated away) with a warning."""
    out, count = _Out(), 0
    streams: dict[str, list[_Entry]] = {}
    for count, line in enumerate(lines, 1):
        entry = _read(line, count, detect, out, require_final)
        if entry is not None:
            streams.setdefault(entry.stream, []).append(entry)
    summaries = tuple(_walk(name, entries, keys or {}, (require_final, missing_start), out)
                      for name, entries in streams.items())
    for stream, n in out.per_stream.items():
        if n > MAX_FINDINGS:
            out.add(ERROR, "-", count, stream, f"{n - MAX_FINDINGS} more problems in this stream not shown")
    return Report(tuple(sorted(out.items, key=lambda f: f.order)), summaries, count, bool(keys), out.skipped)


def _read(line: Line, order: int, detect: Callable[[dict[str, Any]], Layout], out: _Out,
          require_final: bool) -> _Entry | None:
    def bad(text: str, level: str = ERROR) -> None:
        out.add(level, line.where, order, None, text)

    try:
        record = orjson.loads(line.raw)
    except orjson.JSONDecodeError:
        if line.partial:
            bad("the last line is incomplete: still being written, or the file was cut",
                ERROR if require_final else WARNING)
        else:
            bad("not a JSON line: torn by an interrupted write, or edited" if line.raw.strip()
                else "an empty line: egressd never writes one")
        return None
    if not isinstance(record, dict):
        return bad("not a JSON object: egressd writes one object per line")
    event = record.get(audit.EVENT)
    if isinstance(event, str) and "level" in record and not event.startswith("egress."):
        out.skipped += 1  # an operational log line: every audit event is named egress.*
        return None
    layout = detect(record)
    try:
        native = layout.to_native(record)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError):
        return bad(f"cannot be read as a {layout.name} record")
    stream, seq, chain = native.get(audit.STREAM), native.get(audit.SEQ), native.get(audit.CHAIN)
    if not isinstance(stream, str) or type(seq) is not int or seq < 1 or not (
            isinstance(chain, str) and _HEX64.fullmatch(chain)):
        return bad("no stream, seq or chain: not a line of a chained egressd (inserted, or written by a version "
                   "before the chain)")
    unchained = layout.unchain(record)
    canon = canonical(unchained)
    form_ok = layout.render(unchained, canon, chain) == line.raw  # a repeated key or extra space changes the line
    checkpoint = native.get(audit.EVENT) == audit.CHECKPOINT_EVENT
    return _Entry(order, line.where, stream, seq, chain, canon, form_ok, native, checkpoint)


def _walk(stream: str, entries: list[_Entry], keys: dict[str, Ed25519PublicKey], strict: tuple[bool, bool],
          out: _Out) -> Summary:
    """One stream: order, gaps, duplicates, the chain in seq order, checkpoints, and the tail no checkpoint covers."""
    by_seq: dict[int, list[_Entry]] = {}
    top = 0
    for entry in entries:
        by_seq.setdefault(entry.seq, []).append(entry)
    for entry in entries:
        if entry.seq < top and len(by_seq[entry.seq]) == 1:
            out.at(ERROR, entry, f"seq {entry.seq} comes after seq {top}: lines were reordered")
        top = max(top, entry.seq)
    prevs: set[str] | None = {genesis(stream)}  # what the line before may chain to (None: it is missing)
    before: str | None = genesis(stream)
    records = checkpoints = signed = covered = seq_before = 0
    complete, final = True, False
    walked: list[_Entry] = []
    for seq in sorted(by_seq):
        cands = by_seq[seq]
        if seq != seq_before + 1:
            out.at(WARNING if seq_before == 0 and strict[1] else ERROR, cands[0], _missing(seq_before + 1, seq - 1))
            prevs, before, complete = None, None, False
        good = [c for c in cands if prevs is None or any(link(p, c.canon) == c.chain for p in prevs)]
        entry = (good or cands)[0]
        if not good:
            out.at(ERROR, entry, "the chain does not match: this line was edited, or put in place of another")
        for other in cands:
            if other is not entry:
                out.at(ERROR, other, f"a second line with seq {seq} (the first at {entry.where}): inserted or copied")
        if not entry.form_ok:
            out.at(ERROR, entry, "not as egressd writes it (spacing, key order or a repeated key differ): edited")
        final = False
        if entry.checkpoint:
            checkpoints += 1
            vouched = _checkpoint(entry, before, records if complete else None, keys, out)
            if vouched:
                covered, final = seq, entry.native.get(audit.FINAL) is True
                signed += vouched == "signed"
        else:
            records += 1
        prevs = {entry.chain} | ({link(p, entry.canon) for p in prevs} if prevs else set())
        before, seq_before = entry.chain, seq
        walked.append(entry)
    tail = [e for e in walked if e.seq > covered]
    if not final:
        if tail:
            text = (f"{len(tail)} lines after the last checkpoint (to {tail[-1].where}) are vouched for by no "
                    "checkpoint" if covered else f"no checkpoint vouches for this stream's {len(tail)} lines")
        else:
            text = "the stream ends with a checkpoint that is not final"
        if strict[0]:
            out.at(ERROR, tail[0] if tail else walked[-1], f"{text}: the log was cut, or the process did not stop "
                   "cleanly")
        elif tail:
            out.at(WARNING, tail[0], f"{text}: the process may still be running, or the log was cut here")
    return Summary(stream, entries[0].where, entries[-1].where, len(entries), records, checkpoints, signed, final)


def _missing(first: int, last: int) -> str:
    if first == 1:
        return (f"the stream's first {last} lines are not in the files given: give its earlier files first (or "
                "--allow-missing-start)")
    return f"seq {first}{'' if first == last else f' to {last}'} missing before this line: lines were deleted"


def _checkpoint(entry: _Entry, before: str | None, records: int | None, keys: dict[str, Ed25519PublicKey],
                out: _Out) -> str | None:
    """Check one checkpoint; "signed" or "chained" when it vouches for the lines before it, else None."""
    n = entry.native
    if n.get(audit.COVERS_SEQ) != entry.seq - 1 or (before is not None and n.get(audit.COVERS_CHAIN) != before):
        out.at(ERROR, entry, "this checkpoint vouches for another line than the one before it: lines before it were "
               "changed, or it was moved")
        return None
    if records is not None and n.get(audit.RECORDS) != records:
        out.at(ERROR, entry, f"this checkpoint counts {n.get(audit.RECORDS)} records before it; there are {records}")
        return None
    if not keys:
        return "chained"
    kid, signature = n.get(audit.KEY_ID), n.get(audit.SIGNATURE)
    if not signature:
        out.at(ERROR, entry, "this checkpoint is not signed, but --public-key was given: the process ran without "
               "--audit-signing-key, or the checkpoint was forged")
        return None
    if not isinstance(kid, str) or kid not in keys:
        out.at(ERROR, entry, f"this checkpoint is signed by another key ({kid}), not by a --public-key given")
        return None
    message = signed_message(entry.stream, n[audit.COVERS_SEQ], str(n[audit.COVERS_CHAIN]), n.get(audit.RECORDS),
                             n.get(audit.FINAL) is True)
    try:
        keys[kid].verify(base64.b64decode(str(signature), validate=True), message)
    except (InvalidSignature, ValueError):
        out.at(ERROR, entry, "bad signature: the lines this checkpoint vouches for were changed after it was signed, "
               "or it was forged")
        return None
    return "signed"
