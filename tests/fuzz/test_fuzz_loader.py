"""Fuzzing the allowlist loader (:func:`egressd.policy.loader.load_policy`) on generated directories.

Each example writes a directory of allowlist files built from a model of the
format (services, modes, identities, rules with hosts, CIDRs, ports and TLS, a
global file with denies and ``allow_cidrs``), where any value may come with the
wrong type and the YAML text may be damaged afterwards (a key given twice,
anchors and aliases, tags, tabs, a BOM, bytes that are not UTF-8, a second
document, nesting thousands deep); or a file of raw bytes. Properties: the
loader returns a Policy or raises PolicyError, never anything else, and
``validate`` agrees with it; every error names a file of the directory and a
line inside it; a directory without defects loads to exactly the model; and
loading is deterministic.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egressd.policy.loader import PolicyError, load_policy, validate
from egressd.policy.model import DEFAULT_PORTS, Mode

FUZZ_HEAVY = settings.get_profile("egressd-fuzz-heavy")
_serial = itertools.count()

_SERVICES = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
_NAMES = st.lists(_LABEL, min_size=1, max_size=3).map(lambda labels: ".".join([*labels, "example", "com"]))
_GOOD_HOSTS = st.one_of(_NAMES, _NAMES.map("*.{}".format), _NAMES.map("**.{}".format))
_BAD_HOSTS = st.sampled_from(["*", "a*.example.com", "exa mple.com", "", "127.1", "[::1]", "a" * 300, "xn--.com",
                              "-a.example.com", "*.example.com.evil.test/x", "a..example.com"])
_OVER_SUFFIXES = st.sampled_from(["*.com", "**.co.uk"])  # refused in allow rules only: a broad deny takes reach away
_GOOD_CIDRS = st.one_of(
    st.builds(lambda ip, n: str(ipaddress.ip_network(f"{ip}/{n}", strict=False)), st.ip_addresses(v=4),
              st.integers(8, 32)),
    st.builds(lambda ip, n: str(ipaddress.ip_network(f"{ip}/{n}", strict=False)), st.ip_addresses(v=6),
              st.integers(16, 128)),
)
_BAD_CIDRS = st.sampled_from(["10.0.0.1/8", "10.0.0.0/33", "x", "10.0.0.0/255.0.0.0", "10.0.0.0/08", "fe80::1%eth0"])
_EVERYTHING = st.sampled_from(["0.0.0.0/0", "::/0"])  # refused in allow rules only
# Values of the wrong type for each field: none of them is ever a valid value there.
_WRONG = {
    "host": st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.just("a"), st.integers(),
                                                                                       max_size=1)),
    "ports": st.one_of(st.none(), st.integers(1, 65535), st.just("443"), st.lists(st.just("x"), min_size=1,
                                                                                  max_size=2),
                       st.lists(st.sampled_from([0, 65536, -1, 443.5]), min_size=1, max_size=2), st.just([])),
    "tls": st.sampled_from([None, "yes", 1, "on", [True]]),
    "mode": st.sampled_from([None, "on", True, 1, "Enforce", ["audit"]]),
}


def _maybe_wrong(draw: st.DrawFn, good: st.SearchStrategy, defects: list[str] | None, what: str) -> object:
    """A good value, or now and then (when ``defects`` is a list) one of the wrong type, noted in ``defects``."""
    if defects is not None and draw(st.integers(0, 24)) == 0:
        defects.append(f"wrong type for {what}")
        return draw(_WRONG[what])
    return draw(good)


@st.composite
def rules(draw: st.DrawFn, defects: list[str] | None, deny: bool) -> dict:
    """An allow or deny rule: host or cidr, ports and tls for allow rules; when ``defects`` is a list, a bad value
    now and then (noted there)."""
    rule: dict = {}
    hostile = defects is not None and draw(st.integers(0, 19)) == 0
    if draw(st.integers(0, 3)):
        if hostile:
            rule["host"] = draw(_BAD_HOSTS if deny else st.one_of(_BAD_HOSTS, _OVER_SUFFIXES))
            defects.append(f"bad host {rule['host']!r}")
        else:
            rule["host"] = _maybe_wrong(draw, _GOOD_HOSTS, defects, "host")
    elif hostile:
        rule["cidr"] = draw(_BAD_CIDRS if deny else st.one_of(_BAD_CIDRS, _EVERYTHING))
        defects.append(f"bad cidr {rule['cidr']!r}")
    else:
        rule["cidr"] = draw(_GOOD_CIDRS)
    if not deny and draw(st.booleans()):
        ports = st.lists(st.integers(1, 65535), min_size=1, max_size=3, unique=True)
        rule["ports"] = _maybe_wrong(draw, ports, defects, "ports")
    if not deny and draw(st.integers(0, 3)) == 0:
        rule["tls"] = _maybe_wrong(draw, st.booleans(), defects, "tls")
    return rule


@st.composite
def service_files(draw: st.DrawFn, name: str, defects: list[str] | None) -> dict:
    doc: dict = {"version": "v1", "service": name}
    if draw(st.booleans()):
        doc["mode"] = _maybe_wrong(draw, st.sampled_from(["enforce", "audit"]), defects, "mode")
    if draw(st.integers(0, 4)) == 0:
        doc["identities"] = [{"namespace": draw(_SERVICES), "serviceAccount": name}]
    doc["allow"] = [draw(rules(defects, deny=False)) for _ in range(draw(st.integers(0, 4)))]
    return doc


@st.composite
def directories(draw: st.DrawFn, hostile: bool = True) -> tuple[dict[str, bytes], dict, list[str]]:
    """Files to write ({name: bytes}), the model they state ({service: doc}, "_global": doc) and their defects
    (none unless ``hostile``)."""
    defects: list[str] = []
    maybe = defects if hostile else None
    model: dict = {}
    for name in draw(st.lists(_SERVICES, min_size=1, max_size=3, unique=True)):
        model[name] = draw(service_files(name, maybe))
    if draw(st.booleans()):
        model["_global"] = {
            "version": "v1", "global": True,
            "allow": [draw(rules(maybe, deny=False)) for _ in range(draw(st.integers(0, 2)))],
            "deny": [draw(rules(maybe, deny=True)) for _ in range(draw(st.integers(0, 2)))],
            "allow_cidrs": draw(st.lists(_GOOD_CIDRS, max_size=2, unique=True)),
        }
    files = {f"{name}.yaml": _dump(draw, doc) for name, doc in model.items()}
    for name, doc in model.items():  # a rule repeated in one list is refused: the model says so
        for key in ("allow", "deny"):
            seen = [_key(rule, key == "deny") for rule in doc.get(key, [])]
            if len(set(seen)) != len(seen):
                defects.append(f"a rule repeated in {name}")
    if hostile and draw(st.integers(0, 4)) == 0:
        target = draw(st.sampled_from(sorted(files)))
        damage = draw(st.sampled_from(sorted(_DAMAGE)))
        files[target] = _DAMAGE[damage](files[target])
        defects.append(f"damage: {damage}")
    if hostile and draw(st.integers(0, 9)) == 0:
        files[draw(st.sampled_from(["raw.yaml", "_raw.yaml", "raw.yml"]))] = draw(st.binary(max_size=200))
        defects.append("a raw file")
    return files, model, defects


def _key(rule: dict, deny: bool) -> str:
    """What makes two rules the same rule (the default ports written out or not), for any generated values."""
    try:
        return repr(_model_rule(rule, deny))
    except (TypeError, ValueError, KeyError):
        return repr(sorted(rule.items(), key=str))


def _dump(draw: st.DrawFn, doc: dict) -> bytes:
    flow = draw(st.sampled_from([False, None, True]))
    return yaml.safe_dump(doc, default_flow_style=flow, sort_keys=False, allow_unicode=True).encode()


# Damage done to a file's text afterwards; each makes it wrong.
_DAMAGE = {
    "key given twice": lambda b: b + b"version: v1\n",
    "alias": lambda b: b"x: &a 1\n" + b,
    "python tag": lambda b: b.replace(b"version: v1", b"version: !!python/object/apply:os.system [echo]", 1),
    "tab indent": lambda b: b + b"allow:\n\t- host: a.example.com\n",
    "bom inside": lambda b: b + b"\xef\xbb\xbfx: 1\n",
    "not utf-8": lambda b: b + b"# \xff\xfe\n",
    "second document": lambda b: b + b"---\nversion: v1\n",
    "nested 5,000 deep": lambda b: b + b"deep: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "mapping nested 2,000 deep": lambda b: b + b"deep: " + b"{a: " * 2000 + b"1" + b"}" * 2000 + b"\n",
    "control character": lambda b: b + b"x: \x07\n",
}


def _write(root: Path, files: dict[str, bytes]) -> Path:
    directory = root / f"d{next(_serial)}"
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-allowlists")


def _load(directory: Path):
    try:
        return load_policy(directory)
    except PolicyError as exc:
        return exc


@FUZZ_HEAVY
@given(directories())
@example(({"svc.yaml": b"version: v1\nservice: svc\nallow: " + b"[" * 5000 + b"]" * 5000 + b"\n"}, {}, ["deep"]))
@example(({"svc.yaml": b"version: v1\nservice: svc\nallow:\n" + b"  - " * 3000 + b"x\n"}, {}, ["deep"]))
def test_a_policy_or_policy_error_and_validate_agrees(root: Path, generated: tuple) -> None:
    """Any directory loads to a Policy or raises PolicyError (nothing else, and always when it has a defect),
    validate() lists the same errors, each naming a file of the directory and a line inside it, and a second load
    gives the same result."""
    files, _, defects = generated
    directory = _write(root, files)
    result = _load(directory)
    if defects:
        assert isinstance(result, PolicyError), f"loaded despite {defects}"
    assert validate(directory) == (list(result.errors) if isinstance(result, PolicyError) else [])
    again = _load(directory)
    if isinstance(result, PolicyError):
        assert isinstance(again, PolicyError) and again.errors == result.errors
        for error in result.errors:
            assert error.file == str(directory) or Path(error.file).parent == directory, error
            if error.line is not None:
                assert 1 <= error.line <= _lines(directory / Path(error.file).name), error
            assert error.message and "Traceback" not in error.message
    else:
        assert not isinstance(again, PolicyError) and again.version == result.version


@FUZZ_HEAVY
@given(directories(hostile=False).filter(lambda generated: not generated[2]))
def test_a_directory_without_defects_loads_to_its_model(root: Path, generated: tuple) -> None:
    """A generated directory with no defect loads, and holds exactly the services, modes and rules of its model."""
    files, model, _ = generated
    policy = load_policy(_write(root, files))
    services = {name: doc for name, doc in model.items() if name != "_global"}
    assert set(policy.services) == set(services)
    for name, doc in services.items():
        service = policy.services[name]
        assert service.mode is Mode(doc.get("mode", "enforce"))
        assert [_rule_of(rule) for rule in service.allow.rules] == [_model_rule(r) for r in doc["allow"]]
    global_doc = model.get("_global", {})
    allow, deny = global_doc.get("allow", []), global_doc.get("deny", [])
    assert [_rule_of(rule) for rule in policy.global_allow.rules] == [_model_rule(r) for r in allow]
    assert [_rule_of(rule) for rule in policy.global_deny.rules] == [_model_rule(r, deny=True) for r in deny]
    cidrs = global_doc.get("allow_cidrs", [])
    assert [str(n) for n in policy.allow_cidrs] == [str(ipaddress.ip_network(c)) for c in cidrs]


def _lines(path: Path) -> int:
    """The lines of a file as YAML counts them (CR, CR LF, LF, NEL, LS and PS end a line)."""
    text = path.read_bytes().decode("utf-8", "replace")
    return len(re.findall("\r\n|[\r\n\x85\u2028\u2029]", text)) + 1


def _rule_of(rule) -> tuple:
    return rule.pattern, rule.ports, rule.tls


def _model_rule(rule: dict, deny: bool = False) -> tuple:
    pattern = rule["host"] if "host" in rule else str(ipaddress.ip_network(rule["cidr"]))
    ports = None if deny else frozenset(rule["ports"]) if "ports" in rule else DEFAULT_PORTS
    return pattern, ports, rule.get("tls")


@FUZZ_HEAVY
@given(st.binary(max_size=400), st.sampled_from(["svc.yaml", "_global.yaml"]))
@example(b"\xef\xbb\xbf", "svc.yaml")
@example(b"version: v1\nservice: svc\nallow: !!binary aGVsbG8=\n", "svc.yaml")
def test_raw_bytes_give_a_policy_error(root: Path, data: bytes, name: str) -> None:
    """A file of arbitrary bytes is refused with PolicyError (or, by chance, loads), never another exception."""
    result = _load(_write(root, {name: data}))
    if isinstance(result, PolicyError):
        assert result.errors


# -- findings, kept as regression cases ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (b"version: v1\nservice: svc\nallow: " + b"[" * 5000 + b"]" * 5000 + b"\n", 3),
        (b"version: v1\nservice: svc\nallow:\n" + b"  - " * 3000 + b"x\n", 4),
        (b"version: v1\nservice: svc\nallow:\n  - host: " + b"{a: " * 2000 + b"1" + b"}" * 2000 + b"\n", 4),
    ],
    ids=["flow-lists", "block-lists", "flow-mappings"],
)
def test_values_nested_thousands_deep_are_an_error_not_a_recursion_error(tmp_path: Path, text: bytes,
                                                                         line: int) -> None:
    """A file nesting values thousands deep is refused with its line and the depth allowed (it raised
    RecursionError out of load_policy, past every caller that handles PolicyError)."""
    (tmp_path / "svc.yaml").write_bytes(text)
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    [error] = info.value.errors
    assert error.line == line and "nested more than 32 deep" in error.message


NULLS = [
    ("host-null", "  - host: null\n", 4, 'host is null, which YAML reads as no value; give it a value (quote'),
    ("host-tilde", "  - host: ~\n", 4, "host is ~, which YAML reads as no value"),
    ("host-NULL", "  - host: NULL\n", 4, "host is NULL, which YAML reads as no value"),
    ("port-null", "  - host: a.example.com\n    ports: [null]\n", 5, "a port is null, which YAML reads as no value"),
]


@pytest.mark.parametrize(("case", "rule", "line", "message"), NULLS, ids=[c[0] for c in NULLS])
def test_a_yaml_null_is_no_value_not_the_text_null(tmp_path: Path, case: str, rule: str, line: int,
                                                   message: str) -> None:
    """A plain null (``null``, ``~``, ``NULL``) is refused as a missing value: ``host: null`` allowed the name
    "null", while every other YAML reader, and a reviewer, sees a rule with no host."""
    (tmp_path / "svc.yaml").write_text(f"version: v1\nservice: svc\nallow:\n{rule}")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    [error] = info.value.errors
    assert error.line == line and message in error.message


def test_a_quoted_null_is_the_text_null(tmp_path: Path) -> None:
    """Quoted, "null" is the text it spells (here a single-label host name), as YAML reads it too."""
    (tmp_path / "svc.yaml").write_text('version: v1\nservice: svc\nallow:\n  - host: "null"\n')
    assert [rule.pattern for rule in load_policy(tmp_path).services["svc"].allow.rules] == ["null"]
