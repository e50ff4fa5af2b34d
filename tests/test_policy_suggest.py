"""egressd suggest: audit records in, allowlist additions out, checked by validate, test and check.

The recorded log tests/audit_logs/mixed.jsonl (see the README beside it) is run through the real CLI
against a frozen copy of the example allowlists, and its outputs compared with reviewed golden files
(``EGRESSD_UPDATE_GOLDEN=1`` rewrites them); the same log against a copy of the shipped allowlists
must pass ``egressd validate`` and ``egressd test``, and ``egressd check`` must allow every suggested
destination and still deny every name that was not to be suggested. Table tests pin down which records
count, when a wildcard is proposed, and how an existing file is edited; hypothesis checks the record
reader and that an applied proposal always loads, allows what it proposes and opens no refused name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import service_yaml
from egressd.cli import main
from egressd.cli import suggest as cli_suggest
from egressd.cli.suggest import SuggestError, add_to_kustomization, edit_existing
from egressd.hostport import parse_authority
from egressd.policy.decide import decide
from egressd.policy.loader import load_policy
from egressd.policy.model import Mode
from egressd.policy.suggest import propose, read_records, render_new, verify
from egressd.records import EVENT, DnsRecord, Record
from harness import connect_tunnel

ROOT = Path(__file__).resolve().parents[1]
LOGS = Path(__file__).parent / "audit_logs"
MIXED = LOGS / "mixed.jsonl"
BASE = 1772445600.0  # 2026-03-02T10:00:00Z
GLOBAL = "version: v1\nglobal: true\ndeny:\n  - host: \"**.blocked.example\"\n"


def egressd(*args: str, cwd: Path = ROOT, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egressd", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, input=stdin)


def connection(service: str | None, host: str | None, port: int | None, reason: str, t: float = 0, **fields) -> str:
    """One egress.connection line, built by the proxy's own Record."""
    rec = Record("1-2-3", BASE + t, "10.20.0.5:41000", "explicit", service)
    rec.host, rec.port, rec.reason = host, port, reason
    for key, value in fields.items():
        setattr(rec, key, value)
    return orjson.dumps({**rec.fields(), EVENT: rec.event}).decode()


def query(service: str, qname: str, reason: str = "not_allowlisted", t: float = 0, **fields) -> str:
    """One egress.dns line, built by the DNS filter's own DnsRecord."""
    rec = DnsRecord(BASE + t, service, "127.0.0.1:53000")
    rec.qname, rec.qtype, rec.reason, rec.rcode = qname, "A", reason, "NXDOMAIN"
    for key, value in fields.items():
        setattr(rec, key, value)
    return orjson.dumps({**rec.fields(), EVENT: rec.event}).decode()


def allowlists(directory: Path, rules: str = "", service: str = "svc", mode: str = "enforce") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_global.yaml").write_text(GLOBAL)
    (directory / f"{service}.yaml").write_text(service_yaml(rules or "  - host: base.example.com\n", service, mode))
    return directory


def suggest(directory: Path, lines: list[str], min_siblings: int = 5, service: str | None = None):
    """The proposals for ``lines`` against the allowlists in ``directory``."""
    return propose(load_policy(directory), read_records(lines), service, min_siblings)


def applied(directory: Path, lines: list[str], min_siblings: int = 5) -> str:
    """svc.yaml with the proposal for ``lines`` applied, checked: it loads and allows every proposed destination."""
    [proposal] = suggest(directory, lines, min_siblings)
    text = edit_existing((directory / "svc.yaml").read_text(), proposal)
    (directory / "svc.yaml").write_text(text)
    assert verify(load_policy(directory), [proposal]) == []
    return text


