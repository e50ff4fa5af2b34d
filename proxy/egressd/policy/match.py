"""Host patterns: their grammar (:func:`parse_pattern`) and their index (:class:`RuleSet`).

A pattern is one of three forms, always anchored on label boundaries::

    api.example.com      that name only
    *.example.com        exactly one more label:  a.example.com
    **.example.com       one or more more labels: a.example.com, a.b.example.com

Never the apex, never ``example.com.evil.net``, never ``aexample.com``. The
wildcard is the whole first label or absent; a wildcard directly over a public
suffix (``*.com``, ``**.co.jp``, ``*.github.io``) is refused, because anyone
can register a name under it. Both sections of the Public Suffix List count:
the ICANN one (``co.jp``) and the private one (``github.io``,
``s3.amazonaws.com``), and a top-level label the list does not know
(``*.internal``) counts as a public suffix by the list's default rule.

A lookup never scans the rules: exact names sit in one dict, ``*.`` rules in a
dict keyed by the parent they hang from, ``**.`` rules in a dict keyed by
their suffix, consulted for each proper ancestor of the host. A 4-label host
costs five dict lookups whatever the number of rules. ``cidr:`` rules are
scanned by :meth:`RuleSet.match_ip` (there are few of them in practice).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from egressd.hostport import BadDestination, IPAddress, normalize_host
from egressd.policy.model import Rule

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

__all__ = ["RuleSet", "covers", "parse_pattern"]

ONE_LABEL = "*."
ANY_LABELS = "**."

_Index = dict[str, tuple[Rule, ...]]  # private plain dicts: faster .get than a MappingProxyType


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The bundled Public Suffix List (ICANN and private sections), built once on first use (~70 ms)."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def forget_public_suffixes() -> None:
    """Drop the list (~1.3 MiB) until the next load needs it again."""
    _public_suffixes.cache_clear()


def parse_pattern(text: str, deny: bool = False) -> str:
    """Return the canonical form of a host pattern, or raise ValueError saying what is wrong and how to fix it.

    Deny patterns may be wildcards over a public suffix (``**.ngrok.io``): a
    broad deny can only take reach away.

    The part after ``*.``/``**.`` goes through :func:`normalize_host` (IDNA,
    case, trailing dot), so ``*.Bücher.Example.`` becomes ``*.xn--bcher-kva.example``.
    """
    if text in ("*", "**"):
        raise ValueError(f'host "{text}" would match every host; name a domain, e.g. "*.example.com"')
    prefix = ANY_LABELS if text.startswith(ANY_LABELS) else ONE_LABEL if text.startswith(ONE_LABEL) else ""
    rest = text[len(prefix) :]
    if "*" in rest:
        raise ValueError(
            f'host "{text}": "*" is allowed only as the whole first label; '
            f'write "*.example.com" (one more label) or "**.example.com" (one or more)'
        )
    try:
        name = normalize_host(rest)
    except BadDestination as exc:
        raise ValueError(f"invalid host: {exc}") from None
    _refuse_ip(text, name)
    if prefix and not deny and _public_suffixes().is_public(name):
        raise ValueError(
            f'host "{text}": wildcard directly over public suffix "{name}" would match every site registered '
            f'under it; name a registrable domain, e.g. "{prefix}example.{name}"'
        )
    return prefix + name


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
    at cidr rules.
    """

    __slots__ = ("rules", "_exact", "_one", "_any", "_cidrs", "_position")

    rules: tuple[Rule, ...]
    _exact: _Index
    _one: _Index
    _any: _Index
    _cidrs: tuple[Rule, ...]
    _position: Mapping[int, int]

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        rules = tuple(rules)
        exact: dict[str, list[Rule]] = {}
        one: dict[str, list[Rule]] = {}
        any_: dict[str, list[Rule]] = {}
        for rule in rules:
            if rule.host is None:
                continue
            if rule.host.startswith(ANY_LABELS):
                any_.setdefault(rule.host[len(ANY_LABELS) :], []).append(rule)
            elif rule.host.startswith(ONE_LABEL):
                one.setdefault(rule.host[len(ONE_LABEL) :], []).append(rule)
            else:
                exact.setdefault(rule.host, []).append(rule)
        setattr_ = object.__setattr__
        setattr_(self, "rules", rules)
        setattr_(self, "_exact", _tuples(exact))
        setattr_(self, "_one", _tuples(one))
        setattr_(self, "_any", _tuples(any_))
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
        if len(hits) > 1:
            hits = tuple(sorted(hits, key=lambda rule: self._position[id(rule)]))
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


def _tuples(index: dict[str, list[Rule]]) -> _Index:
    return {key: tuple(value) for key, value in index.items()}
