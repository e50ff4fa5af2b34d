"""The allowlist loader: the shipped files load, and each invalid file fails with its exact file:line message."""

from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path

import pytest

from egressd.hostport import parse_authority
from egressd.policy import LoadError, Mode, PolicyError, ServiceIdentity, load_policy, validate
from egressd.policy.decide import decide
from egressd.policy.model import Reason, Verdict

ROOT = Path(__file__).resolve().parent.parent
ERRORS = "tests/allowlist_errors"

_PSL = "would match every site registered under it; name a registrable domain, e.g."
_MINE = "anyone can register names under"
_PORT = "is not a decimal number 1-65535 (no leading zeros or signs)"
_ONLY_GLOBAL = "is allowed only in _global.yaml, the one global file; move it there"
_ONE_OF = "an allow rule needs exactly one of host: and cidr: (write two rules for two destinations)"
_NAMED_WITHIN = "(a service account is named within its namespace)"
_NAMESPACE = (
    'is not a Kubernetes namespace name (lower-case letters, digits and "-", starting and ending with a letter or '
    'digit, at most 63 characters), e.g. "payments"'
)
_ACCOUNT = (
    'is not a Kubernetes service account name (lower-case letters, digits, "-" and ".", each part between dots '
    'starting and ending with a letter or digit, at most 253 characters), e.g. "payments-api"'
)
_ONE_SERVICE = "is one service's: remove it from one of the two files"
_NARROW = "a client address is one service's: narrow or remove one of the ranges"