def golden(name: str, text: str) -> None:
    path = LOGS / name
    if os.environ.get("EGRESSD_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs: EGRESSD_UPDATE_GOLDEN=1 rewrites it (then review the diff)"


# -- the recorded log, through the CLI ----------------------------------------------------------------------


def test_recorded_log_has_exactly_the_fields_of_real_records():
    """Every record in the recorded log has the field set the proxy's Record or DnsRecord writes, no more, no less."""
    shapes = {
        "egress.connection": set(orjson.loads(connection("svc", "a.example", 443, "allowed"))),
        "egress.dns": set(orjson.loads(query("svc", "a.example"))),
    }
    records = []
    for line in MIXED.read_text().splitlines():
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    events = [record for record in records if isinstance(record, dict) and record.get("event") in shapes]
    odd = [set(record) for record in events if set(record) != shapes[record["event"]]]
    assert odd == [shapes["egress.connection"] - {"port"}]  # the one record cut down on purpose
    assert {record["event"] for record in events} == set(shapes) and len(events) == 41


def test_yaml_output_of_the_recorded_log_is_the_golden_file():
    """The YAML stream for the recorded log is exactly the reviewed golden file, with the read summary on stderr."""
    out = egressd("suggest", "--allowlists", "allowlists", "mixed.jsonl", cwd=LOGS)
    assert out.returncode == 0, out.stderr
    golden("mixed.suggest.yaml", out.stdout)
    assert out.stderr == (
        "egressd suggest: 46 lines read: 31 counted, 6 refused for address, SNI, Host, parsing, identity or global "
        "deny (never suggested), 5 of other events or reasons, 4 not audit records (skipped)\n"
    )


def test_patch_output_is_the_golden_patch_and_git_applies_it(tmp_path):
    """--format patch prints the golden diff, and git apply turns the allowlists into what --out writes."""
    out = egressd("suggest", "--allowlists", "allowlists", "--format", "patch", "mixed.jsonl", cwd=LOGS)
    assert out.returncode == 0, out.stderr
    golden("mixed.suggest.patch", out.stdout)
    repo = tmp_path / "repo"
    shutil.copytree(LOGS / "allowlists", repo / "allowlists")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "apply", "-"], input=out.stdout, text=True, cwd=repo, check=True)
    written = tmp_path / "written"
    shutil.copytree(LOGS / "allowlists", written / "allowlists")
    out = egressd("suggest", "--allowlists", "allowlists", "--out", "allowlists", str(MIXED), cwd=written)
    assert out.returncode == 0, out.stderr
    for name in ("payments-api.yaml", "checkout-web.yaml", "_global.yaml"):
        assert (repo / "allowlists" / name).read_text() == (written / "allowlists" / name).read_text()


SUGGESTED = [
    ("payments-api", "api.example.com:443"), ("payments-api", "telemetry.example.com:443"),
    *(("payments-api", f"{name}.cdn.example.net:443") for name in ("static", "img", "js", "fonts", "media", "assets")),
    ("payments-api", "unseen.cdn.example.net:443"),  # the wildcard's reach, as a reviewer reads it
    ("payments-api", "eu.edge.example.net:443"), ("payments-api", "us.edge.example.net:443"),
    ("payments-api", "198.51.100.7:443"), ("payments-api", "[2001:db8::7]:8443"),
    ("payments-api", "files.stripe.com:8443"),
    ("checkout-web", "www.paypalobjects.com:443"), ("checkout-web", "checkout.example.com:443"),
    ("checkout-web", "ocsp.digicert.com:8080"),
]
NOT_SUGGESTED = [
    ("payments-api", "files.example.com:80"),  # refused for its Host header
    ("payments-api", "transfer.sh:443"),  # a global deny
    ("payments-api", "x.edge.example.net:443"),  # two siblings are not a wildcard
    ("payments-api", "198.51.100.8:443"),  # /32 only
    ("payments-api", "files.stripe.com:8080"),  # only the port seen
    ("checkout-web", "report.example.org:443"),  # refused for its address
    ("checkout-web", "tracker.example.io:443"),  # refused for its SNI
    ("checkout-web", "shop-cdn.example.com:443"),
    ("checkout-web", "www.paypalobjects.com.ec2.internal:443"),  # NXDOMAIN upstream: no such name
    ("checkout-web", "login.example.com:443"),  # refused for identity
]


def test_round_trip_through_validate_test_and_check(tmp_path):
    """Written into a copy of allowlists/, the suggestion validates, the policy tests pass, and check allows
    exactly the suggested destinations (enforce mode) and still denies every name that was not to be suggested."""
    copy = tmp_path / "allowlists"
    shutil.copytree(ROOT / "allowlists", copy)
    out = egressd("suggest", "--allowlists", str(copy), "--out", str(copy), str(MIXED))
    assert out.returncode == 0, out.stderr
    assert f"egressd suggest: wrote {copy}/payments-api.yaml\n" in out.stderr
    validated = egressd("validate", str(copy))
    assert validated.returncode == 0, validated.stdout + validated.stderr
    tested = egressd("test", str(copy))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    for (service, dest), allowed in [*((case, True) for case in SUGGESTED), *((case, False) for case in NOT_SUGGESTED)]:
        checked = egressd("check", "--allowlists", str(copy), "--service", service, "--mode", "enforce", dest)
        assert (checked.returncode == 0) is allowed, (service, dest, checked.stdout)


