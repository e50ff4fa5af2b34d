"""``egressd audit verify``: each kind of tampering reported at its line, in every format; the command's output and
exit codes; and real egressd processes (one, two workers, a restart, the DNS filter) writing logs that verify,
one of their checkpoints checked with the docs' openssl recipe."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import pytest

from conftest import service_yaml
from egressd.auditchain import Chain, Line, Signer, genesis, link, verify
from egressd.auditformats import FORMATS, NATIVE, canonical, detect
from egressd.cli import main
from harness import ProxyProcess, connect_tunnel, raw_request, wait_for
from test_audit_chain import sample, signer

STREAM = "pod-a/1/2026-11-23T05:21:12.123456Z"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "forensics.md"
KEY, OTHER = signer(), signer()


def make_log(fmt: str = "native", key: Signer | None = KEY, stream: str = STREAM, records: int = 10) -> list[bytes]:
    """A stream of ``records`` records with a checkpoint after every 4th and a final one: 13 lines for 10 records
    (checkpoints at lines 5, 10 and 13)."""
    chain, lines = Chain(stream, FORMATS[fmt], key, every_records=4), []
    for n in range(records):
        lines.append(chain.record(sample(n)))
        if chain.due():
            lines.append(chain.checkpoint(1_700_000_100.0 + n))
    return [*lines, chain.checkpoint(1_700_000_200.0, final=True)]


def rechain(lines: list[bytes], start: int) -> list[bytes]:
    """What a careful forger does after editing native line ``start`` (1-based): recompute every chain value from it
    on, checkpoints' covers_chain included (signatures cannot be redone without the key)."""
    out = list(lines[: start - 1])
    previous = json.loads(out[-1])["chain"] if out else genesis(json.loads(lines[0])["stream"])
    for raw in lines[start - 1:]:
        record = json.loads(raw)
        del record["chain"]
        if record["event"] == "egress.checkpoint":
            record["covers_chain"] = previous
        canon = canonical(record)
        previous = link(previous, canon)
        out.append(NATIVE.render(record, canon, previous))
    return out


def edit(n: int, old: bytes, new: bytes) -> Callable[[list[bytes]], list[bytes]]:
    def change(lines: list[bytes]) -> list[bytes]:
        assert old in lines[n - 1]
        return [*lines[: n - 1], lines[n - 1].replace(old, new, 1), *lines[n:]]
    return change


def delete(*numbers: int) -> Callable[[list[bytes]], list[bytes]]:
    return lambda lines: [line for n, line in enumerate(lines, 1) if n not in numbers]


def insert(at: int, make: Callable[[list[bytes]], bytes]) -> Callable[[list[bytes]], list[bytes]]:
    return lambda lines: [*lines[: at - 1], make(lines), *lines[at - 1:]]


def swap(a: int, b: int) -> Callable[[list[bytes]], list[bytes]]:
    def change(lines: list[bytes]) -> list[bytes]:
        out = list(lines)
        out[a - 1], out[b - 1] = out[b - 1], out[a - 1]
        return out
    return change


def forge_signature(lines: list[bytes]) -> list[bytes]:
    record = json.loads(lines[9])
    record["signature"] = base64.b64encode(os.urandom(64)).decode()
    del record["chain"]
    out = list(lines)
    out[9] = NATIVE.render(record, canonical(record), "0" * 64)
    return rechain(out, 10)


def interleave(a: list[bytes], b: list[bytes]) -> list[bytes]:
    out = []
    for n in range(max(len(a), len(b))):
        out += a[n:n + 1] + b[n:n + 1]
    return out


OPERATIONAL = b'{"listen": ["127.0.0.1", 3128], "event": "egressd.started", "level": "info", "timestamp": "t"}'
B = "pod-b/9/2026-11-23T05:21:13.000001Z"


@dataclass(frozen=True)
class Case:
    change: Callable[[list[bytes]], list[bytes]] = lambda lines: lines
    expected: tuple[tuple[str, int, str], ...] = ()  # (level, line, part of the text)
    keys: tuple[Signer, ...] = (KEY,)
    make: Callable[[str], list[bytes]] = make_log
    options: dict = field(default_factory=dict)
    formats: tuple[str, ...] = ("native", "ecs", "ocsf")


