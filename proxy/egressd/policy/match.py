"""Host patterns: their grammar (:func:`parse_pattern`), their safety rule, and their index (:class:`RuleSet`).

A pattern is a name whose labels are fixed text or wildcards, always anchored on label boundaries::

    api.example.com        that name only
    *.example.com          exactly one more label:  a.example.com
    **.example.com         one or more more labels: a.example.com, a.b.example.com
    ec2.*.amazonaws.com    "*" is exactly one whole label, in any place but the last:
                           ec2.us-east-1.amazonaws.com; not ec2.amazonaws.com, not ec2.a.b.amazonaws.com

``*`` is never part of a label (``api-*.example.com``) nor the last label
(``example.*``); ``**`` is only ever the whole first label. A pattern never
matches the apex, ``example.com.evil.net`` or ``aexample.com``.

The safety rule for allow patterns (a deny only takes reach away, so it may be broad) lives in
:mod:`egressd.policy.suffixes`: a wildcard never stands for the label that makes a registrable domain.

A lookup never scans the rules: exact names sit in one dict, ``*.`` rules in a
dict keyed by the parent they hang from, ``**.`` rules in a dict keyed by
their suffix, consulted for each proper ancestor of the host. A pattern with a
``*`` further right sits in a dict keyed by its labels right of its rightmost
wildcard (``amazonaws.com`` for ``ec2.*.amazonaws.com``); for each proper
ancestor of the host, only the patterns under it are compared, label by label,
with the rest of the host. A 4-label host costs five dict lookups whatever the
number of rules (three more when mid-name patterns exist). ``cidr:`` rules are
scanned by :meth:`RuleSet.match_ip` (there are few of them in practice).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

from egressd.hostport import BadDestination, IPAddress, normalize_host
from egressd.policy import suffixes
from egressd.policy.model import Rule
from egressd.policy.suffixes import WILDCARDS

__all__ = ["RuleSet", "covers", "parse_pattern"]

ONE_LABEL = "*."
ANY_LABELS = "**."
# IDNA (UTS #46) reads these as label separators; they are mapped first so that labels are split once, here.
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})

_Index = dict[str, tuple[Rule, ...]]  # private plain dicts: faster .get than a MappingProxyType
_MidIndex = dict[str, tuple[tuple[Rule, tuple[str, ...]], ...]]  # fixed suffix -> (rule, labels left of it)


def parse_pattern(text: str, deny: bool = False) -> str:
    """Return the canonical form of a host pattern, or raise ValueError saying what is wrong and how to fix it.

    Fixed labels go through :func:`normalize_host` (IDNA, case, trailing dot), so
    ``*.Bücher.Example.`` becomes ``*.xn--bcher-kva.example``. Deny patterns skip
    the safety rule (``**.ngrok.io``): a broad deny can only take reach away.
    """
    if text in WILDCARDS:
        raise ValueError(f'host "{text}" would match every host; name a domain, e.g. "*.example.com"')
    mapped = text.translate(_IDNA_DOTS)
    labels = (mapped[:-1] if mapped.endswith(".") else mapped).split(".")
    wild = [at for at, label in enumerate(labels) if "*" in label]
    if not wild:
        name = _normalize(text, mapped)
        _refuse_ip(text, name)
        return name
    _check_grammar(text, labels, wild)
    if wild == [0]:
        prefix = labels[0] + "."
        name = _normalize(text, mapped[len(prefix) :])
        _refuse_ip(text, name)
        if not deny and suffixes.public_suffixes().is_public(name):
            raise ValueError(
                f'host "{text}": wildcard directly over public suffix "{name}" would match every site registered '
                f'under it; name a registrable domain, e.g. "{prefix}example.{name}"'
            )
        canonical = (labels[0], *name.split("."))
    else:
        probe = ".".join("a" if at in wild else label for at, label in enumerate(labels))
        fixed = _normalize(text, probe).split(".")
        pairs = enumerate(zip(labels, fixed, strict=True))  # UTS #46 maps no other character to a dot
        canonical = tuple(label if at in wild else new for at, (label, new) in pairs)
    if not deny:
        suffixes.refuse_open_label(text, canonical)
    return ".".join(canonical)


def _normalize(text: str, name: str) -> str:
    try:
        return normalize_host(name)
    except BadDestination as exc:
        raise ValueError(f"invalid host: {str(exc).replace(repr(name), repr(text))}") from None


def _check_grammar(text: str, labels: list[str], wild: list[int]) -> None:
    """Refuse a ``*`` inside a label, a wildcard as the last label, and ``**`` anywhere but first."""
    for at in wild:
        label = labels[at]
        if label not in WILDCARDS:
            fix = ".".join([*labels[:at], "*", *labels[at + 1 :]])
            raise ValueError(
                f'host "{text}": "*" stands for a whole label, never part of one ("{label}"); '
                f'write "*" for any one label there, e.g. "{fix}", or list the names'
            )
    if wild[-1] == len(labels) - 1:
        fix = ".".join([*labels[:-1], "com"])
        raise ValueError(
            f'host "{text}": the last label (the top-level domain) is never a wildcard; name it, e.g. "{fix}"'
        )
    for at in wild:
        if labels[at] == "**" and at > 0:
            fix = ".".join([*labels[:at], "*", *labels[at + 1 :]])
            raise ValueError(
                f'host "{text}": "**" is allowed only as the whole first label ("**.example.com"); '
                f'write "*" for exactly one label here, e.g. "{fix}"'
            )


def covers(wide: str, narrow: str) -> bool:
    """Whether every name the canonical pattern ``narrow`` matches is matched by ``wide`` too.

    Label by label, from the left: a fixed label covers only itself, ``*`` covers one label (fixed or ``*``),
    ``**`` covers one or more labels of any kind; ``**`` in ``narrow`` is covered only by ``**``. Used by the
    linter (redundant rules) and the review diff (widenings); matching itself never calls it.
    """
    return _covers(tuple(wide.split(".")), tuple(narrow.split(".")))


@functools.cache
def _covers(wide: tuple[str, ...], narrow: tuple[str, ...]) -> bool:
    if not wide or not narrow:
        return not wide and not narrow
    head, rest = wide[0], wide[1:]
    if head == "**":
        # one or more of narrow's labels: try every split, shortest first
        return any(_covers(rest, narrow[n:]) for n in range(1, len(narrow) + 1))
    if narrow[0] == "**":
        return False
    if head == "*" or head == narrow[0]:
        return _covers(rest, narrow[1:])
    return False


def _refuse_ip(text: str, name: str) -> None:
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return
    raise ValueError(
        f'host "{text}" is an IP address, and IP destinations never match host rules; '
        f"write cidr: {ip}/{ip.max_prefixlen}"
    )


class RuleSet:
    """An immutable index over rules; lookups return matching rules in file order.

    ``match_host`` takes a canonical host name (from :mod:`egressd.hostport`)
    and looks only at host rules; ``match_ip`` takes an address and looks only
    at cidr rules. ``inspected`` says whether any rule has ``inspect:`` (decide
    looks for more matching rules only then).
    """

    __slots__ = ("rules", "inspected", "_exact", "_one", "_any", "_mid", "_cidrs", "_position")

    rules: tuple[Rule, ...]
    inspected: bool
    _exact: _Index
    _one: _Index
    _any: _Index
    _mid: _MidIndex
    _cidrs: tuple[Rule, ...]
    _position: Mapping[int, int]

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        rules = tuple(rules)
        exact: dict[str, list[Rule]] = {}
        one: dict[str, list[Rule]] = {}
        any_: dict[str, list[Rule]] = {}
        mid: dict[str, list[tuple[Rule, tuple[str, ...]]]] = {}
        for rule in rules:
            host = rule.host
            if host is None:
                continue
            labels = host.split(".")
            last = max((at for at, label in enumerate(labels) if label in WILDCARDS), default=-1)
            if last > 0:  # a "*" right of the first label: under the fixed labels right of the rightmost one
                mid.setdefault(".".join(labels[last + 1 :]), []).append((rule, tuple(labels[: last + 1])))
            elif host.startswith(ANY_LABELS):
                any_.setdefault(host[len(ANY_LABELS) :], []).append(rule)
            elif host.startswith(ONE_LABEL):
                one.setdefault(host[len(ONE_LABEL) :], []).append(rule)
            else:
                exact.setdefault(host, []).append(rule)
        setattr_ = object.__setattr__
        setattr_(self, "rules", rules)
        setattr_(self, "inspected", any(rule.inspect is not None for rule in rules))
        setattr_(self, "_exact", _tuples(exact))
        setattr_(self, "_one", _tuples(one))
        setattr_(self, "_any", _tuples(any_))
        setattr_(self, "_mid", {suffix: tuple(entries) for suffix, entries in mid.items()})
        setattr_(self, "_cidrs", tuple(rule for rule in rules if rule.cidr is not None))
        # Sorting key for hits from several dicts; ids stay valid because self.rules holds the rules.
        setattr_(self, "_position", MappingProxyType({id(rule): index for index, rule in enumerate(rules)}))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def match_host(self, host: str) -> tuple[Rule, ...]:
        """Host rules matching the canonical name ``host``, in file order."""
        hits = self._exact.get(host, ())
        dot = host.find(".")
        if dot >= 0:
            hits += self._one.get(host[dot + 1 :], ())
            if self._any:
                while dot >= 0:
                    hits += self._any.get(host[dot + 1 :], ())
                    dot = host.find(".", dot + 1)
            if self._mid:
                hits += self._match_mid(host)
        if len(hits) > 1:
            hits = tuple(sorted(hits, key=lambda rule: self._position[id(rule)]))
        return hits

    def _match_mid(self, host: str) -> tuple[Rule, ...]:
        """Rules with a mid-name "*" under each proper ancestor of ``host``, compared with the labels left of it."""
        hits: tuple[Rule, ...] = ()
        dot = host.find(".")
        while dot >= 0:
            entries = self._mid.get(host[dot + 1 :])
            if entries:
                labels = host[:dot].split(".")
                for rule, pattern in entries:
                    if _labels_match(pattern, labels):
                        hits += (rule,)
            dot = host.find(".", dot + 1)
        return hits

    def match_ip(self, ip: IPAddress) -> tuple[Rule, ...]:
        """Cidr rules whose network contains ``ip``, in file order (an IPv4 rule never matches an IPv6 address)."""
        return tuple(rule for rule in self._cidrs if ip in rule.cidr)  # type: ignore[operator]

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuleSet) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({', '.join(rule.pattern for rule in self.rules)})"


def _labels_match(pattern: tuple[str, ...], labels: list[str]) -> bool:
    """Whether ``labels`` match ``pattern`` one by one ("*" any one label; a leading "**" one or more)."""
    if pattern[0] == "**":
        pattern = pattern[1:]
        if len(labels) <= len(pattern):
            return False
        labels = labels[len(labels) - len(pattern) :]
    elif len(labels) != len(pattern):
        return False
    for want, label in zip(pattern, labels, strict=True):
        if want != label and want != "*":
            return False
    return True


def _tuples(index: dict[str, list[Rule]]) -> _Index:
    return {key: tuple(value) for key, value in index.items()}