# -- which records count --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        pytest.param(connection("svc", "a.example.com", 443, "not_allowlisted"), "counted", id="enforce-refused"),
        pytest.param(connection("svc", "a.example.com", 8443, "port_not_allowed"), "counted", id="enforce-port-miss"),
        pytest.param(connection("svc", "a.example.com", 443, "not_allowlisted", decision="allow", would_deny=True),
                     "counted", id="audit-would-deny"),
        pytest.param(connection("svc", "a.example.com", 443, "upstream_timeout", decision="allow", would_deny=True),
                     "counted", id="audit-would-deny-then-upstream-timeout"),
        pytest.param(connection("svc", "a.example.com", 443, "allowed", decision="allow"), "other", id="allowed"),
        pytest.param(connection("svc", "a.example.com", 443, "upstream_failure"), "other", id="upstream-failure"),
        pytest.param(connection("svc", "a.example.com", 443, "forbidden_address", would_deny=True), "refused",
                     id="audit-then-forbidden-address"),
        pytest.param(connection("svc", "a.example.com", 443, "sni_mismatch", sni="b.example.com"), "refused",
                     id="sni-mismatch"),
        pytest.param(connection("svc", "a.example.com", 443, "sni_missing"), "refused", id="sni-missing"),
        pytest.param(connection("svc", "a.example.com", 80, "host_mismatch"), "refused", id="host-mismatch"),
        pytest.param(connection("svc", None, None, "bad_request"), "refused", id="bad-request-no-host"),
        pytest.param(connection(None, "a.example.com", 443, "no_identity"), "refused", id="no-identity"),
        pytest.param(connection("svc", "a.example.com", 443, "bad_identity"), "refused", id="bad-identity"),
        pytest.param(connection("svc", "pastebin.com", 443, "denylisted"), "refused", id="denylisted"),
        pytest.param(query("svc", "a.example.com"), "counted", id="dns-denied"),
        pytest.param(query("svc", "a.example.com", qtype="AAAA"), "counted", id="dns-aaaa"),
        pytest.param(query("svc", "a.example.com", qtype="HTTPS"), "counted", id="dns-https"),
        pytest.param(query("svc", "a.example.com", qtype="TXT"), "other", id="dns-txt"),
        pytest.param(query("svc", "a.example.com", decision="allow", rcode="NOERROR"), "counted",
                     id="dns-audit-forwarded"),
        pytest.param(query("svc", "a.example.com", decision="allow", rcode="NXDOMAIN"), "other",
                     id="dns-audit-no-such-name"),
        pytest.param(query("svc", "1.2.3.4"), "other", id="dns-ip-literal"),
        pytest.param(query("svc", "pastebin.com", reason="denylisted"), "refused", id="dns-denylisted"),
        pytest.param(query("svc", "a.example.com", reason="passthrough", decision="allow"), "other",
                     id="dns-passthrough"),
        pytest.param('{"event": "egress.audit_gap", "ts": "x", "refused": 3}', "other", id="audit-gap"),
        pytest.param('{"event": "egressd.started", "listen": null}', "other", id="operational-log-line"),
        pytest.param("egressd: not JSON", "bad", id="not-json"),
        pytest.param("[1, 2]", "bad", id="json-list"),
        pytest.param(connection("svc", "a.example.com", 443, "not_allowlisted")[:-30], "bad", id="cut-short"),
        pytest.param(connection("svc", "a.example.com", True, "not_allowlisted"), "bad", id="port-true"),
        pytest.param(connection("svc", "a.example.com", 0, "not_allowlisted"), "bad", id="port-0"),
        pytest.param(connection("svc", "a.example.com", None, "not_allowlisted"), "bad", id="port-missing"),
        pytest.param(connection("../etc", "a.example.com", 443, "not_allowlisted"), "bad", id="service-not-a-name"),
        pytest.param(connection("svc", "0x7f.1", 443, "not_allowlisted"), "bad", id="host-not-canonical"),
        pytest.param(connection("svc", "a.example.com", 443, "not_allowlisted").replace('"ts":', '"when":'), "bad",
                     id="no-ts"),
    ],
)
def test_which_records_count(line, kind):
    """Each record is counted, refused (its names never suggested), of another kind, or not a record."""
    reading = read_records([line, ""])
    got = {"counted": reading.counted, "refused": reading.refused, "other": reading.other, "bad": reading.bad}
    assert reading.lines == 1 and got == {key: int(key == kind) for key in got}


def test_a_refusal_names_both_the_connect_host_and_the_sni_and_the_first_one_is_kept():
    """An SNI mismatch excludes the CONNECT host and the name in the ClientHello alike; a name refused more than
    once is reported by its earliest refusal, whatever the order of the lines."""
    reading = read_records([connection("svc", "a.example.com", 443, "sni_mismatch", t=60, sni="B.Example.COM."),
                            connection("svc", "a.example.com", 443, "forbidden_address", t=30)])
    assert list(reading.refusals) == ["a.example.com", "b.example.com"]
    assert (reading.refusals["a.example.com"].reason, reading.refusals["b.example.com"].reason) == (
        "forbidden_address", "sni_mismatch")


