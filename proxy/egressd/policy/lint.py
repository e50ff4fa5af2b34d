"""Warnings about legal but risky allowlist rules: a loaded Policy in, a sorted list of :class:`LintWarning` out.

The loader refuses what is wrong; this module points a reviewer at what loads
but deserves a second look. Each warning has a fixed code, the file, line and
column of the rule, and a message naming the rule and what to do:

- ``any-labels-wildcard``: a ``**`` label, names at any depth.
- ``unusual-port``: a port other than 80 and 443.
- ``redundant-rule``: another rule of the same file already allows (or, among
  ``_global.yaml``'s deny rules, denies) every destination and port this one does.
- ``denied-by-global``: a global deny blocks every destination the rule matches (the rule is dead).
- ``partly-denied-by-global``: the rule also matches destinations a global deny blocks.
- ``wide-cidr``: a ``cidr:`` wider than /24 (IPv4) or /48 (IPv6).
- ``shared-hosting-suffix``: the name lies under a suffix of the Public Suffix
  List's private section (``herokuapp.com``, ``github.io``, ``ngrok.io``), where
  anyone can get a name.
- ``inspect-any-path``: an ``inspect:`` entry lists ``/**``, every path: it checks the method only.
- ``inspected-by-other``: a host rule without ``inspect:`` shares names and ports with a rule of the same
  file or of ``_global.yaml``'s allow that has one; on those names only the inspected rule's requests pass.

(The two ``inspect`` codes are in ``INSPECT_CODES``, the others in ``CODES``.)

Every check applies to the allow rules of service files and of ``_global.yaml``
alike; the deny rules of ``_global.yaml`` are checked only for redundancy among
themselves: a deny that is wide, a wildcard or under a shared-hosting suffix
only takes reach away. ``allow_cidrs`` re-admits addresses and allows no
destination, so it is not checked.

Redundancy: a rule is redundant when another rule of the same file covers its
names (:func:`egressd.policy.match.covers`, or a containing network for
``cidr:``) and its ports, and either comes first (then :func:`decide` never
reaches the later rule) or asks for the same TLS binding on those ports. Of two
rules that cover each other only the later one is reported. A rule with
``inspect:`` is never redundant to a rule with other entries or none: it
inspects the names it shares with them.

Nothing here matches names against rules: patterns are compared with ``covers``.
The Public Suffix List is the one bundled with ``publicsuffixlist``; a suffix is
from its private section when the whole list gives a name a longer public suffix
than the ICANN section alone does (``PublicSuffixList(only_icann=True)``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from egressd.inspect.rules import ANY
from egressd.policy import suffixes
from egressd.policy.match import covers
from egressd.policy.model import Policy, Rule
from egressd.policy.suffixes import WILDCARDS

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

__all__ = ["CODES", "INSPECT_CODES", "LintWarning", "lint", "private_suffixes"]

ANY_LABELS = "any-labels-wildcard"
UNUSUAL_PORT = "unusual-port"
REDUNDANT = "redundant-rule"
DENIED = "denied-by-global"
PARTLY_DENIED = "partly-denied-by-global"
WIDE_CIDR = "wide-cidr"
SHARED_SUFFIX = "shared-hosting-suffix"
CODES = (ANY_LABELS, UNUSUAL_PORT, REDUNDANT, DENIED, PARTLY_DENIED, WIDE_CIDR, SHARED_SUFFIX)
INSPECT_ANY_PATH = "inspect-any-path"
INSPECTED_BY_OTHER = "inspected-by-other"
INSPECT_CODES = (INSPECT_ANY_PATH, INSPECTED_BY_OTHER)

USUAL_PORTS = frozenset({80, 443})
WIDEST_PREFIX = {4: 24, 6: 48}
# Stands for a wildcard label when asking the Public Suffix List: no rule of the list names it, and it is no
# canonical label (a DNS label never starts with "-"), so it cannot be confused with a pattern's own label.
_PLACEHOLDER = "-"


@dataclass(frozen=True, slots=True)
class LintWarning:
    """One warning: where the rule is (``column`` 1-based, None when unknown), a fixed code, and the message."""

    file: str
    line: int
    column: int | None
    code: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.column is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.message}"


def lint(policy: Policy) -> list[LintWarning]:
    """Every warning about ``policy``'s rules, sorted by file, line, column and code."""
    deny = policy.global_deny.rules
    files = [service.allow.rules for service in policy.services.values()] + [policy.global_allow.rules]
    warnings: list[LintWarning] = []
    for rules in files:
        warnings += _redundant(rules, "allows every {} and port")
        for rule in rules:
            warnings += _risky(rule)
            warnings += _denied(rule, deny)
            warnings += _inspection(rule, rules + policy.global_allow.rules)
    warnings += _redundant(deny, "denies every {}")
    return sorted(warnings, key=lambda w: (w.file, w.line, w.column or 0, w.code))


