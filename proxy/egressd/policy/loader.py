"""Allowlist files (format v1) -> an immutable :class:`~egressd.policy.model.Policy`.

The YAML is composed into nodes (``yaml.compose``, safe loader) and walked
here, never constructed: every scalar is read as the text it is and parsed by
us, so YAML 1.1 surprises cannot happen (``0443`` is not octal 291, ``on`` is
not True, a plain ``null`` is no value rather than the name "null") and every
error carries the line it is on. Duplicate keys, which PyYAML would silently
resolve to the last one, are errors, and so are aliases (``*name``): a reviewer
must see every value where it applies, and values nested deeper than any
allowlist does (the composer recurses once per level).

Loading never stops at the first problem and never skips a file: it collects
every error in every file and either returns a whole Policy or raises
:class:`PolicyError` with all of them, each formatted ``file:line: what is
wrong; what to do``. See ``allowlists/README.md`` for the format; a rule's
``inspect:`` is read by :mod:`egressd.policy.inspectformat`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from yaml.nodes import Node, SequenceNode

from egressd.addresses import parse_cidr
from egressd.policy.identities import IdentityIndex, clashes, parse_identities
from egressd.policy.inspectformat import CIDR_RULE, DENY_RULE, parse_inspect
from egressd.policy.match import RuleSet, parse_pattern
from egressd.policy.model import DEFAULT_PORTS, IPNetwork, Mode, Policy, Rule, ServicePolicy
from egressd.policy.nodes import NONE, VERSION, Fields, File, LoadError, compose, yaml_files

__all__ = ["LoadError", "PolicyError", "load_policy", "validate"]

GLOBAL_FILE = "_global.yaml"
# kustomization.yaml: the ConfigMap generator that k8s/base builds from this directory (kustomize may read
# only files under a kustomization's own directory, so it lives here); not a policy file.
IGNORED_FILES = frozenset({"README.md", "kustomization.yaml"})
SERVICE_KEYS = ("version", "service", "mode", "identities", "allow")
GLOBAL_KEYS = ("version", "global", "allow", "deny", "allow_cidrs")
ALLOW_RULE_KEYS = ("host", "cidr", "ports", "tls", "inspect")
DENY_RULE_KEYS = ("host", "cidr")

# Keys that belong elsewhere: the message says where, instead of "unknown key".
_ONLY_GLOBAL = f"is allowed only in {GLOBAL_FILE}, the one global file; move it there"
_SERVICE_HINTS = {key: f"{key}: {_ONLY_GLOBAL}" for key in ("global", "deny", "allow_cidrs")}
_GLOBAL_HINTS = {
    "service": f"service: does not belong in {GLOBAL_FILE}; put a service's rules in <service>.yaml",
    "mode": f"mode: does not belong in {GLOBAL_FILE}; set mode: in each service's file",
    "identities": f"identities: does not belong in {GLOBAL_FILE}; list who a service is for in <service>.yaml",
}
_DENY_HINTS = {"ports": "deny rules apply to every port; remove ports:", "inspect": DENY_RULE}
_T = TypeVar("_T")
SERVICE_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_PORT = re.compile(r"[1-9][0-9]{0,4}\Z")


class PolicyError(Exception):
    """The allowlists did not load; ``errors`` holds every problem found, in file and line order."""

    def __init__(self, errors: tuple[LoadError, ...] | list[LoadError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(error) for error in self.errors))


def load_policy(directory: str | Path) -> Policy:
    """Load every allowlist file in ``directory``; raise PolicyError listing every error if any file is wrong."""
    policy, errors = _load(Path(directory))
    if errors or policy is None:
        raise PolicyError(errors)
    return policy


def validate(directory: str | Path) -> list[LoadError]:
    """Every error in the allowlists in ``directory``; an empty list means :func:`load_policy` would succeed."""
    return _load(Path(directory))[1]


@dataclass(frozen=True, slots=True)
class _Global:
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    allow_cidrs: tuple[IPNetwork, ...] = ()


def _load(directory: Path) -> tuple[Policy | None, list[LoadError]]:
    names, errors = _list_directory(directory)
    services: dict[str, ServicePolicy] = {}
    global_ = _Global()
    digest = hashlib.sha256()
    for name in names:
        path = directory / name
        file = File(str(path))
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(LoadError(file.path, None, f"cannot read: {exc.strerror}; check the file's permissions"))
            continue
        digest.update(b"%d:%s%d:" % (len(name.encode()), name.encode(), len(data)) + data)
        parsed = _parse_file(file, name, data)
        errors.extend(file.errors)
        if isinstance(parsed, _Global):
            global_ = parsed
        elif parsed is not None:
            services[parsed.name] = parsed
    errors.extend(clashes(services.values()))
    if errors:
        return None, sorted(errors, key=lambda error: (error.file, error.line or 0))
    policy = Policy(
        services=MappingProxyType(dict(sorted(services.items()))),
        global_allow=RuleSet(global_.allow),
        global_deny=RuleSet(global_.deny),
        allow_cidrs=global_.allow_cidrs,
        version=digest.hexdigest()[:16],
        files=tuple(str(directory / name) for name in names),
        identities=IdentityIndex(services.values()),
    )
    return policy, []


def _list_directory(directory: Path) -> tuple[list[str], list[LoadError]]:
    """The ``*.yaml`` file names to load, sorted, and the errors about the directory's contents."""
    paths, errors = yaml_files(directory, "allowlist directory", "pass the directory that holds the *.yaml files",
                               IGNORED_FILES)
    names: list[str] = []
    for path in paths:
        if path.name.startswith("_") and path.name != GLOBAL_FILE:
            message = f"names starting with '_' are reserved and {GLOBAL_FILE} is the only one; rename the file"
            errors.append(LoadError(str(path), None, message))
        else:
            names.append(path.name)
    if not names and not errors:
        errors.append(LoadError(str(directory), None, "no allowlist files (*.yaml) found; add one file per service"))
    return names, errors