@given(st.lists(st.one_of(
    st.text(max_size=200),
    st.dictionaries(
        st.sampled_from(["event", "ts", "service", "host", "port", "sni", "reason", "would_deny", "decision",
                         "qname", "qtype", "rcode"]),
        st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=20),
                  st.sampled_from(["egress.connection", "egress.dns", "not_allowlisted", "port_not_allowed",
                                   "sni_mismatch", "svc", "a.example.com", "A", "allow", "2026-03-02T10:00:00Z"])),
    ).map(lambda record: orjson.dumps(record).decode()),
), max_size=20))
def test_reader_never_fails_and_accounts_for_every_line(lines):
    """Whatever the lines hold, the reader returns, and every non-blank line is counted exactly once."""
    reading = read_records(lines)
    assert reading.lines == sum(bool(line.strip()) for line in lines)
    assert reading.lines == reading.counted + reading.refused + reading.other + reading.bad
    assert reading.counted == sum(seen.connections + seen.queries for seen in reading.seen.values())


# -- what is proposed ---------------------------------------------------------------------------------------


def names(proposal) -> list[tuple[str, list[int]]]:
    return [(rule.pattern, sorted(rule.ports)) for rule in proposal.rules]


@pytest.mark.parametrize(
    ("siblings", "min_siblings", "expected"),
    [
        pytest.param(5, 5, [("*.cdn.example.net", [443])], id="five-of-five"),
        pytest.param(4, 5, [(f"n{i}.cdn.example.net", [443]) for i in range(4)], id="four-of-five"),
        pytest.param(4, 4, [("*.cdn.example.net", [443])], id="four-of-four"),
        pytest.param(2, 2, [("*.cdn.example.net", [443])], id="two-of-two"),
    ],
)
def test_min_siblings_boundary(tmp_path, siblings, min_siblings, expected):
    """A *.parent wildcard needs at least --min-siblings distinct names directly under parent."""
    lines = [connection("svc", f"n{i}.cdn.example.net", 443, "not_allowlisted") for i in range(siblings)]
    [proposal] = suggest(allowlists(tmp_path), lines, min_siblings)
    assert names(proposal) == expected


@pytest.mark.parametrize(
    ("parent", "why"),
    [
        pytest.param("github.io", "github.io is a public suffix", id="private-section"),
        pytest.param("herokuapp.com", "herokuapp.com is a public suffix", id="shared-hosting"),
        pytest.param("co.uk", "co.uk is a public suffix", id="icann-section"),
        pytest.param("internal", "internal is a public suffix", id="unknown-top-level"),
    ],
)
def test_public_suffix_parent_never_becomes_a_wildcard(tmp_path, parent, why):
    """Many names under a public suffix stay exact names, and a comment says why there is no wildcard."""
    lines = [connection("svc", f"team{i}.{parent}", 443, "not_allowlisted") for i in range(7)]
    [proposal] = suggest(allowlists(tmp_path), lines)
    assert names(proposal) == sorted((f"team{i}.{parent}", [443]) for i in range(7))
    assert proposal.notes == (f"no wildcard *.{parent} over 7 names: {why}, anyone can register a name under it",)


def test_wildcard_never_widens_ports(tmp_path):
    """Siblings seen on other ports stay exact names with their own ports; the wildcard gets only the shared ports."""
    lines = [connection("svc", f"n{i}.cdn.example.net", 443, "not_allowlisted") for i in range(6)]
    lines += [connection("svc", "n0.cdn.example.net", 8443, "not_allowlisted"),
              connection("svc", "x.cdn.example.net", 8443, "not_allowlisted"),
              connection("svc", "y.cdn.example.net", 80, "not_allowlisted")]
    [proposal] = suggest(allowlists(tmp_path), lines)
    assert names(proposal) == [("*.cdn.example.net", [443]), ("n0.cdn.example.net", [443, 8443]),
                               ("x.cdn.example.net", [8443]), ("y.cdn.example.net", [80])]


def test_a_refused_sibling_blocks_the_wildcard(tmp_path):
    """No wildcard is proposed over a parent when a name directly under it was refused; the comment says so."""
    lines = [connection("svc", f"n{i}.cdn.example.net", 443, "not_allowlisted") for i in range(6)]
    lines.append(connection("other", "evil.cdn.example.net", 443, "sni_mismatch", t=5))
    [proposal] = suggest(allowlists(tmp_path), lines)
    assert names(proposal) == [(f"n{i}.cdn.example.net", [443]) for i in range(6)]
    assert proposal.notes == (
        "no wildcard *.cdn.example.net over 6 names: evil.cdn.example.net under it was refused for sni_mismatch "
        "(other, 2026-03-02T10:00:05.000000Z); add it by hand once that is understood",
    )