def _warning(rule: Rule, code: str, message: str) -> LintWarning:
    file, _, line = rule.source.rpartition(":")
    return LintWarning(file, int(line), rule.column, code, message)


def _name(rule: Rule) -> str:
    return f'host "{rule.host}"' if rule.host is not None else f"cidr {rule.cidr}"


def _inspection(rule: Rule, others: tuple[Rule, ...]) -> Iterator[LintWarning]:
    """An entry that allows every path; a rule without ``inspect:`` whose names another rule inspects."""
    if rule.inspect is not None:
        for entry in rule.inspect.entries:
            if (ANY,) in entry.compiled:
                file, _, line = entry.source.rpartition(":")
                yield LintWarning(
                    file, int(line), entry.column, INSPECT_ANY_PATH,
                    f'the inspect: entry for {", ".join(sorted(entry.methods))} on host "{rule.host}" allows every '
                    'path ("/**"), so it checks the method only; list the paths the service needs',
                )
        return
    if rule.host is None:
        return
    for other in others:
        if other.inspect is None or other.host is None or not _share_ports(rule, other):
            continue
        if covers(rule.host, other.host) or covers(other.host, rule.host):
            yield _warning(
                rule, INSPECTED_BY_OTHER,
                f'{_name(rule)} has no inspect:, but {_name(other)} ({other.source}) inspects the names they share: '
                "there only its requests pass; add the same inspect: here, or narrow one of the rules",
            )


def _share_ports(one: Rule, other: Rule) -> bool:
    return one.ports is None or other.ports is None or bool(one.ports & other.ports)


def _risky(rule: Rule) -> Iterator[LintWarning]:
    """The warnings about one allow rule on its own: wildcard depth, ports, width, shared-hosting suffix."""
    if rule.host is not None and "**" in rule.host.split("."):
        one = rule.host.replace("**", "*")
        yield _warning(
            rule, ANY_LABELS,
            f'host "{rule.host}" matches names at any depth ("**" is one or more labels); write "{one}" if one '
            "label is enough, or list the exact names",
        )
    unusual = [str(port) for port in sorted((rule.ports or frozenset()) - USUAL_PORTS)]
    if unusual:
        listed = f"ports {', '.join(unusual[:-1])} and {unusual[-1]}" if len(unusual) > 1 else f"port {unusual[0]}"
        them = "them" if len(unusual) > 1 else "it"
        yield _warning(
            rule, UNUSUAL_PORT,
            f"{_name(rule)} allows {listed}, not the usual 80 or 443; check that the destination needs {them}, "
            f"or remove {them}",
        )
    if rule.cidr is not None and rule.cidr.prefixlen < WIDEST_PREFIX[rule.cidr.version]:
        limit = WIDEST_PREFIX[rule.cidr.version]
        count = f" ({rule.cidr.num_addresses} addresses)" if rule.cidr.version == 4 else ""
        yield _warning(
            rule, WIDE_CIDR,
            f"cidr {rule.cidr} is wider than /{limit}{count}; allow only the networks the service needs, "
            f"each /{limit} or narrower",
        )
    if rule.host is not None:
        suffixes = private_suffixes(rule.host)
        if suffixes:
            yield _warning(rule, SHARED_SUFFIX, _shared_message(rule.host, suffixes))


def _shared_message(host: str, suffixes: tuple[str, ...]) -> str:
    why = "private section of the Public Suffix List (shared hosting or tunnelling: anyone can get a name under it)"
    fix = "check that the name belongs to whom you mean to reach"
    if len(suffixes) == 1:
        return f'host "{host}" is under "{suffixes[0]}", a suffix from the {why}; {fix}'
    return (
        f'host "{host}" can fall under {len(suffixes)} suffixes from the {why}, e.g. "{suffixes[0]}"; '
        f"{fix} for every value of the wildcard"
    )


def _denied(rule: Rule, deny: Iterable[Rule]) -> Iterator[LintWarning]:
    """A global deny that blocks all of the allow rule (it is dead), or part of it (reported once per deny)."""
    for denial in deny:
        if _contains(denial, rule):
            yield _warning(
                rule, DENIED,
                f"{_name(rule)} never allows anything: the global deny {_name(denial)} ({denial.source}) blocks "
                "every destination it matches; remove the rule, or the deny if that is what is wrong",
            )
            return
    for denial in deny:
        if _contains(rule, denial):
            yield _warning(
                rule, PARTLY_DENIED,
                f"{_name(rule)} also matches {_name(denial)}, which the global deny ({denial.source}) blocks; "
                "those destinations stay denied: narrow the rule if it was meant to reach them",
            )