def _parse_file(file: File, name: str, data: bytes) -> ServicePolicy | _Global | None:
    root = compose(file, data)
    if root is None:
        return None
    is_global = name == GLOBAL_FILE
    keys, hints = (GLOBAL_KEYS, _GLOBAL_HINTS) if is_global else (SERVICE_KEYS, _SERVICE_HINTS)
    fields = file.mapping(root, "an allowlist file", keys, hints)
    if fields is None or not _check_version(file, root, fields):
        return None
    if is_global:
        return _parse_global(file, root, fields)
    return _parse_service(file, root, fields, name.removesuffix(".yaml"))


def _check_version(file: File, root: Node, fields: Fields) -> bool:
    """Report a missing or unknown version; False when the file is not v1 and must not be read further."""
    if "version" not in fields:
        file.error(root, f"version: is missing; add `version: {VERSION}` at the top of the file")
        return True
    node = fields["version"][1]
    value = file.scalar(node, "version")
    if value is not None and value != VERSION:
        file.error(node, f'version "{value}" is not supported; this egressd reads `version: {VERSION}`')
    return value == VERSION


def _parse_service(file: File, root: Node, fields: Fields, stem: str) -> ServicePolicy:
    if "service" in fields:
        file.convert(fields["service"][1], "service", lambda text: _service_name(text, stem))
    else:
        file.error(root, f"service: is missing; add `service: {stem}`")
    mode = file.convert(fields["mode"][1], "mode", _MODE) if "mode" in fields else None
    identities = parse_identities(file, fields["identities"][1]) if "identities" in fields else ()
    allow = _parse_rules(file, fields["allow"][1], deny=False) if "allow" in fields else ()
    return ServicePolicy(
        name=stem, mode=mode or Mode.ENFORCE, allow=RuleSet(allow), source=file.path, identities=identities
    )


def _parse_global(file: File, root: Node, fields: Fields) -> _Global:
    if "global" in fields:
        file.convert(fields["global"][1], "global", _GLOBAL_FLAG)
    else:
        file.error(root, f"global: is missing; {GLOBAL_FILE} must say `global: true`")
    allow = _parse_rules(file, fields["allow"][1], deny=False) if "allow" in fields else ()
    deny = _parse_rules(file, fields["deny"][1], deny=True) if "deny" in fields else ()
    cidrs: list[IPNetwork] = []
    for node in file.sequence(fields["allow_cidrs"][1], "allow_cidrs") if "allow_cidrs" in fields else ():
        network = file.convert(node, "allow_cidrs entry", lambda text: _network(text, "allow_cidrs entry"))
        if network is not None and network in cidrs:
            file.error(node, f"allow_cidrs lists {network} twice; remove one")
        elif network is not None:
            cidrs.append(network)
    return _Global(allow=allow, deny=deny, allow_cidrs=tuple(cidrs))


