"""``python -m bench.audit_emit [PROXY_DIR ...]``: what writing one audit record costs the event loop.

Times :meth:`egressd.audit.AuditLog.emit` for a typical connection record, as CPU time of the emitting
thread (the writer thread's work is not on the event loop), best of 7 rounds of 20,000 records, for each
way a tree can write: native, native with signed checkpoints, ECS, OCSF (a tree without the chain
writes native only). Each PROXY_DIR (a checkout's ``proxy/``, e.g. an older revision's from
``git worktree``) runs in its own interpreter, one after the other in the same run. Run it pinned to one
core: ``taskset -c 1 python -m bench.audit_emit OLD/proxy NEW/proxy``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS, RECORDS = 7, 20_000
KINDS = ("native", "signed", "ecs", "ocsf")


def _log(kind: str, path: str):
    from egressd import audit

    if not hasattr(audit, "CHAIN"):  # a tree from before the chain: native only
        return audit.AuditLog(path) if kind == "native" else None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from egressd import auditformats
    from egressd.auditchain import Chain, Signer, key_id

    layout = auditformats.FORMATS.get(kind, auditformats.NATIVE)
    key = Ed25519PrivateKey.generate()
    signer = Signer(key, key_id(key.public_key())) if kind == "signed" else None
    return audit.AuditLog(path, chain=Chain("bench/1/0", layout, signer))


def measure(kind: str) -> float | None:
    """Microseconds of the emitting thread's CPU per record (best round), or None when the tree cannot."""
    from egressd.records import Record

    best = None
    with tempfile.TemporaryDirectory() as tmp:
        log = _log(kind, str(Path(tmp) / "audit.jsonl"))
        if log is None:
            return None
        for _ in range(ROUNDS):
            records = []
            for n in range(RECORDS):
                rec = Record(f"bench-{n}", time.time(), "10.1.2.3:40000", "explicit", "payments-api")
                rec.protocol, rec.host, rec.port, rec.sni = "connect", "api.stripe.com", 443, "api.stripe.com"
                rec.decision, rec.reason, rec.rule = "allow", "allowed", "allowlists/payments-api.yaml:9"
                records.append(rec)
            start = time.thread_time()
            for rec in records:
                log.emit(rec)
            spent = (time.thread_time() - start) / RECORDS * 1e6
            best = spent if best is None else min(best, spent)
            log.flush()
        log.close(10.0)
    return best


def main(argv: list[str]) -> int:
    if argv[:1] == ["--measure"]:
        value = measure(argv[1])
        print("-" if value is None else f"{value:.2f}")
        return 0
    trees = argv or [str(Path(__file__).resolve().parents[1] / "proxy")]
    print(f"{'proxy tree':40} " + " ".join(f"{k:>10}" for k in KINDS) + "   (µs of CPU per record)")
    for tree in trees:
        cells = []
        for kind in KINDS:
            code = f"import sys; sys.path.insert(0, {tree!r}); from bench.audit_emit import main; main(sys.argv[1:])"
            out = subprocess.run([sys.executable, "-c", code, "--measure", kind], capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[1], timeout=600)
            cells.append(out.stdout.strip() if out.returncode == 0 else "fails")
        print(f"{tree:40} " + " ".join(f"{c:>10}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