CASES = {
    "intact": Case(),
    "deleted": Case(delete(7), (("error", 7, "seq 7 missing before this line: lines were deleted"),)),
    "deleted-checkpoint": Case(delete(5), (("error", 5, "seq 5 missing"),)),
    "first-deleted": Case(delete(1), (("error", 1, "the stream's first 1 lines are not in the files given"),)),
    "first-rotated-away": Case(delete(1, 2, 3), (("warning", 1, "first 3 lines are not in the files given"),),
                               options={"missing_start": True}),
    "copied": Case(insert(7, lambda lines: lines[2]),
                   (("error", 7, "a second line with seq 3 (the first at log:3): inserted or copied"),)),
    "made-up": Case(insert(5, lambda lines: b'{"event":"egress.connection","host":"evil.test"}'),
                    (("error", 5, "no stream, seq or chain"),), formats=("native",)),
    "made-up-as-log-line": Case(insert(5, lambda lines: b'{"event":"egress.connection","level":"info"}'),
                                (("error", 5, "no stream, seq or chain"),), formats=("native",)),
    "operational-line": Case(insert(4, lambda lines: OPERATIONAL)),
    "swapped": Case(swap(6, 7), (("error", 7, "seq 6 comes after seq 7: lines were reordered"),)),
    "edited": Case(edit(7, b"not_allowlisted", b"allowed"), (("error", 7, "the chain does not match"),)),
    "chain-value-edited": Case(lambda lines: edit(7, json.loads(lines[6])["chain"].encode(), b"0" * 64)(lines),
                               (("error", 7, "the chain does not match"),), formats=("native",)),
    "edited-and-rechained": Case(lambda lines: rechain(edit(7, b"not_allowlisted", b"allowed")(lines), 7),
                                 (("error", 10, "bad signature"), ("error", 13, "bad signature"),
                                  ("warning", 6, "8 lines after the last checkpoint")), formats=("native",)),
    "edited-and-rechained-unsigned-passes": Case(
        lambda lines: rechain(edit(7, b"not_allowlisted", b"allowed")(lines), 7), keys=(), formats=("native",)),
    "checkpoint-count-edited": Case(lambda lines: rechain(edit(10, b'"records":8', b'"records":7')(lines), 10),
                                    (("error", 10, "this checkpoint counts 7 records before it; there are 8"),),
                                    keys=(), formats=("native",)),
    "reformatted": Case(lambda lines: [*lines[:3], json.dumps(json.loads(lines[3])).encode(), *lines[4:]],
                        (("error", 4, "not as egressd writes it"),)),
    "repeated-key": Case(edit(4, b"{", b'{"event":"forged",'),
                         (("error", 4, "not as egressd writes it"),), formats=("native", "ecs")),
    "torn": Case(lambda lines: [*lines[:3], lines[3][:40], *lines[4:]],
                 (("error", 4, "not a JSON line"), ("error", 5, "seq 4 missing"))),
    "empty-line": Case(insert(4, lambda lines: b""), (("error", 4, "an empty line"),)),
    "tail-cut": Case(delete(13), (("warning", 11, "2 lines after the last checkpoint (to log:12)"),)),
    "tail-cut-final-required": Case(delete(13), (("error", 11, "2 lines after the last checkpoint"),),
                                    options={"require_final": True}),
    "cut-at-a-checkpoint": Case(delete(11, 12, 13)),
    "cut-at-a-checkpoint-final-required": Case(
        delete(11, 12, 13), (("error", 10, "the stream ends with a checkpoint that is not final"),),
        options={"require_final": True}),
    "other-key": Case(make=lambda fmt: make_log(fmt, OTHER), expected=(*(
        ("error", n, f"signed by another key ({OTHER.key_id})") for n in (5, 10, 13)),
        ("warning", 1, "no checkpoint vouches for this stream's 13 lines"))),
    "two-keys-given": Case(make=lambda fmt: make_log(fmt, OTHER), keys=(KEY, OTHER)),
    "forged-signature": Case(forge_signature, (
        ("error", 10, "bad signature"), ("error", 13, "bad signature"),
        ("warning", 6, "8 lines after the last checkpoint")), formats=("native",)),
    "unsigned-but-key-given": Case(make=lambda fmt: make_log(fmt, None), expected=(*(
        ("error", n, "this checkpoint is not signed, but --public-key was given") for n in (5, 10, 13)),
        ("warning", 1, "no checkpoint vouches for this stream's 13 lines"))),
    "unsigned-no-key": Case(make=lambda fmt: make_log(fmt, None), keys=()),
    "no-final-checkpoint-ever": Case(delete(5, 10, 13), (("error", 5, "seq 5 missing"), ("error", 9, "seq 10"),
                                                         ("warning", 1, "no checkpoint vouches for"))),
    "two-streams": Case(make=lambda fmt: interleave(make_log(fmt), make_log(fmt, stream=B))),
    "two-streams-one-edited": Case(edit(6, b"not_allowlisted", b"allowed"), (("error", 6, "chain does not match"),),
                                   make=lambda fmt: interleave(make_log(fmt), make_log(fmt, stream=B))),
    "restart": Case(make=lambda fmt: make_log(fmt) + make_log(fmt, stream=B, records=3)),
    "formats-mixed": Case(make=lambda fmt: make_log("native") + make_log("ecs", stream=B) + make_log(
        "ocsf", stream=B + "x"), formats=("native",)),
}