def test_refused_and_denied_names_are_left_out_with_a_comment(tmp_path):
    """A name refused in any service's record, or denied by a global rule now, is not proposed but noted."""
    lines = [connection("svc", "a.example.com", 443, "not_allowlisted"),
             connection("svc", "x.blocked.example", 443, "not_allowlisted"),
             connection("svc", "ok.example.com", 443, "not_allowlisted"),
             connection("gateway-client", "a.example.com", 443, "forbidden_address", t=9)]
    [proposal] = suggest(allowlists(tmp_path), lines)
    assert names(proposal) == [("ok.example.com", [443])]
    assert proposal.notes == (
        "not suggested: a.example.com: refused for forbidden_address (gateway-client, 2026-03-02T10:00:09.000000Z); "
        "add it by hand once that is understood",
        f"not suggested: x.blocked.example: denied by the global rule at {tmp_path}/_global.yaml:4",
    )


def test_what_the_policy_allows_now_is_dropped_and_service_filters(tmp_path):
    """A record from before its rule was added proposes nothing; --service keeps only that service's records."""
    directory = allowlists(tmp_path)
    lines = [connection("svc", "base.example.com", 443, "not_allowlisted"),
             connection("svc", "new.example.com", 443, "not_allowlisted"),
             connection("other", "other.example.com", 443, "not_allowlisted")]
    assert [(p.service, names(p)) for p in suggest(directory, lines)] == [
        ("other", [("other.example.com", [443])]), ("svc", [("new.example.com", [443])])]
    assert [p.service for p in suggest(directory, lines, service="svc")] == ["svc"]
    assert suggest(directory, lines[:1]) == ()  # nothing to add, nothing left out


# -- the file texts ---------------------------------------------------------------------------------------------


SEEN = "# 1 record (1 connection), first 2026-03-02T10:00:00.000000Z, last 2026-03-02T10:00:00.000000Z"


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param(
            "  - host: api.example.com   # the API\n  - host: b.example.com\n",
            f"  # port 8443 added: {SEEN[2:]}\n  - host: api.example.com   # the API\n"
            "    ports: [443, 8443]\n  - host: b.example.com\n",
            id="no-ports-key",
        ),
        pytest.param(
            "  - host: api.example.com\n    ports: [80]  # plain HTTP\n",
            f"  # port 8443 added: {SEEN[2:]}\n  - host: api.example.com\n    ports: [80, 8443]  # plain HTTP\n",
            id="flow-ports",
        ),
        pytest.param(
            "- host: api.example.com\n  ports:\n    - 80\n    - 443\n  tls: true\n",
            f"# port 8443 added: {SEEN[2:]}\n- host: api.example.com\n  ports:\n    - 80\n    - 443\n    - 8443\n"
            "  tls: true\n",
            id="block-ports-zero-indented-list",
        ),
        pytest.param(
            "  - {host: api.example.com, tls: true}\n",
            f"  # port 8443 added: {SEEN[2:]}\n  - {{host: api.example.com, tls: true, ports: [443, 8443]}}\n",
            id="flow-mapping",
        ),
        pytest.param(
            "  - cidr: 198.51.100.7\n    ports: [443]\n",
            f"  # port 8443 added: {SEEN[2:]}\n  - cidr: 198.51.100.7\n    ports: [443, 8443]\n",
            id="one-address-cidr",
        ),
    ],
)
def test_a_port_miss_extends_the_rule_in_place(tmp_path, rules, expected):
    """A port miss on an exact rule of the service's file adds the port to that rule, keeping its layout and
    comments, with a comment above it."""
    host = "198.51.100.7" if "cidr" in rules else "api.example.com"
    text = applied(allowlists(tmp_path, rules), [connection("svc", host, 8443, "port_not_allowed")])
    assert text == service_yaml(expected)


def test_a_port_miss_on_a_wildcard_or_global_rule_adds_an_exact_rule(tmp_path):
    """A port miss on a wildcard, or on a rule of _global.yaml, adds a rule for that name and port only."""
    directory = allowlists(tmp_path, '  - host: "*.example.com"\n')
    (directory / "_global.yaml").write_text(GLOBAL + "allow:\n  - host: shared.example.org\n")
    text = applied(directory, [connection("svc", "a.example.com", 8443, "port_not_allowed"),
                               connection("svc", "shared.example.org", 80, "port_not_allowed")])
    assert text == service_yaml(
        f'  - host: "*.example.com"\n  {SEEN}\n'
        f"  # port 8443 for this name only: *.example.com ({directory}/svc.yaml:5) allows it on 443\n"
        f"  - host: a.example.com\n    ports: [8443]\n  {SEEN}\n"
        f"  # port 80 for this name only: shared.example.org ({directory}/_global.yaml:6) allows it on 443\n"
        "  - host: shared.example.org\n    ports: [80]\n"
    )