def _parse_rules(file: File, node: Node, deny: bool) -> tuple[Rule, ...]:
    what = "deny" if deny else "allow"
    rules: list[Rule] = []
    seen: dict[tuple[object, ...], int] = {}
    for item in file.sequence(node, what):
        rule = _parse_rule(file, item, deny)
        if rule is None:
            continue
        key = (rule.host, rule.cidr, rule.ports, rule.tls)
        if key in seen:
            fix = "merge their inspect: entries into one rule" if rule.inspect is not None else "remove one"
            file.error(item, f"{what} rule {rule.pattern} repeats the rule on line {seen[key]}; {fix}")
        else:
            seen[key] = item.start_mark.line + 1
            rules.append(rule)
    return tuple(rules)


def _parse_rule(file: File, node: Node, deny: bool) -> Rule | None:
    what = "a deny rule" if deny else "an allow rule"
    errors_before = len(file.errors)
    fields = file.mapping(node, what, DENY_RULE_KEYS if deny else ALLOW_RULE_KEYS, _DENY_HINTS if deny else NONE)
    if fields is None or len(file.errors) > errors_before:
        return None
    if ("host" in fields) == ("cidr" in fields):
        file.error(node, f"{what} needs exactly one of host: and cidr: (write two rules for two destinations)")
        return None
    host = file.convert(fields["host"][1], "host", lambda text: parse_pattern(text, deny)) if "host" in fields else None
    cidr_node = fields["cidr"][1] if "cidr" in fields else None
    cidr = file.convert(cidr_node, "cidr", lambda text: _network(text, "cidr", deny)) if cidr_node else None
    ports = None if deny else _parse_ports(file, fields["ports"][1]) if "ports" in fields else DEFAULT_PORTS
    tls = file.convert(fields["tls"][1], "tls", _TLS) if "tls" in fields else None
    inspect = None
    if "inspect" in fields and cidr_node is not None:
        file.error(fields["inspect"][0], CIDR_RULE)
    elif "inspect" in fields:
        inspect = parse_inspect(file, node, fields["inspect"][1])
    if len(file.errors) > errors_before:
        return None
    line, column = node.start_mark.line + 1, node.start_mark.column + 1
    return Rule(source=f"{file.path}:{line}", host=host, cidr=cidr, ports=ports, tls=tls, column=column,
                inspect=inspect)


def _parse_ports(file: File, node: Node) -> frozenset[int]:
    ports: list[int] = []
    items = file.sequence(node, "ports", "[443]")
    if isinstance(node, SequenceNode) and not items:
        file.error(node, "ports is empty; list at least one port, or remove ports: for the default [443]")
    for item in items:
        port = file.convert(item, "a port", _port)
        if port is not None and port in ports:
            file.error(item, f"port {port} is listed twice; remove one")
        elif port is not None:
            ports.append(port)
    return frozenset(ports)


# Scalar parsers: text in, value out, or ValueError with the whole message (what is wrong; what to write).


def _port(text: str) -> int:
    if not _PORT.match(text) or int(text) > 65535:
        raise ValueError(f'port "{text}" is not a decimal number 1-65535 (no leading zeros or signs)')
    return int(text)


def _choice(what: str, values: Mapping[str, _T]) -> Callable[[str], _T]:
    def parse(text: str) -> _T:
        if text not in values:
            raise ValueError(f'{what} "{text}" is not valid; write ' + " or ".join(f"{what}: {v}" for v in values))
        return values[text]

    return parse


def _service_name(text: str, stem: str) -> str:
    if not SERVICE_NAME.match(text):
        raise ValueError(
            f'service "{text}" is not a Kubernetes name (lower-case letters, digits and "-", '
            f'starting and ending with a letter or digit, at most 63 characters), e.g. "payments-api"'
        )
    if text != stem:
        raise ValueError(f'service "{text}" does not match the file name; rename the file to {text}.yaml')
    return text


def _network(text: str, what: str, any_prefix: bool = False) -> IPNetwork:
    try:
        network = parse_cidr(text)
    except ValueError as exc:
        raise ValueError(f"invalid {what}: {exc}") from None
    if network.prefixlen == 0 and not any_prefix:
        raise ValueError(f"{what} {network} would admit every address; name the network you need")
    return network


_MODE = _choice("mode", {mode.value: mode for mode in Mode})
_TLS = _choice("tls", {"true": True, "false": False})
_GLOBAL_FLAG = _choice("global", {"true": True})