# case directory -> every error, exactly as printed, relative to tests/allowlist_errors/
CASES: dict[str, list[str]] = {
    "missing_version": [
        "missing_version/payments-api.yaml:1: version: is missing; add `version: v1` at the top of the file"
    ],
    "unknown_version": [
        'unknown_version/payments-api.yaml:1: version "v2" is not supported; this egressd reads `version: v1`'
    ],
    "name_mismatch": [
        'name_mismatch/payment-api.yaml:2: service "payments-api" does not match the file name; '
        "rename the file to payments-api.yaml"
    ],
    "bad_service_name": [
        'bad_service_name/payments_api.yaml:2: service "payments_api" is not a Kubernetes name (lower-case letters, '
        'digits and "-", starting and ending with a letter or digit, at most 63 characters), e.g. "payments-api"'
    ],
    "missing_service": ["missing_service/payments-api.yaml:1: service: is missing; add `service: payments-api`"],
    "global_in_service_file": [f"global_in_service_file/payments-api.yaml:3: global: {_ONLY_GLOBAL}"],
    "two_globals": [
        "two_globals/more-globals.yaml:1: service: is missing; add `service: more-globals`",
        f"two_globals/more-globals.yaml:2: global: {_ONLY_GLOBAL}",
        f"two_globals/more-globals.yaml:3: deny: {_ONLY_GLOBAL}",
    ],
    "service_in_global": [
        "service_in_global/_global.yaml:3: service: does not belong in _global.yaml; "
        "put a service's rules in <service>.yaml",
        "service_in_global/_global.yaml:4: mode: does not belong in _global.yaml; set mode: in each service's file",
    ],
    "global_missing": ["global_missing/_global.yaml:1: global: is missing; _global.yaml must say `global: true`"],
    "global_false": ['global_false/_global.yaml:2: global "false" is not valid; write global: true'],
    "yml_file": ["yml_file/payments-api.yml: .yml files are not read; rename it to payments-api.yaml"],
    "reserved_underscore": [
        "reserved_underscore/_defaults.yaml: names starting with '_' are reserved and _global.yaml is the only one; "
        "rename the file"
    ],
    "empty_dir": ["empty_dir: no allowlist files (*.yaml) found; add one file per service"],
    "unquoted_wildcard": [
        "unquoted_wildcard/payments-api.yaml:4: YAML syntax error: while scanning an alias, expected alphabetic or "
        "numeric character, but found '.'; fix the YAML (a value starting with \"*\" must be quoted: "
        'host: "*.example.com")'
    ],
    "yaml_alias": [
        "yaml_alias/payments-api.yaml:7: YAML syntax error: found an alias, and aliases are not allowed; "
        "fix the YAML (write the value out in full where it applies)"
    ],
    "multi_document": [
        "multi_document/payments-api.yaml:3: YAML syntax error: expected a single document in the stream, but found "
        "another document; fix the YAML (one document per file: remove the second '---')"
    ],
    "empty_file": ["empty_file/payments-api.yaml:1: file is empty; start it with `version: v1`"],
    "not_utf8": ["not_utf8/payments-api.yaml:4: is not UTF-8 text; save the file as UTF-8"],
    "not_a_mapping": [
        "not_a_mapping/payments-api.yaml:1: an allowlist file must be a mapping with keys from: "
        "version, service, mode, identities, allow"
    ],
    "duplicate_key": ['duplicate_key/payments-api.yaml:5: duplicate key "allow" (first on line 3); keep one of them'],
    "unknown_key": [
        'unknown_key/payments-api.yaml:4: unknown key "hosts" in an allow rule; '
        "allowed keys are: host, cidr, ports, tls, inspect"
    ],
    "unknown_top_key": [
        'unknown_top_key/payments-api.yaml:3: unknown key "allowed" in an allowlist file; '
        "allowed keys are: version, service, mode, identities, allow"
    ],
    "deny_in_service": [f"deny_in_service/payments-api.yaml:3: deny: {_ONLY_GLOBAL}"],
    "mode_on": ['mode_on/payments-api.yaml:3: mode "on" is not valid; write mode: enforce or mode: audit'],
    "octal_port": [f'octal_port/payments-api.yaml:5: port "0443" {_PORT}'],
    "port_out_of_range": [
        f'port_out_of_range/payments-api.yaml:5: port "0" {_PORT}',
        f'port_out_of_range/payments-api.yaml:5: port "65536" {_PORT}',
        f'port_out_of_range/payments-api.yaml:5: port "-1" {_PORT}',
    ],
    "duplicate_port": ["duplicate_port/payments-api.yaml:7: port 443 is listed twice; remove one"],
    "empty_ports": [
        "empty_ports/payments-api.yaml:5: ports is empty; list at least one port, "
        "or remove ports: for the default [443]"
    ],
    "ports_not_list": ["ports_not_list/payments-api.yaml:5: ports must be a list; write ports: [443]"],
    "tls_yes": ['tls_yes/payments-api.yaml:5: tls "yes" is not valid; write tls: true or tls: false'],
    "host_and_cidr": [f"host_and_cidr/payments-api.yaml:4: {_ONE_OF}"],
    "neither_host_nor_cidr": [f"neither_host_nor_cidr/payments-api.yaml:4: {_ONE_OF}"],
    "rule_not_mapping": [
        "rule_not_mapping/payments-api.yaml:4: an allow rule must be a mapping with keys from: "
        "host, cidr, ports, tls, inspect"
    ],
    "allow_empty_value": ["allow_empty_value/payments-api.yaml:3: allow must be a list; write allow: [] for none"],
    "empty_host": ["empty_host/payments-api.yaml:4: host is empty; give it a value"],
    "bare_wildcard": [
        'bare_wildcard/payments-api.yaml:4: host "*" would match every host; name a domain, e.g. "*.example.com"',
        'bare_wildcard/payments-api.yaml:5: host "**" would match every host; name a domain, e.g. "*.example.com"',
    ],
    "inner_wildcard": [
        'inner_wildcard/payments-api.yaml:4: host "api*.example.com": "*" stands for a whole label, never part of one '
        '("api*"); write "*" for any one label there, e.g. "*.example.com", or list the names',
        'inner_wildcard/payments-api.yaml:5: host "a.**.example.com": "**" is allowed only as the whole first label '
        '("**.example.com"); write "*" for exactly one label here, e.g. "a.*.example.com"',
        'inner_wildcard/payments-api.yaml:6: host "api.example.*": the last label (the top-level domain) is never a '
        'wildcard; name it, e.g. "api.example.com"',
    ],
    "registrable_wildcard": [
        'registrable_wildcard/_global.yaml:6: host "app.*.github.io": the "*" in label 2 can be the registrable label '
        f'of "app.x.github.io" ({_MINE} "github.io"); write that label out, e.g. "app.example.github.io"',
        'registrable_wildcard/payments-api.yaml:5: host "*.s3.*.amazonaws.com": the "*" in label 1 can be the '
        f'registrable label of "x.s3.af-south-1.amazonaws.com" ({_MINE} "s3.af-south-1.amazonaws.com"); '
        'write that label out, e.g. "*.example.s3.*.amazonaws.com"',
        'registrable_wildcard/payments-api.yaml:6: host "api.*.com": the "*" in label 2 can be the registrable label '
        f'of "api.x.com" ({_MINE} "com"); write that label out, e.g. "api.example.com"',
        'registrable_wildcard/payments-api.yaml:7: host "**.amazonaws.com": the "**" in label 1 can be the first '
        'label of "compute.amazonaws.com", itself a public suffix (anyone can register names under it); '
        'write that label out, e.g. "**.example.amazonaws.com"',
        'registrable_wildcard/payments-api.yaml:8: host "api.*.kawasaki.jp": the "*" in label 2 can be the '
        f'registrable label of "api.city.kawasaki.jp" ({_MINE} "kawasaki.jp"); '
        'write that label out, e.g. "api.example.kawasaki.jp"',
    ],
    "public_suffix": [
        f'public_suffix/payments-api.yaml:4: host "*.com": wildcard directly over public suffix "com" {_PSL} '
        '"*.example.com"',
        f'public_suffix/payments-api.yaml:5: host "**.co.jp": wildcard directly over public suffix "co.jp" {_PSL} '
        '"**.example.co.jp"',
        f'public_suffix/payments-api.yaml:6: host "*.github.io": wildcard directly over public suffix "github.io" '
        f'{_PSL} "*.example.github.io"',
    ],
    "ip_host": [
        'ip_host/payments-api.yaml:4: host "10.0.0.1" is an IP address, and IP destinations never match host rules; '
        "write cidr: 10.0.0.1/32",
        'ip_host/payments-api.yaml:5: host "[2001:db8::1]" is an IP address, and IP destinations never match host '
        "rules; write cidr: 2001:db8::1/128",
    ],
    "bad_host": [
        "bad_host/payments-api.yaml:4: invalid host: 'a..example.com': label '' is not a DNS label "
        "(letters, digits, '-', '_'; 1-63 characters)",
        "bad_host/payments-api.yaml:5: invalid host: '0x7f000001' looks like an IP address in a non-canonical form; "
        "write IPv4 as four decimal parts (1.2.3.4)",
    ],
    "bad_cidr": [
        "bad_cidr/payments-api.yaml:4: invalid cidr: 10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?",
        "bad_cidr/payments-api.yaml:5: invalid cidr: 10.0.0.0/33: prefix length 33 is out of range 0-32 for IPv4",
        "bad_cidr/payments-api.yaml:6: invalid cidr: 10.0.0.0/255.0.0.0: write the prefix length, "
        "not a mask or padded number: 10.0.0.0/8",
    ],
    "cidr_everything": [
        "cidr_everything/payments-api.yaml:4: cidr 0.0.0.0/0 would admit every address; name the network you need",
        "cidr_everything/payments-api.yaml:5: cidr ::/0 would admit every address; name the network you need",
    ],
    "deny_ports": ["deny_ports/_global.yaml:5: deny rules apply to every port; remove ports:"],
    "duplicate_rule": [
        "duplicate_rule/payments-api.yaml:5: allow rule api.stripe.com repeats the rule on line 4; remove one"
    ],
    "duplicate_allow_cidr": [
        "duplicate_allow_cidr/_global.yaml:5: allow_cidrs lists 10.96.0.0/12 twice; remove one",
        "duplicate_allow_cidr/_global.yaml:6: invalid allow_cidrs entry: 10.96.0.1/12 has host bits set; "
        "did you mean 10.96.0.0/12?",
    ],
    "identities_in_global": [
        "identities_in_global/_global.yaml:3: identities: does not belong in _global.yaml; "
        "list who a service is for in <service>.yaml"
    ],
    "identities_not_list": [
        "identities_not_list/payments-api.yaml:4: identities must be a list; "
        "write identities: [{namespace: NAMESPACE, serviceAccount: NAME}] or [] for none"
    ],
    "identity_unknown_key": [
        'identity_unknown_key/payments-api.yaml:5: unknown key "name" in an identity; '
        "allowed keys are: namespace, serviceAccount, cidr",
        'identity_unknown_key/payments-api.yaml:7: key "serviceaccount" in an identity: '
        "write serviceAccount: (as Kubernetes spells it)",
    ],
    "identity_namespace_only": [
        "identity_namespace_only/payments-api.yaml:4: an identity with namespace: needs serviceAccount: too "
        f"{_NAMED_WITHIN}; add serviceAccount: to it",
        "identity_namespace_only/payments-api.yaml:5: an identity with serviceAccount: needs namespace: too "
        f"{_NAMED_WITHIN}; add namespace: to it",
    ],
    "identity_cidr_and_account": [
        "identity_cidr_and_account/payments-api.yaml:4: an identity is either namespace: with serviceAccount:, "
        "or cidr:, not both; write two identities"
    ],
    "identity_neither": [
        "identity_neither/payments-api.yaml:4: an identity needs namespace: and serviceAccount:, or cidr:",
        "identity_neither/payments-api.yaml:5: an identity must be a mapping with keys from: "
        "namespace, serviceAccount, cidr",
    ],
    "identity_bad_names": [
        f'identity_bad_names/payments-api.yaml:4: namespace "Payments" {_NAMESPACE}',
        f'identity_bad_names/payments-api.yaml:6: namespace "payments.prod" {_NAMESPACE}',
        f'identity_bad_names/payments-api.yaml:9: serviceAccount "payments_api" {_ACCOUNT}',
        "identity_bad_names/payments-api.yaml:11: serviceAccount is empty; give it a value",
    ],
    "identity_bad_cidr": [
        "identity_bad_cidr/payments-api.yaml:4: invalid identity cidr: 10.20.0.0/33: "
        "prefix length 33 is out of range 0-32 for IPv4",
        "identity_bad_cidr/payments-api.yaml:5: invalid identity cidr: payments is not a CIDR; "
        "write an IP address and prefix length, e.g. 10.0.0.0/8",
        "identity_bad_cidr/payments-api.yaml:6: identity cidr 0.0.0.0/0 would make every client this service; "
        "name the clients' network",
        "identity_bad_cidr/payments-api.yaml:7: identity cidr ::/0 would make every client this service; "
        "name the clients' network",
        'identity_bad_cidr/payments-api.yaml:8: identity cidr "::ffff:10.20.0.0/120" is an IPv4-mapped IPv6 range; '
        "write 10.20.0.0/24 (IPv4 clients are matched by their IPv4 address)",
    ],
    "identity_host_bits": [
        "identity_host_bits/payments-api.yaml:4: invalid identity cidr: 10.20.0.1/24 has host bits set; "
        "did you mean 10.20.0.0/24?",
        "identity_host_bits/payments-api.yaml:5: invalid identity cidr: 2001:db8::1/64 has host bits set; "
        "did you mean 2001:db8::/64?",
    ],
    "identity_account_twice": [
        "identity_account_twice/payments-api.yaml:4: service account payments/payments-api is already an identity "
        f"of service checkout-web ({ERRORS}/identity_account_twice/checkout-web.yaml:6); "
        f"a service account {_ONE_SERVICE}"
    ],
    "identity_account_repeated": [
        "identity_account_repeated/payments-api.yaml:6: service account payments/payments-api is listed twice "
        "(first on line 4); remove one"
    ],
    "identity_cidr_overlap": [
        "identity_cidr_overlap/payments-api.yaml:4: identity cidr 10.20.0.128/25 overlaps 10.20.0.0/24, an identity "
        f"of service checkout-web ({ERRORS}/identity_cidr_overlap/checkout-web.yaml:4); {_NARROW}",
        "identity_cidr_overlap/payments-api.yaml:6: identity cidr 2001:db8:20::/48 is already an identity of service "
        f"checkout-web ({ERRORS}/identity_cidr_overlap/checkout-web.yaml:5); a client address {_ONE_SERVICE}",
    ],
    "identity_cidr_overlap_in_file": [
        "identity_cidr_overlap_in_file/payments-api.yaml:5: identity cidr 10.20.7.0/24 overlaps 10.20.0.0/16 "
        "on line 4 of this file; narrow or remove one of them",
        "identity_cidr_overlap_in_file/payments-api.yaml:7: identity cidr 10.30.0.0/24 is listed twice "
        "(first on line 6); remove one",
    ],
}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _copy_shipped(tmp_path: Path) -> Path:
    target = tmp_path / "allowlists"
    shutil.copytree(ROOT / "allowlists", target)
    return target