def test_new_rules_follow_an_empty_or_missing_allow_list(tmp_path):
    """``allow: []`` becomes a block list of the new rules; a file without allow: gets one at its end."""
    line = connection("svc", "a.example.com", 443, "not_allowlisted")
    empty = tmp_path / "empty"
    allowlists(empty)
    (empty / "svc.yaml").write_text("version: v1\nservice: svc\nallow: []   # nothing yet\nmode: audit\n")
    assert applied(empty, [line]) == (
        f"version: v1\nservice: svc\nallow:   # nothing yet\n  {SEEN}\n  - host: a.example.com\nmode: audit\n")
    missing = tmp_path / "missing"
    allowlists(missing)
    (missing / "svc.yaml").write_text("version: v1\nservice: svc")
    assert applied(missing, [line]) == f"version: v1\nservice: svc\nallow:\n  {SEEN}\n  - host: a.example.com\n"


def test_a_flow_allow_list_is_refused_with_the_fix(tmp_path):
    """An allow: list written in flow style cannot take commented rules; the error says file:line and the fix."""
    directory = allowlists(tmp_path)
    (directory / "svc.yaml").write_text("version: v1\nservice: svc\nallow: [{host: b.example.com}]\n")
    [proposal] = suggest(directory, [connection("svc", "a.example.com", 443, "not_allowlisted")])
    with pytest.raises(SuggestError) as raised:
        edit_existing((directory / "svc.yaml").read_text(), proposal)
    assert str(raised.value) == (
        f'{directory}/svc.yaml:3: allow: is written as a flow list ([...]); write it as a block list, one '
        '"- host: ..." item per line, and run egressd suggest again'
    )


def test_a_new_service_gets_a_whole_file(tmp_path):
    """Records of a service without a file propose a whole enforce-mode file, IP literals as /32 and /128."""
    lines = [connection("reports", "api.example.com", 443, "not_allowlisted"),
             connection("reports", "198.51.100.9", 5432, "not_allowlisted", t=60),
             connection("reports", "2001:db8::9", 443, "not_allowlisted", t=120)]
    [proposal] = suggest(allowlists(tmp_path), lines)
    assert render_new(proposal) == (
        "# Egress allowlist of the reports service, suggested by `egressd suggest` from audit records.\n"
        "# Review every rule before merging. Format: allowlists/README.md.\n"
        f"version: v1\nservice: reports\nmode: enforce\nallow:\n  {SEEN}\n  - host: api.example.com\n"
        "  # 1 record (1 connection), first 2026-03-02T10:01:00.000000Z, last 2026-03-02T10:01:00.000000Z\n"
        "  # 198.51.100.9 has no name: replace this rule with a host: rule if the destination has one\n"
        "  - cidr: 198.51.100.9/32\n    ports: [5432]\n"
        "  # 1 record (1 connection), first 2026-03-02T10:02:00.000000Z, last 2026-03-02T10:02:00.000000Z\n"
        "  # 2001:db8::9 has no name: replace this rule with a host: rule if the destination has one\n"
        "  - cidr: 2001:db8::9/128\n"
    )


