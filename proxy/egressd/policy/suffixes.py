"""The Public Suffix List, and the safety rule host patterns must meet against it.

The safety rule, for allow patterns of :func:`egressd.policy.match.parse_pattern` (a deny only takes
reach away, so it may be broad): take any name the pattern can match and its public suffix by the
Public Suffix List, both sections (ICANN ``co.jp``, private ``github.io``,
``s3.amazonaws.com``; an unknown top-level label is a suffix by the list's
default rule). The label just left of that suffix, the one that makes the
registrable domain, must be fixed text in the pattern, never ``*`` or ``**``:
otherwise the pattern matches names that anyone can register. A name that is
itself a public suffix has no such label; then its first label must be fixed,
since a wildcard standing for a whole suffix (``*.nom.br``, ``*.amazonaws.com``
over ``s3.amazonaws.com``) stands for every registry under it::

    ec2.*.amazonaws.com    loads: whatever fills "*", the deciding label is "ec2"
                           (ec2.us-east-1.amazonaws.com under us-east-1.amazonaws.com;
                           ec2.compute.amazonaws.com, itself a suffix by the rule
                           *.compute.amazonaws.com) or "amazonaws" (ec2.x.amazonaws.com under com)
    *.s3.*.amazonaws.com   refused: in b.s3.us-east-1.amazonaws.com the first "*" is registrable
    api.*.com, *.com       refused: the "*" is registrable under "com"
    api.*.kawasaki.jp      refused: the rule *.kawasaki.jp makes "api" registrable in
                           api.x.kawasaki.jp, but its exception !city.kawasaki.jp makes
                           "city" registrable in api.city.kawasaki.jp
    **.amazonaws.com       refused: "**" covers "b", registrable in b.s3.amazonaws.com

The check covers every filling in finitely many steps. The list decides a
suffix from a name's rightmost labels only, by comparing them with the labels
its rules spell. So each ``*`` is tried, right to left, as every label that
some rule has in that place below the labels chosen so far, and as one label
that none has (all such labels decide alike); once the chosen labels are no
rule's tail, no label further left can change the suffix. ``**`` is tried as
1, 2, ... ``*`` labels until the name is two labels longer than the list's
longest rule, after which more labels change nothing. Each name so built goes
to the list itself (publicsuffixlist), so its wildcard rules (``*.ck``) and
exceptions (``!www.ck``) count exactly as the list applies them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

WILDCARDS = ("*", "**")


@functools.cache
def public_suffixes() -> PublicSuffixList:
    """The bundled Public Suffix List (ICANN and private sections), built once on first use (~70 ms)."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


@functools.cache
def suffix_labels() -> tuple[dict[str, frozenset[str]], int]:
    """For each tail of a rule of the list, the labels its rules spell just left of it; and the longest rule.

    Read from the very rule set that :func:`public_suffixes` decides with (wildcard ``*.`` and exception
    ``!`` rules by their names; IDN rules in their punycode form, the form canonical names have).
    """
    left: dict[str, set[str]] = {}
    longest = 0
    for rule in public_suffixes()._publicsuffix:
        longest = max(longest, rule.count(".") + 1)
        labels = rule.removeprefix("!").removeprefix("*.").split(".")
        if rule.isascii():
            for at, label in enumerate(labels):
                left.setdefault(".".join(labels[at + 1 :]), set()).add(label)
    return {tail: frozenset(labels) for tail, labels in left.items()}, longest


def forget_public_suffixes() -> None:
    """Drop the list (~1.3 MiB) and what was read from it until the next load needs them again."""
    public_suffixes.cache_clear()
    suffix_labels.cache_clear()


def refuse_open_label(text: str, labels: tuple[str, ...]) -> None:
    """Apply the safety rule (module docstring) to the canonical labels of a wildcard pattern."""
    left, longest = suffix_labels()
    if labels[0] == "**":
        rest = labels[1:]
        shapes = [(("*",) * many + rest, many) for many in range(1, max(1, longest + 2 - len(rest)) + 1)]
    else:
        shapes = [(labels, 1)]
    for shape, many in shapes:
        found = _open_filling(shape, len(shape), (), left)
        if found is None:
            continue
        at, name, suffix = found
        place = max(at - many + 1, 0)  # the place in the pattern: the first "many" labels of shape stand for "**"
        fix = [*labels[:place], "example", *labels[place + 1 :]] if place else [labels[0], "example", *labels[1:]]
        if suffix == name:
            why = f'the first label of "{name}", itself a public suffix (anyone can register names under it)'
        else:
            why = f'the registrable label of "{name}" (anyone can register names under "{suffix}")'
        raise ValueError(
            f'host "{text}": the "{labels[place]}" in label {place + 1} can be {why}; '
            f'write that label out, e.g. "{".".join(fix)}"'
        )


def _open_filling(
    shape: tuple[str, ...], end: int, chosen: tuple[str, ...], left: Mapping[str, frozenset[str]]
) -> tuple[int, str, str] | None:
    """The first name ``shape`` matches whose deciding label is a wildcard: (its place, the name, its suffix).

    ``shape[end:]`` is filled in already, as ``chosen``; labels are filled from the right.
    """
    if end == 0:
        name = ".".join(chosen)
        suffix = public_suffixes().publicsuffix(name)
        at = max(len(chosen) - suffix.count(".") - 2, 0)
        return (at, name, suffix) if shape[at] in WILDCARDS else None
    label = shape[end - 1]
    if label not in WILDCARDS:
        return _open_filling(shape, end - 1, (label, *chosen), left)
    known = left.get(".".join(chosen), frozenset())
    unknown = next(fill for fill in ("x", *(f"x{n}" for n in range(len(known)))) if fill not in known)
    for fill in (unknown, *sorted(known)):
        found = _open_filling(shape, end - 1, (fill, *chosen), left)
        if found is not None:
            return found
    return None