def test_every_case_directory_has_a_table_entry() -> None:
    """Each fixture directory under tests/allowlist_errors is asserted by exactly one case below."""
    assert sorted(p.name for p in (ROOT / ERRORS).iterdir()) == sorted([*CASES, "many_errors"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_file_reports_exact_errors(case: str) -> None:
    """An invalid allowlist fails with exactly these file:line messages, each naming the fix."""
    expected = [f"{ERRORS}/{line}" for line in CASES[case]]
    assert [str(error) for error in validate(f"{ERRORS}/{case}")] == expected
    with pytest.raises(PolicyError) as info:
        load_policy(f"{ERRORS}/{case}")
    assert str(info.value) == "\n".join(expected)


def test_errors_in_several_files_are_all_reported() -> None:
    """load_policy does not stop at the first error: every error of every file is listed, by file then line."""
    with pytest.raises(PolicyError) as info:
        load_policy(f"{ERRORS}/many_errors")
    assert [str(error) for error in info.value.errors] == [
        f'{ERRORS}/many_errors/checkout-web.yaml:2: service "checkout" does not match the file name; '
        "rename the file to checkout.yaml",
        f'{ERRORS}/many_errors/checkout-web.yaml:5: tls "yes" is not valid; write tls: true or tls: false',
        f'{ERRORS}/many_errors/payments-api.yaml:3: mode "on" is not valid; write mode: enforce or mode: audit',
        f'{ERRORS}/many_errors/payments-api.yaml:5: host "*.com": wildcard directly over public suffix "com" '
        f'{_PSL} "*.example.com"',
        f'{ERRORS}/many_errors/payments-api.yaml:7: port "0443" {_PORT}',
    ]
    assert info.value.errors[0] == LoadError(f"{ERRORS}/many_errors/checkout-web.yaml", 2, info.value.errors[0].message)


def test_missing_or_non_directory(tmp_path: Path) -> None:
    """A missing directory, or a file given as the directory, is an error, never an empty policy."""
    fix = "pass the directory that holds the *.yaml files"
    assert [str(e) for e in validate(tmp_path / "nope")] == [
        f"{tmp_path / 'nope'}: cannot read the allowlist directory (No such file or directory); {fix}"
    ]
    (tmp_path / "file").write_text("")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "file")
    assert str(info.value) == f"{tmp_path / 'file'}: cannot read the allowlist directory (Not a directory); {fix}"


def test_shipped_allowlists_load() -> None:
    """The allowlists/ directory in the repository loads cleanly, with rules pointing at their file:line."""
    assert validate("allowlists") == []
    policy = load_policy("allowlists")
    assert set(policy.services) == {"payments-api", "checkout-web"}
    assert policy.services["payments-api"].mode is Mode.ENFORCE
    assert policy.services["checkout-web"].mode is Mode.AUDIT
    assert policy.files == ("allowlists/_global.yaml", "allowlists/checkout-web.yaml", "allowlists/payments-api.yaml")
    assert (
        policy.services["payments-api"]
        .allow.match_host("api.stripe.com")[0]
        .source.startswith("allowlists/payments-api.yaml:")
    )
    assert policy.global_deny.match_host("x.pastebin.com") and policy.global_allow.match_host("oauth2.googleapis.com")
    assert re.fullmatch(r"[0-9a-f]{16}", policy.version)


def test_services_mapping_is_immutable() -> None:
    """The loaded policy's services mapping cannot be changed in place."""
    policy = load_policy("allowlists")
    with pytest.raises(TypeError):
        policy.services["intruder"] = policy.services["payments-api"]  # type: ignore[index]


def test_version_hash(tmp_path: Path) -> None:
    """Policy.version is stable for the same bytes, wherever they are, and changes when one byte changes."""
    copy = _copy_shipped(tmp_path)
    original = load_policy("allowlists").version
    assert load_policy(copy).version == original == load_policy(copy).version
    path = copy / "checkout-web.yaml"
    path.write_bytes(path.read_bytes() + b" ")
    changed = load_policy(copy).version
    assert changed != original
    (copy / "README.md").write_text("not part of the policy")
    assert load_policy(copy).version == changed


def test_ignored_entries(tmp_path: Path) -> None:
    """README.md, kustomization.yaml, dotfiles, subdirectories and other extensions are ignored; files still load."""
    copy = _copy_shipped(tmp_path)
    (copy / "kustomization.yaml").write_text("configMapGenerator: [{name: egressd-allowlists}]\n")
    (copy / ".swp").write_text("junk: [")
    (copy / "notes.txt").write_text("junk: [")
    (copy / "..data").mkdir()
    (copy / "..data" / "x.yaml").write_text("junk: [")
    (copy / "old").mkdir()
    assert validate(copy) == []
    assert len(load_policy(copy).files) == 3


def test_mid_name_wildcards_load_and_decide(tmp_path: Path) -> None:
    """A whole-label "*" in any place loads with its file:line and decides through decide(); a global deny may be
    broad where an allow may not."""
    (tmp_path / "payments-api.yaml").write_text(
        'version: v1\nservice: payments-api\nallow:\n  - host: "EC2.*.AmazonAWS.com"\n'
        '  - host: "api.*.example.com"\n    ports: [443, 8443]\n'
    )
    (tmp_path / "_global.yaml").write_text('version: v1\nglobal: true\ndeny:\n  - host: "*.s3.*.amazonaws.com"\n')
    policy = load_policy(tmp_path)
    assert [rule.host for rule in policy.services["payments-api"].allow] == ["ec2.*.amazonaws.com", "api.*.example.com"]
    table = [
        ("ec2.us-east-1.amazonaws.com:443", Verdict.ALLOW, Reason.ALLOWED, "payments-api.yaml:4"),
        ("ec2.compute.amazonaws.com:443", Verdict.ALLOW, Reason.ALLOWED, "payments-api.yaml:4"),
        ("ec2.amazonaws.com:443", Verdict.DENY, Reason.NOT_ALLOWLISTED, None),
        ("ec2.a.b.amazonaws.com:443", Verdict.DENY, Reason.NOT_ALLOWLISTED, None),
        ("api.eu.example.com:8443", Verdict.ALLOW, Reason.ALLOWED, "payments-api.yaml:5"),
        ("api.eu.example.com:80", Verdict.DENY, Reason.PORT_NOT_ALLOWED, "payments-api.yaml:5"),
        ("bucket.s3.us-east-1.amazonaws.com:443", Verdict.DENY, Reason.DENYLISTED, "_global.yaml:4"),
    ]
    for destination, verdict, reason, source in table:
        decision = decide(policy, "payments-api", parse_authority(destination))
        assert (decision.verdict, decision.reason) == (verdict, reason), destination
        assert (decision.rule.source if decision.rule else None) == (source and f"{tmp_path}/{source}"), destination


def test_same_destination_in_several_files_is_fine(tmp_path: Path) -> None:
    """The same host and port may be allowed by a service and by the global file; only in-file repeats are errors."""
    (tmp_path / "a.yaml").write_text('version: v1\nservice: a\nallow:\n  - host: x.example.com\n    ports: ["443"]\n')
    (tmp_path / "b.yaml").write_text("version: v1\nservice: b\nallow:\n  - host: x.example.com\n")
    (tmp_path / "_global.yaml").write_text("version: v1\nglobal: true\nallow:\n  - host: x.example.com\n")
    policy = load_policy(tmp_path)
    assert policy.services["a"].allow.rules[0].ports == frozenset({443})
    assert policy.services["b"].mode is Mode.ENFORCE and policy.allow_cidrs == ()


def test_readme_error_examples_are_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error lines quoted in allowlists/README.md are exactly what the loader prints."""
    readme = (ROOT / "allowlists" / "README.md").read_text()
    quoted = [line for line in readme.splitlines() if line.startswith("allowlists/payments-api.yaml:")]
    (tmp_path / "allowlists").mkdir()
    body = (
        'version: v1\nservice: payments-api\nallow:\n  - host: api.stripe.com\n  - host: "*.com"\n    ports: [0443]\n'
    )
    (tmp_path / "allowlists" / "payments-api.yaml").write_text(body)
    monkeypatch.chdir(tmp_path)
    assert [str(e) for e in validate("allowlists")] == quoted[:2]
    (tmp_path / "allowlists" / "payments-api.yaml").write_text(body + "  - host: api.stripe.com\n  - host: *.x.com\n")
    assert [str(e) for e in validate("allowlists")] == quoted[2:]


def _account(line: int, namespace: str, serviceaccount: str) -> tuple[int, str | None, str | None, str | None]:
    return (line, namespace, serviceaccount, None)


def _range(line: int, cidr: str) -> tuple[int, str | None, str | None, str | None]:
    return (line, None, None, cidr)


# case -> (the identities: part of payments-api.yaml, starting on line 3; every entry as (line, ns, sa, cidr))
IDENTITY_CASES: dict[str, tuple[str, list[tuple[int, str | None, str | None, str | None]]]] = {
    "no identities key": ("", []),
    "empty list": ("identities: []\n", []),
    "service account": (
        "identities:\n  - namespace: payments\n    serviceAccount: payments-api\n",
        [_account(4, "payments", "payments-api")],
    ),
    "flow style, keys in any order": (
        "identities: [{serviceAccount: payments-api, namespace: payments}, {cidr: 10.20.0.0/24}]\n",
        [_account(3, "payments", "payments-api"), _range(3, "10.20.0.0/24")],
    ),
    "dotted service account, numeric namespace": (
        "identities:\n  - namespace: '2024'\n    serviceAccount: api.v2-payments\n",
        [_account(4, "2024", "api.v2-payments")],
    ),
    "several accounts of one namespace": (
        "identities:\n  - namespace: payments\n    serviceAccount: api\n"
        "  - namespace: payments\n    serviceAccount: worker\n  - namespace: batch\n    serviceAccount: api\n",
        [_account(4, "payments", "api"), _account(6, "payments", "worker"), _account(8, "batch", "api")],
    ),
    "IPv4 and IPv6 ranges": (
        "identities:\n  - cidr: 10.20.0.0/24\n  - cidr: 2001:DB8:20::/64\n",
        [_range(4, "10.20.0.0/24"), _range(5, "2001:db8:20::/64")],
    ),
    "a bare address is one host": (
        "identities:\n  - cidr: 10.20.0.7\n  - cidr: 2001:db8::7\n",
        [_range(4, "10.20.0.7/32"), _range(5, "2001:db8::7/128")],
    ),
    "adjacent ranges do not overlap": (
        "identities:\n  - cidr: 10.20.0.0/25\n  - cidr: 10.20.0.128/25\n  - cidr: 10.20.1.0/24\n",
        [_range(4, "10.20.0.0/25"), _range(5, "10.20.0.128/25"), _range(6, "10.20.1.0/24")],
    ),
}


@pytest.mark.parametrize("case", sorted(IDENTITY_CASES))
def test_valid_identities(case: str, tmp_path: Path) -> None:
    """A service file's identities: load into ServiceIdentity values, canonical and with their file:line."""
    text, expected = IDENTITY_CASES[case]
    path = tmp_path / "payments-api.yaml"
    path.write_text(f"version: v1\nservice: payments-api\n{text}allow: []\n")
    identities = load_policy(tmp_path).services["payments-api"].identities
    assert identities == tuple(
        ServiceIdentity(str(path), line, ns, sa, None if cidr is None else ipaddress.ip_network(cidr))
        for line, ns, sa, cidr in expected
    )
    assert all(identity.source == f"{path}:{identity.line}" for identity in identities)


# Kubernetes names: namespaces are DNS-1123 labels, service accounts DNS-1123 subdomains (at most 253 characters).
NAMESPACES_OK = ["payments", "a", "a-1", "0", "a" * 63]
NAMESPACES_BAD = ["a" * 64, "Payments", "-a", "a-", "a.b", "a_b", "ä", "a b"]
ACCOUNTS_OK = ["payments-api", "a.b.c", "a-1.b-2", "0", "a" * 100 + "." + "b" * 152]
ACCOUNTS_BAD = ["a" * 100 + "." + "b" * 153, "a..b", ".a", "a.", "a.-b", "A", "a_b", "system:serviceaccount:a:b"]


def _identity_loads(tmp_path: Path, namespace: str, account: str) -> bool:
    body = f"version: v1\nservice: a\nidentities:\n  - namespace: '{namespace}'\n    serviceAccount: '{account}'\n"
    (tmp_path / "a.yaml").write_text(body)
    return validate(tmp_path) == []


@pytest.mark.parametrize(("namespace", "ok"), [(n, True) for n in NAMESPACES_OK] + [(n, False) for n in NAMESPACES_BAD])
def test_namespace_names(namespace: str, ok: bool, tmp_path: Path) -> None:
    """A namespace: is accepted exactly when it is a DNS-1123 label (a Kubernetes namespace name)."""
    assert _identity_loads(tmp_path, namespace, "a") is ok


@pytest.mark.parametrize(("account", "ok"), [(a, True) for a in ACCOUNTS_OK] + [(a, False) for a in ACCOUNTS_BAD])
def test_service_account_names(account: str, ok: bool, tmp_path: Path) -> None:
    """A serviceAccount: is accepted exactly when it is a DNS-1123 subdomain of at most 253 characters."""
    assert _identity_loads(tmp_path, "a", account) is ok


def test_identities_of_different_services_may_sit_side_by_side(tmp_path: Path) -> None:
    """Services may share a namespace, an account name in other namespaces, adjacent ranges, and range bits across
    address families (IPv4 10.0.0.0/25 and IPv6 ::a00:0/120 are different clients)."""
    (tmp_path / "a.yaml").write_text(
        "version: v1\nservice: a\nidentities:\n  - {namespace: shop, serviceAccount: a}\n  - cidr: 10.0.0.0/25\n"
    )
    (tmp_path / "b.yaml").write_text(
        "version: v1\nservice: b\nidentities:\n  - {namespace: shop, serviceAccount: b}\n"
        "  - {namespace: other, serviceAccount: a}\n  - cidr: 10.0.0.128/25\n  - cidr: '::a00:0/120'\n"
    )
    policy = load_policy(tmp_path)
    assert [len(policy.services[name].identities) for name in ("a", "b")] == [2, 4]


def test_identity_errors_are_reported_with_every_other_error(tmp_path: Path) -> None:
    """A clash between files is listed together with the other files' errors, in file and line order."""
    (tmp_path / "a.yaml").write_text("version: v1\nservice: a\nmode: on\nidentities:\n  - cidr: 10.0.0.0/8\n")
    (tmp_path / "b.yaml").write_text("version: v1\nservice: b\nidentities:\n  - cidr: 10.1.0.0/16\n  - cidr: x\n")
    assert [(Path(e.file).name, e.line) for e in validate(tmp_path)] == [("a.yaml", 3), ("b.yaml", 4), ("b.yaml", 5)]


def test_version_covers_identities(tmp_path: Path) -> None:
    """Policy.version changes when only an identities: entry changes."""
    path = tmp_path / "a.yaml"
    path.write_text("version: v1\nservice: a\nidentities:\n  - cidr: 10.0.0.0/24\n")
    before = load_policy(tmp_path).version
    path.write_text("version: v1\nservice: a\nidentities:\n  - cidr: 10.0.1.0/24\n")
    assert load_policy(tmp_path).version != before


def test_shipped_identities() -> None:
    """The shipped payments-api.yaml lists its service account; checkout-web.yaml lists none."""
    policy = load_policy("allowlists")
    (identity,) = policy.services["payments-api"].identities
    assert (identity.namespace, identity.serviceaccount, identity.cidr) == ("payments", "payments-api", None)
    assert identity.source.startswith("allowlists/payments-api.yaml:")
    assert policy.services["checkout-web"].identities == ()


def test_readme_identity_example_is_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity clash quoted in allowlists/README.md is exactly what the loader prints."""
    readme = (ROOT / "allowlists" / "README.md").read_text()
    quoted = [line for line in readme.splitlines() if line.startswith("allowlists/refunds.yaml:")]
    directory = tmp_path / "allowlists"
    directory.mkdir()
    identities = "identities:\n  - namespace: payments\n    serviceAccount: payments-api\n  - cidr: {}\n"
    for service, cidr in (("payments-api", "10.20.0.0/24"), ("refunds", "10.20.0.128/25")):
        (directory / f"{service}.yaml").write_text(f"version: v1\nservice: {service}\n" + identities.format(cidr))
    monkeypatch.chdir(tmp_path)
    assert len(quoted) == 2
    assert [str(e) for e in validate("allowlists")] == quoted