def test_a_new_service_file_is_listed_in_the_kustomization(tmp_path):
    """A new service's file is added to the kustomization's list of allowlist files: written with --out, as a
    new-file diff that git applies with --format patch, and as a reminder on stderr with the YAML stream."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "allowlists", repo / "allowlists")
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "allowlists", copy)
    log = tmp_path / "audit.jsonl"
    log.write_text(connection("reports", "api.example.com", 443, "not_allowlisted") + "\n")
    out = egressd("suggest", "--allowlists", str(copy), "--out", str(copy), str(log))
    assert out.returncode == 0, out.stderr
    assert (copy / "reports.yaml").read_text().startswith("# Egress allowlist of the reports service")
    assert (copy / "kustomization.yaml").read_text() == (ROOT / "allowlists" / "kustomization.yaml").read_text() \
        .replace("      - checkout-web.yaml\n", "      - checkout-web.yaml\n      - reports.yaml\n")
    assert egressd("validate", str(copy)).returncode == 0
    stream = egressd("suggest", str(log), cwd=repo)
    assert stream.stdout.startswith("# file: reports.yaml\n# Egress allowlist of the reports service")
    assert stream.stderr.endswith("egressd suggest: list reports.yaml in allowlists/kustomization.yaml too\n")
    patch = egressd("suggest", "--format", "patch", str(log), cwd=repo)
    assert "--- /dev/null\n+++ b/allowlists/reports.yaml\n@@ -0,0 +1,8 @@\n" in patch.stdout
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "apply", "-"], input=patch.stdout, text=True, cwd=repo, check=True)
    for name in ("reports.yaml", "kustomization.yaml"):
        assert (repo / "allowlists" / name).read_text() == (copy / name).read_text()


def test_a_kustomization_without_a_list_of_files_stops_a_new_service(tmp_path):
    """When the directory's kustomization.yaml lists no allowlist file, a new service is refused with the fix."""
    allowlists(tmp_path / "allowlists")
    (tmp_path / "allowlists" / "kustomization.yaml").write_text("resources: []\n")
    (tmp_path / "audit.jsonl").write_text(connection("reports", "api.example.com", 443, "not_allowlisted") + "\n")
    out = egressd("suggest", "audit.jsonl", cwd=tmp_path)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.endswith(
        "egressd suggest: allowlists/kustomization.yaml: no list of the allowlist files (_global.yaml, svc.yaml) to "
        "add reports.yaml to; list them by hand; nothing was written\n")


def test_a_file_without_a_final_newline_patches_cleanly(tmp_path):
    """The diff of a file that does not end in a newline marks it so, and git applies it."""
    allowlists(tmp_path / "allowlists")
    (tmp_path / "allowlists" / "svc.yaml").write_text("version: v1\nservice: svc\nallow:\n  - host: b.example.com")
    (tmp_path / "audit.jsonl").write_text(connection("svc", "a.example.com", 443, "not_allowlisted") + "\n")
    patch = egressd("suggest", "--format", "patch", "audit.jsonl", cwd=tmp_path)
    assert "-  - host: b.example.com\n\\ No newline at end of file\n+  - host: b.example.com\n" in patch.stdout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "apply", "-"], input=patch.stdout, text=True, cwd=tmp_path, check=True)
    assert (tmp_path / "allowlists" / "svc.yaml").read_text().endswith(f"  {SEEN}\n  - host: a.example.com\n")


def test_nothing_is_output_when_the_result_would_not_allow_what_it_proposes(tmp_path, monkeypatch, capsys):
    """If the edited allowlists failed to allow a proposed destination, suggest prints and writes nothing, exit 1."""
    allowlists(tmp_path / "allowlists")
    (tmp_path / "audit.jsonl").write_text(connection("svc", "a.example.com", 443, "not_allowlisted") + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_suggest, "edit_existing", lambda text, proposal: text)  # a proposal lost on the way
    assert main(["suggest", "--out", "allowlists", "audit.jsonl"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.endswith(
        "egressd suggest: the suggested allowlists would not allow: svc a.example.com:443: not_allowlisted; "
        "nothing was written\n")
    assert "a.example.com" not in (tmp_path / "allowlists" / "svc.yaml").read_text()


def test_kustomization_without_a_file_list_is_left_alone():
    """A kustomization with no list naming an allowlist file gets nothing added (the caller reports it)."""
    assert add_to_kustomization("resources:\n  - a.yaml\n", ["b.yaml"], ["svc.yaml"]) is None
    assert add_to_kustomization("files: [svc.yaml]\n", ["b.yaml"], ["svc.yaml"]) is None


# -- the command line ---------------------------------------------------------------------------------------


def test_reads_standard_input_and_reports_nothing_to_suggest():
    """``-`` reads the records from standard input; records of allowed destinations suggest nothing, and names
    left out are listed on stderr when there is no file to note them in; exit 0."""
    lines = [connection("payments-api", "api.stripe.com", 443, "not_allowlisted"),
             connection("payments-api", "transfer.sh", 443, "not_allowlisted")]
    out = egressd("suggest", "-", stdin="\n".join(lines) + "\n", cwd=LOGS)
    assert (out.returncode, out.stdout) == (0, "")
    assert out.stderr.endswith(
        "egressd suggest: payments-api: not suggested: transfer.sh: denied by the global rule at "
        "allowlists/_global.yaml:9\n"
        "egressd suggest: nothing to suggest: no counted record needs a new rule or port\n")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(["--format", "patch", "--out", "x", "-"], 2,
                     "egressd suggest: --out writes the files themselves; leave out --format patch\n", id="out-patch"),
        pytest.param(["no-such.jsonl"], 1, "egressd suggest: cannot read no-such.jsonl: No such file or directory\n",
                     id="missing-log"),
        pytest.param(["--min-siblings", "1", "-"], 2,
                     "argument --min-siblings: '1' is not a whole number of at least 2", id="min-siblings-1"),
    ],
)
def test_command_line_errors(args, code, message):
    """Bad arguments and unreadable logs exit non-zero with a message saying what to do."""
    out = egressd("suggest", *args, stdin="")
    assert out.returncode == code and message in out.stderr


