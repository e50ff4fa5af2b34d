"""``egressd audit verify FILE... [--public-key K]`` and ``egressd audit keygen --out PREFIX``.

``verify`` reads audit logs (JSON lines as egressd wrote them, in any of its
formats: rotated files oldest first, several workers' streams interleaved in
one file, ``-`` for stdin), checks every stream's chain and checkpoints with
:func:`egressd.auditchain.verify`, prints each problem as ``file:line: level:``
and a summary per stream, and exits 0 when everything verifies, 1 otherwise
(2: a file or key that cannot be read). With ``--public-key`` every checkpoint
must be signed by one of the keys given. ``keygen`` makes an Ed25519 key pair
for ``--audit-signing-key`` (in production, keep the private key in a
Kubernetes Secret).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from egressd.auditchain import ERROR, AuditKeyError, Line, Report, key_id, verify
from egressd.auditformats import detect


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("audit", help="verify the tamper-evident audit trail, or make its signing key")
    commands = parser.add_subparsers(dest="audit_command", required=True)
    check = commands.add_parser(
        "verify", help="check the chain and signed checkpoints of audit logs; exit 0 when all verifies, 1 otherwise")
    check.add_argument("files", nargs="+", metavar="FILE",
                       help="audit logs as egressd wrote them, rotated files oldest first ('-': stdin)")
    check.add_argument("--public-key", action="append", default=[], metavar="K",
                       help="the PEM public key the checkpoints must be signed with (repeatable, for a key rotation); "
                       "without it, signatures are not checked")
    check.add_argument("--require-final-checkpoint", action="store_true",
                       help="every stream must end with the checkpoint of a clean shutdown (for logs of processes "
                       "that have stopped): lines after the last checkpoint are then an error, not a warning")
    check.add_argument("--allow-missing-start", action="store_true",
                       help="a stream may begin after its first line (its earlier files rotated away and deleted): "
                       "a warning, not an error; the lines given are still checked from there on")
    check.add_argument("--quiet", action="store_true", help="print the problems only")
    keygen = commands.add_parser("keygen", help="make an Ed25519 key pair for --audit-signing-key")
    keygen.add_argument("--out", required=True, metavar="PREFIX",
                        help="write PREFIX.key (the private key, mode 0600) and PREFIX.pub (the public key)")


def cmd(args: argparse.Namespace) -> int:
    if args.audit_command == "keygen":
        return _keygen(args.out)
    try:
        keys = dict(load_public_key(path) for path in args.public_key)
        lines = list(_lines(args.files))
    except (AuditKeyError, OSError) as exc:
        print(f"egressd audit verify: {exc}", file=sys.stderr)
        return 2
    report = verify(lines, keys, detect, args.require_final_checkpoint, args.allow_missing_start)
    print(render(report, quiet=args.quiet))
    return 0 if report.ok else 1


def load_public_key(path: str) -> tuple[str, Ed25519PublicKey]:
    """A --public-key file: a PEM Ed25519 public key; its key id and the key."""
    try:
        data = _read(path)
    except OSError as exc:
        raise AuditKeyError(f"--public-key {exc}") from None
    if b"PRIVATE KEY" in data:
        raise AuditKeyError(f"--public-key {path}: this is a private key; give the public key (the .pub file "
                            "'egressd audit keygen' wrote beside it)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"--public-key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"--public-key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key_id(key), key


def _lines(paths: list[str]) -> Iterator[Line]:
    for path in paths:
        name = "<stdin>" if path == "-" else path
        data = sys.stdin.buffer.read() if path == "-" else _read(path)
        lines = data.split(b"\n")
        last = lines.pop()  # b"" after a final newline; else a line cut short
        for number, raw in enumerate(lines, 1):
            yield Line(f"{name}:{number}", raw)
        if last:
            yield Line(f"{name}:{len(lines) + 1}", last, partial=True)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise OSError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def render(report: Report, quiet: bool = False) -> str:
    """The problems as ``file:line: level: text [stream]``, then (unless quiet) one line per stream and a verdict."""
    out = [f"{f.where}: {f.level}: {f.text}" + (f" [stream {f.stream}]" if f.stream else "") for f in report.findings]
    if quiet:
        return "\n".join(out)
    for s in report.streams:
        signed = f", {s.signed} signed" if report.signatures_checked else ""
        ending = "ends with its final checkpoint" if s.final else "has no final checkpoint (still running?)"
        out.append(f"stream {s.stream}: {s.lines} lines ({s.first} to {s.last}), {s.records} records, "
                   f"{s.checkpoints} checkpoints{signed}; {ending}")
    errors = sum(f.level == ERROR for f in report.findings)
    warnings = len(report.findings) - errors
    verdict = "FAILED" if errors else "verified"
    skipped = f" ({report.skipped} of egressd's own log lines skipped)" if report.skipped else ""
    out.append(f"{verdict}: {report.lines} lines{skipped}, {len(report.streams)} streams, {errors} errors, "
               f"{warnings} warnings")
    if not report.signatures_checked:
        out.append("signatures not checked: give --public-key to require checkpoints signed by your key")
    return "\n".join(out)


def _keygen(prefix: str) -> int:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        for path, data, mode in ((f"{prefix}.key", private, 0o600), (f"{prefix}.pub", public, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    except OSError as exc:
        print(f"egressd audit keygen: {exc.filename}: {exc.strerror} (existing keys are never overwritten)",
              file=sys.stderr)
        return 2
    print(f"wrote {prefix}.key (give it to egressd as --audit-signing-key; keep it secret) and {prefix}.pub "
          f"(give it to 'egressd audit verify --public-key'); key id {key_id(key.public_key())}")
    return 0
