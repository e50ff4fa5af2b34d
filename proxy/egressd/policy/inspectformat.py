"""The ``inspect:`` key of an allow host rule (format v1): YAML nodes in, an :class:`~egressd.inspect.rules.Inspect`.

::

  - host: api.github.com
    inspect:                               # a non-empty list of entries
      - methods: [GET]                     # upper-case HTTP methods, each once
        paths: ["/repos/acme/**", "/orgs/acme"]   # anchored globs over the decoded, normalised path

The grammar of one method and one path is :func:`egressd.inspect.rules.parse_method` and
:func:`~egressd.inspect.rules.parse_path`; this module walks the nodes, reports every error with its file:line
(through :class:`egressd.policy.nodes.File`), and asks :func:`egressd.inspect.rules.inspect_unavailable` whether
inspection can run here at all (Python 3.12+ and mitmproxy, which is never imported here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from yaml.nodes import Node, SequenceNode

from egressd.inspect import rules  # as a module: rules imports egressd.policy, which imports this through the loader
from egressd.policy.nodes import File

__all__ = ["ENTRY_KEYS", "parse_inspect"]

ENTRY_KEYS = ("methods", "paths")
EXAMPLE = '[{methods: [GET], paths: ["/repos/acme/**"]}]'
CIDR_RULE = ("inspect: needs a host: rule (an inspected connection is bound to a name); a cidr: rule is never "
             "inspected: remove inspect:, or write the rule with host:")
_T = TypeVar("_T")
DENY_RULE = "deny rules refuse the whole name and are never inspected; remove inspect:, or move the rule to allow:"


def parse_inspect(file: File, rule: Node, node: Node) -> rules.Inspect | None:
    """The ``inspect:`` value ``node`` of the allow rule ``rule``, or None after recording every error."""
    errors_before = len(file.errors)
    items = file.sequence(node, "inspect", EXAMPLE)
    if isinstance(node, SequenceNode) and not items:
        file.error(node, "inspect is empty, which would allow no request; list the requests the service may make, "
                         "or remove inspect: to allow the whole name uninspected")
    entries = [entry for entry in (_entry(file, item) for item in items) if entry is not None]
    unavailable = rules.inspect_unavailable()
    if unavailable is not None:
        file.error(rule, unavailable)
    if len(file.errors) > errors_before or not entries:
        return None
    return rules.Inspect(tuple(entries))


def _entry(file: File, node: Node) -> rules.InspectEntry | None:
    errors_before = len(file.errors)
    fields = file.mapping(node, "an inspect entry", ENTRY_KEYS)
    if fields is None:
        return None
    missing = [key for key in ENTRY_KEYS if key not in fields]
    if missing and len(file.errors) == errors_before:
        file.error(node, f"an inspect entry needs {' and '.join(f'{key}:' for key in missing)}; write e.g. "
                         f"{EXAMPLE[1:-1]}")
    methods = _list(file, fields["methods"][1], "methods", "[GET]", rules.parse_method) if "methods" in fields else ()
    paths = (_list(file, fields["paths"][1], "paths", '["/repos/acme/**"]', rules.parse_path)
             if "paths" in fields else ())
    if len(file.errors) > errors_before or not methods or not paths:
        return None
    mark = node.start_mark
    return rules.InspectEntry(
        methods=frozenset(text for text, _ in methods), paths=tuple(text for text, _ in paths),
        compiled=tuple(value for _, value in paths), source=f"{file.path}:{mark.line + 1}", column=mark.column + 1,
    )


def _list(file: File, node: Node, what: str, example: str, parse: Callable[[str], _T]) -> list[tuple[str, _T]]:
    """The scalars of the list ``node``, each as (text, parsed value); empty lists and repeats are errors."""
    items = file.sequence(node, what, example)
    if isinstance(node, SequenceNode) and not items:
        file.error(node, f"{what} is empty; list at least one, e.g. {what}: {example}")
    found: list[tuple[str, _T]] = []
    for item in items:
        text = file.scalar(item, f"an entry of {what}")
        if text is None:
            continue
        if any(text == seen for seen, _ in found):
            file.error(item, f'{what[:-1]} "{text}" is listed twice in this entry; remove one')
            continue
        try:
            found.append((text, parse(text)))
        except ValueError as exc:
            file.error(item, str(exc))
    return found