def _redundant(rules: tuple[Rule, ...], what: str) -> Iterator[LintWarning]:
    """Each rule another rule of the same file makes redundant, naming the first such rule."""
    for later, rule in enumerate(rules):
        for earlier, other in enumerate(rules):
            if earlier == later or not _covered(other, rule):
                continue
            if rule.inspect is not None and rule.inspect != other.inspect:
                continue  # it inspects names the other opens blind, or adds entries to the other's
            mutual = _covered(rule, other)
            if earlier < later or (not mutual and _same_tls(other, rule)):
                line = other.source.rpartition(":")[2]
                already = what.format("name" if rule.host is not None else "address")
                yield _warning(
                    rule, REDUNDANT,
                    f"{_name(rule)} is redundant: the rule on line {line} ({_name(other)}) already {already} "
                    "it does; remove it",
                )
                break


def _covered(wide: Rule, narrow: Rule) -> bool:
    """Whether ``wide`` matches every destination and port ``narrow`` does (ports None: every port)."""
    if not _contains(wide, narrow):
        return False
    return wide.ports is None or (narrow.ports is not None and narrow.ports <= wide.ports)


def _contains(wide: Rule, narrow: Rule) -> bool:
    """Whether ``wide``'s pattern or network matches every name or address ``narrow``'s does."""
    if wide.host is not None and narrow.host is not None:
        return covers(wide.host, narrow.host)
    if wide.cidr is not None and narrow.cidr is not None and wide.cidr.version == narrow.cidr.version:
        return narrow.cidr.subnet_of(wide.cidr)  # type: ignore[arg-type]
    return False


def _same_tls(one: Rule, other: Rule) -> bool:
    return all(one.requires_tls(port) == other.requires_tls(port) for port in other.ports or ())


def private_suffixes(pattern: str) -> tuple[str, ...]:
    """The suffixes of the Public Suffix List's private section that names matching ``pattern`` lie under.

    A wildcard label left of the suffix is any label; a wildcard label that can make part of a suffix
    (``ec2.*.amazonaws.com``: ``us-east-1.amazonaws.com``) is tried with every label the private section
    has in that place. A pattern that is itself a suffix (``github.io`` as an exact name) lies under none.
    Wildcard labels inside a returned suffix are shown as ``*``; the shortest suffixes come first.
    """
    full, icann = suffixes.public_suffixes(), _icann()
    labels = pattern.split(".")
    choices = [_fills(labels, index) if label in WILDCARDS else (label,) for index, label in enumerate(labels)]
    found: set[str] = set()
    for name in itertools.product(*choices):
        suffix = full.publicsuffix(".".join(name))
        if suffix is None or suffix == icann.publicsuffix(".".join(name)):
            continue
        depth = suffix.count(".") + 1
        if depth < len(name):
            found.add(".".join("*" if label == _PLACEHOLDER else label for label in name[-depth:]))
    return tuple(sorted(found, key=lambda suffix: (len(suffix), suffix)))


def _fills(labels: list[str], index: int) -> tuple[str, ...]:
    """The labels worth trying for the wildcard at ``index``: any label, and each the private section has there."""
    if index == 0:
        return (_PLACEHOLDER,)
    right = labels[index + 1 :]
    if not right:
        return (_PLACEHOLDER,)
    fills = {_PLACEHOLDER}
    for rule in _private_rules().get(right[-1], ()):
        if len(rule) > len(right) and _fits(rule[-len(right) :], right) and rule[-len(right) - 1] not in WILDCARDS:
            fills.add(rule[-len(right) - 1])
    return tuple(sorted(fills))


def _fits(rule: tuple[str, ...], labels: list[str]) -> bool:
    return all(a == b or a in WILDCARDS or b in WILDCARDS for a, b in zip(rule, labels, strict=True))


@functools.cache
def _icann() -> PublicSuffixList:
    """The bundled list's ICANN section alone: a suffix only the whole list (the loader's) has is private."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList(only_icann=True)


@functools.cache
def _private_rules() -> dict[str, tuple[tuple[str, ...], ...]]:
    """The rules of the bundled list's private section, as labels in punycode, keyed by their last label."""
    import publicsuffixlist

    rules: dict[str, list[tuple[str, ...]]] = {}
    inside = False
    with open(publicsuffixlist.PSLFILE, encoding="utf-8") as lines:
        for line in lines:
            text = line.strip()
            if text in ("// ===BEGIN PRIVATE DOMAINS===", "// ===END PRIVATE DOMAINS==="):
                inside = text.startswith("// ===BEGIN")
            elif inside and text and not text.startswith("//"):
                name = text.split()[0].lower().lstrip("!")
                try:
                    labels = tuple(part if part == "*" else part.encode("idna").decode() for part in name.split("."))
                except UnicodeError:  # a rule Python's IDNA codec cannot spell: only fewer labels to try
                    continue
                rules.setdefault(labels[-1], []).append(labels)
    return {key: tuple(value) for key, value in rules.items()}