def test_allowlists_that_do_not_load_stop_the_suggestion(tmp_path):
    """When the current allowlists do not load, suggest says so with their errors and exits 1."""
    (tmp_path / "svc.yaml").write_text("version: v2\nservice: svc\n")
    out = egressd("suggest", "--allowlists", str(tmp_path), "-", stdin="")
    assert out.returncode == 1
    assert out.stderr.startswith(f"egressd suggest: {tmp_path}: the allowlists do not load; fix them first:\n"
                                 f"{tmp_path}/svc.yaml:1: version \"v2\" is not supported")


# -- properties -----------------------------------------------------------------------------------------------

LABELS = st.sampled_from(["a", "b", "c", "d", "e", "f", "api", "x1"])
PARENTS = st.sampled_from(["cdn.example.net", "example.com", "github.io", "co.uk", "blocked.example", "test"])
SIGHTINGS = st.lists(st.tuples(
    st.one_of(st.tuples(LABELS, PARENTS).map(".".join), st.sampled_from(["198.51.100.1", "2001:db8::1"])),
    st.sampled_from([80, 443, 8443, None]), st.sampled_from(["counted", "refused"])), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(SIGHTINGS, st.integers(2, 5))
def test_an_applied_proposal_loads_allows_it_all_and_opens_no_refused_name(tmp_path_factory, sightings, siblings):
    """Whatever was seen, the applied proposal loads, allows every proposed destination and every counted
    one not excluded, and a refused name stays denied wherever it was denied before."""
    directory = allowlists(tmp_path_factory.mktemp("prop"), "  - host: a.example.com\n    ports: [80]\n")
    lines = [connection("svc", host, port or 443, "sni_mismatch") if kind == "refused" else
             query("svc", host) if port is None else connection("svc", host, port, "not_allowlisted")
             for host, port, kind in sightings]
    before = load_policy(directory)
    proposals = suggest(directory, lines, siblings)
    for proposal in proposals:
        text = edit_existing((directory / "svc.yaml").read_text(), proposal)
        (directory / "svc.yaml").write_text(text)
    after = load_policy(directory)
    assert verify(after, proposals) == []
    refused = {host for host, port, kind in sightings if kind == "refused"}
    for host, port, _ in sightings:
        dest = parse_authority(f"[{host}]:{port or 443}" if ":" in host else f"{host}:{port or 443}")
        if host in refused and not decide(before, "svc", dest, Mode.ENFORCE).allowed:
            assert not decide(after, "svc", dest, Mode.ENFORCE).allowed, (host, port)


# -- with the real proxy ------------------------------------------------------------------------------------


@pytest.mark.isolated
def test_records_of_a_real_proxy_in_audit_mode(lab, start_proxy, tmp_path):
    """Records written by egressd in audit mode suggest the names it let through, the port it missed, and never
    the name refused for its address; check then allows them in enforce mode."""
    files = {"svc.yaml": service_yaml("  - host: api.test\n    ports: [1]\n", mode="audit")}
    proxy = start_proxy(files)
    for authority in ("metadata.test:443", f"echo.test:{lab.echo.port}", f"echo.test:{lab.echo.port}",
                      f"api.test:{lab.echo.port}"):
        sock, head = connect_tunnel(proxy.address, authority)
        with sock:
            if head.startswith(b"HTTP/1.1 200"):  # the client leaves after a byte each way, as apps do
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
    proxy.wait_records(4)
    proxy.stop()
    directory = tmp_path / "current"
    shutil.copytree(Path(proxy.proc.args[proxy.proc.args.index("--allowlists") + 1]), directory)
    out = egressd("suggest", "--allowlists", str(directory), "--out", str(directory), str(proxy.audit_path))
    assert out.returncode == 0, out.stderr
    text = (directory / "svc.yaml").read_text()
    assert f"    ports: [1, {lab.echo.port}]\n" in text and "  - host: echo.test\n" in text
    assert "metadata.test" not in text
    for dest in (f"echo.test:{lab.echo.port}", f"api.test:{lab.echo.port}"):
        checked = egressd("check", "--allowlists", str(directory), "--service", "svc", "--mode", "enforce", dest)
        assert checked.returncode == 0, checked.stdout