def findings(case: Case, fmt: str) -> list[tuple[str, int, str]]:
    lines = case.change(case.make(fmt))
    report = verify([Line(f"log:{n}", raw) for n, raw in enumerate(lines, 1)],
                    {k.key_id: k.key.public_key() for k in case.keys}, detect, **case.options)
    assert report.ok == all(level != "error" for level, _, _ in case.expected)
    return [(f.level, int(f.where.split(":")[1]), f.text) for f in report.findings]


@pytest.mark.parametrize(
    ("name", "fmt"), [(name, fmt) for name, case in CASES.items() for fmt in case.formats],
    ids=[f"{name}-{fmt}" for name, case in CASES.items() for fmt in case.formats],
)
def test_each_kind_of_tampering_is_reported_at_its_line(name, fmt):
    """Deleted, inserted, reordered, edited, reformatted or torn lines, cut tails, other keys and forged signatures
    are each reported once, at the line they affect, and an intact log (one stream or several) has no finding."""
    case = CASES[name]
    got = findings(case, fmt)
    assert len(got) == len(case.expected), got
    for (level, line, text), (got_level, got_line, got_text) in zip(sorted(case.expected), sorted(got), strict=True):
        assert (got_level, got_line) == (level, line) and text in got_text, got


def test_a_log_given_as_rotated_files_verifies_in_order_and_not_reversed(tmp_path, capsys):
    """Rotated files given oldest first verify; given newest first, the lines out of order are named with their
    file."""
    lines = make_log()
    (tmp_path / "audit.jsonl.1").write_bytes(b"\n".join(lines[:6]) + b"\n")
    (tmp_path / "audit.jsonl").write_bytes(b"\n".join(lines[6:]) + b"\n")
    old, new = str(tmp_path / "audit.jsonl.1"), str(tmp_path / "audit.jsonl")
    assert main(["audit", "verify", old, new]) == 0
    assert "verified: 13 lines, 1 streams, 0 errors, 0 warnings" in capsys.readouterr().out
    assert main(["audit", "verify", new, old, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{old}:1: error: seq 1 comes after seq 13: lines were reordered [stream {STREAM}]" in out
    assert main(["audit", "verify", new]) == 1
    assert f"{new}:1: error: the stream's first 6 lines are not in the files given" in capsys.readouterr().out
    assert main(["audit", "verify", new, "--allow-missing-start"]) == 0
    assert f"{new}:1: warning: the stream's first 6 lines" in capsys.readouterr().out


def test_verify_reads_kubectl_logs_from_stdin_skipping_egressds_own_log_lines():
    """``kubectl logs … | egressd audit verify -``: stdout's records and stderr's log lines mixed, the log lines are
    skipped and counted, the records verified."""
    mixed = [OPERATIONAL, *make_log()[:7], b'{"event": "audit.unavailable", "level": "error", "reason": "x"}',
             *make_log()[7:]]
    done = subprocess.run([sys.executable, "-m", "egressd", "audit", "verify", "-"], input=b"\n".join(mixed) + b"\n",
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert b"verified: 15 lines (2 of egressd's own log lines skipped), 1 streams, 0 errors" in done.stdout


def write_keys(tmp_path: Path) -> Path:
    assert main(["audit", "keygen", "--out", str(tmp_path / "audit")]) == 0
    return tmp_path / "audit.pub"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        ("private", "this is a private key; give the public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
    ],
    ids=["missing", "private-key", "garbage"],
)
def test_a_public_key_that_cannot_be_used_exits_2_saying_why(tmp_path, capsys, content, message):
    """A missing, private or broken --public-key is a usage error (exit 2) naming the file."""
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"\n".join(make_log()) + b"\n")
    key = tmp_path / "k.pem"
    if content == "private":
        write_keys(tmp_path)
        key = tmp_path / "audit.key"
    elif content is not None:
        key.write_bytes(content)
    assert main(["audit", "verify", str(log), "--public-key", str(key)]) == 2
    assert message in capsys.readouterr().err


def test_keygen_writes_a_pair_that_signs_and_verifies_and_never_overwrites(tmp_path, capsys):
    """keygen's private key (mode 0600) signs logs that its public key verifies; a second keygen refuses to
    overwrite."""
    public = write_keys(tmp_path)
    assert oct((tmp_path / "audit.key").stat().st_mode & 0o777) == "0o600"
    from egressd.auditchain import load_signer

    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"\n".join(make_log(key=load_signer(str(tmp_path / "audit.key")))) + b"\n")
    assert main(["audit", "verify", str(log), "--public-key", str(public), "--require-final-checkpoint"]) == 0
    assert "13 lines (" in capsys.readouterr().out
    assert main(["audit", "keygen", "--out", str(tmp_path / "audit")]) == 2
    assert "never overwritten" in capsys.readouterr().err


