"""Reading YAML as nodes, so that every value and every error keeps its file and line.

:class:`File` wraps one allowlist file being read: node readers (scalar,
sequence, mapping with duplicate and unknown key checks, convert) that record
a :class:`LoadError` instead of raising, so a load reports every problem at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

VERSION = "v1"
MAX_DEPTH = 32  # an allowlist nests five levels deep; the composer recurses once per level, so bound it
Fields = dict[str, tuple[Node, Node]]
NONE: Mapping[str, str] = MappingProxyType({})
_T = TypeVar("_T")
_NULL_TAG = "tag:yaml.org,2002:null"

_YAML_HINTS = {
    "aliases are not allowed": " (write the value out in full where it applies)",
    "alias": ' (a value starting with "*" must be quoted: host: "*.example.com")',
    "single document": " (one document per file: remove the second '---')",
    "nested more than": " (an allowlist file nests five levels at most)",
}


@dataclass(frozen=True, slots=True)
class LoadError:
    """One problem in the allowlists: where (``line`` is None for a whole file or directory) and what to do.

    ``column`` (1-based, None when unknown) is for tools that point into the file (``egressd validate``); it
    takes no part in equality, and ``str()`` prints ``file:line: message`` without it.
    """

    file: str
    line: int | None
    message: str
    column: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


def yaml_files(directory: Path, what: str, fix: str, ignored: frozenset[str] = frozenset()) -> tuple[
        list[Path], list[LoadError]]:
    """The ``*.yaml`` files of ``directory``, sorted (dotfiles, subdirectories and ``ignored`` names skipped), and an
    error for each ``.yml`` file, or for a directory that cannot be read (``what`` names it, ``fix`` says what to do).
    """
    try:
        entries = sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    except OSError as exc:
        return [], [LoadError(str(directory), None, f"cannot read the {what} ({exc.strerror}); {fix}")]
    paths: list[Path] = []
    errors: list[LoadError] = []
    for entry in entries:
        if entry.is_dir() or entry.name in ignored:
            continue
        if entry.name.endswith(".yml"):
            errors.append(LoadError(str(entry), None, f".yml files are not read; rename it to {entry.stem}.yaml"))
        elif entry.name.endswith(".yaml"):
            paths.append(entry)
    return paths, errors


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing aliases (a reviewer must see every value where it applies) and values nested more
    than MAX_DEPTH deep (each level is a recursive call: thousands of ``[`` would raise RecursionError)."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "found an alias, and aliases are not allowed", mark)
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, f"found values nested more than {MAX_DEPTH} deep", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class File:
    """One file being read: its path as printed, the errors found so far, and node readers that report them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[LoadError] = []

    def error(self, node: Node | None, message: str) -> None:
        if node is None:
            self.errors.append(LoadError(self.path, 1, message))
        else:
            mark = node.start_mark
            self.errors.append(LoadError(self.path, mark.line + 1, message, mark.column + 1))

    def scalar(self, node: Node, what: str) -> str | None:
        """The text of a scalar; a plain ``null``/``Null``/``NULL`` is no value, as every other YAML reader (and a
        reviewer) takes it, not the text "null"."""
        if not isinstance(node, ScalarNode):
            self.error(node, f"{what} must be a single value, not a list or mapping")
        elif not node.value:
            self.error(node, f"{what} is empty; give it a value")
        elif node.tag == _NULL_TAG and node.style is None:
            self.error(node, f"{what} is {node.value}, which YAML reads as no value; give it a value "
                             f'(quote it, "{node.value}", if you mean that text)')
        else:
            return str(node.value)
        return None

    def convert(self, node: Node, what: str, parse: Callable[[str], _T]) -> _T | None:
        """The scalar at ``node`` parsed by ``parse``, whose ValueError message becomes the error."""
        text = self.scalar(node, what)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as exc:
            self.error(node, str(exc))
            return None

    def sequence(self, node: Node, what: str, example: str = "[] for none") -> list[Node]:
        if isinstance(node, SequenceNode):
            return list(node.value)
        self.error(node, f"{what} must be a list; write {what}: {example}")
        return []

    def mapping(
        self, node: Node, what: str, allowed: tuple[str, ...], hints: Mapping[str, str] = NONE
    ) -> Fields | None:
        """The keys of a mapping node, each with its key and value node; duplicates and unknown keys are errors."""
        if not isinstance(node, MappingNode):
            self.error(node, f"{what} must be a mapping with keys from: {', '.join(allowed)}")
            return None
        fields: Fields = {}
        for key_node, value_node in node.value:
            key: str = key_node.value if isinstance(key_node, ScalarNode) else ""
            if key in fields:
                first = fields[key][0].start_mark.line + 1
                self.error(key_node, f'duplicate key "{key}" (first on line {first}); keep one of them')
            elif key in hints:
                self.error(key_node, hints[key])
            elif key not in allowed:
                shown = f'key "{key}"' if isinstance(key_node, ScalarNode) else "a non-text key"
                self.error(key_node, f"unknown {shown} in {what}; allowed keys are: {', '.join(allowed)}")
            else:
                fields[key] = (key_node, value_node)
        return fields


def compose(file: File, data: bytes) -> Node | None:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        file.errors.append(LoadError(file.path, line, "is not UTF-8 text; save the file as UTF-8"))
        return None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = ", ".join(part for part in (exc.context, exc.problem) if part)
        hint = next((hint for key, hint in _YAML_HINTS.items() if key in problem), "")
        message = f"YAML syntax error: {problem}; fix the YAML{hint}"
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, None)
        file.errors.append(LoadError(file.path, line, message, column))
        return None
    except yaml.YAMLError as exc:
        file.error(None, f"YAML error: {exc}; fix the file's contents")
        return None
    if root is None:
        file.error(None, f"file is empty; start it with `version: {VERSION}`")
    return root