# -- real egressd processes -------------------------------------------------------------------------------------


def verify_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egressd", "audit", "verify", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    public = write_keys(tmp_path)
    return tmp_path / "audit.key", public


def traffic(proxy: ProxyProcess, lab) -> None:
    """One allowed tunnel to the echo origin and two denied requests."""
    sock, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    sock.close()
    for _ in range(2):
        assert raw_request(proxy.address, b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 403")


@pytest.mark.parametrize("fmt", ["native", "ecs", "ocsf"])
def test_a_running_egressd_writes_a_signed_log_that_verifies_and_an_edit_is_named(lab, start_proxy, keys, fmt):
    """egressd with a signing key writes a log that audit verify accepts with the public key and a final checkpoint
    required, and rejects naming the line once a denial is edited into an allow."""
    key, public = keys
    rule = f"  - host: echo.test\n    ports: [{lab.echo.port}]\n"
    proxy = start_proxy({"svc.yaml": service_yaml(rule)}, "svc", "--audit-signing-key", str(key),
                        "--audit-checkpoint-records", "2", "--audit-format", fmt)
    traffic(proxy, lab)
    wait_for(lambda: proxy.audit_path.read_bytes().count(b"\n") == 4, what="three records and a checkpoint")
    assert proxy.stop() == 0
    done = verify_cli(str(proxy.audit_path), "--public-key", str(public), "--require-final-checkpoint")
    assert done.returncode == 0, done.stdout
    assert "3 records, 2 checkpoints, 2 signed; ends with its final checkpoint" in done.stdout
    lines = proxy.audit_path.read_bytes().splitlines()
    [number] = [n for n, line in enumerate(lines, 1) if b"not_allowlisted" in line][-1:]
    proxy.audit_path.write_bytes(b"\n".join(edit(number, b"not_allowlisted", b"allowed")(lines)) + b"\n")
    done = verify_cli(str(proxy.audit_path), "--public-key", str(public))
    assert done.returncode == 1
    assert f"{proxy.audit_path}:{number}: error: the chain does not match" in done.stdout


def test_two_workers_write_two_streams_that_both_verify(lab, start_proxy, keys):
    """With --workers 2 each worker writes a stream of its own (/w0, /w1) into the one log, and both verify."""
    key, public = keys
    proxy = start_proxy({"svc.yaml": service_yaml("  - host: a.test\n")}, "svc", "--workers", "2",
                        "--audit-signing-key", str(key))
    for _ in range(40):
        assert raw_request(proxy.address, b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 403")
    proxy.wait_records(40)
    assert proxy.stop() == 0
    streams = {json.loads(line)["stream"] for line in proxy.audit_path.read_bytes().splitlines()}
    assert sorted(s.rsplit("/", 1)[1] for s in streams) == ["w0", "w1"]
    done = verify_cli(str(proxy.audit_path), "--public-key", str(public), "--require-final-checkpoint")
    assert done.returncode == 0 and "2 streams, 0 errors" in done.stdout, done.stdout


def test_a_restart_appending_to_the_log_starts_a_new_stream_and_dns_records_are_chained(lab, start_proxy, keys):
    """Two runs appending to one file are two streams; the DNS filter's records are in the chain; all verifies."""
    key, public = keys
    lab.dns.zone["api.chain.test"] = ("127.0.0.1",)
    files = {"svc.yaml": service_yaml("  - host: api.chain.test\n")}
    args = ("--dns-listen", "127.0.0.1:0", "--audit-signing-key", str(key))
    first = start_proxy(files, "svc", *args)
    for name, rcode in (("api.chain.test", "NOERROR"), ("nope.chain.test", "NXDOMAIN")):
        answer = dns.query.udp(dns.message.make_query(name, "A"), first.dns[0][0], port=first.dns[0][1], timeout=5)
        assert dns.rcode.to_text(answer.rcode()) == rcode
    first.wait_records(2)
    assert first.stop() == 0
    run_args = first.proc.args[first.proc.args.index("run") + 3:]  # without its own --audit-log FILE
    second = ProxyProcess(run_args, first.audit_path)
    try:
        second.wait_log("egressd.started")
    finally:
        assert second.stop() == 0
    records = [json.loads(line) for line in first.audit_path.read_bytes().splitlines()]
    assert [r["event"] for r in records].count("egress.dns") == 2 and len({r["stream"] for r in records}) == 2
    done = verify_cli(str(first.audit_path), "--public-key", str(public), "--require-final-checkpoint")
    assert done.returncode == 0 and "2 streams, 0 errors" in done.stdout, done.stdout
    del lab.dns.zone["api.chain.test"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_signing_key_that_cannot_be_read_stops_the_start(tmp_path, workers):
    """egressd refuses to start (exit 2) rather than run unsigned when --audit-signing-key cannot be used, and so
    does the supervisor of --workers before it starts any worker."""
    (tmp_path / "al").mkdir()
    (tmp_path / "al" / "svc.yaml").write_text(service_yaml("  - host: a.test\n"))
    done = subprocess.run(
        [sys.executable, "-m", "egressd", "run", "--listen", "127.0.0.1:0", "--admin-listen", "off",
         "--workers", workers, "--allowlists", str(tmp_path / "al"), "--service", "svc",
         "--audit-signing-key", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=30)
    assert "worker.started" not in done.stderr
    assert done.returncode == 2
    assert f"cannot start: --audit-signing-key {tmp_path / 'none'}: cannot be read" in done.stderr


@pytest.mark.skipif(not (shutil.which("jq") and shutil.which("openssl")), reason="needs jq and openssl (install.sh)")
def test_the_docs_openssl_recipe_checks_a_real_checkpoint(lab, start_proxy, keys, tmp_path):
    """The jq, base64 and openssl lines of docs/forensics.md verify a checkpoint egressd signed, and refuse it once
    its records count is changed."""
    key, public = keys
    proxy = start_proxy({"svc.yaml": service_yaml("  - host: a.test\n")}, "svc", "--audit-signing-key", str(key))
    raw_request(proxy.address, b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert proxy.stop() == 0
    text = Path(__file__).resolve().parent.parent.joinpath("docs", "forensics.md").read_text()
    recipe = re.search(r"OpenSSL 3 alone.*?```sh\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    shutil.copy(proxy.audit_path, tmp_path / "audit.jsonl")
    assert public == tmp_path / "audit.pub"
    done = subprocess.run(["bash", "-c", recipe], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "Signature Verified Successfully" in done.stdout, done.stderr
    data = (tmp_path / "audit.jsonl").read_text().replace('"records":1', '"records":2')
    (tmp_path / "audit.jsonl").write_text(data)
    done = subprocess.run(["bash", "-c", recipe], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
