"""``egressd suggest AUDIT_LOG…``: propose allowlist additions from audit records (:mod:`egressd.policy.suggest`).

The records are read, the current allowlists (``--allowlists``) loaded, the proposal made; then each changed
file's new text is built: a new service's file whole, an existing one edited in place (its ports added to
the rules they extend, its new rules appended to ``allow:`` with their comments, every other line kept; a
new file is listed in the directory's ``kustomization.yaml``). Before anything is printed or written, the
changed directory is checked in a temporary copy: it must load, and every proposed destination must be
allowed; otherwise nothing is output and the exit code is 1.

Output: the service files as one YAML stream on stdout (default), written into ``--out DIR``, or with
``--format patch`` a unified diff against the allowlists directory (apply it from the directory's parent
with ``git apply`` or ``patch -p1``). A one-line summary of the records read goes to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.config import env_default
from egressd.policy.loader import PolicyError, load_policy
from egressd.policy.model import Policy
from egressd.policy.nodes import File, compose
from egressd.policy.suggest import (
    MIN_SIBLINGS,
    PortAddition,
    ServiceProposal,
    as_patch,
    as_stream,
    flow_ports,
    ports_text,
    propose,
    read_records,
    render_block,
    render_new,
    verify,
)

KUSTOMIZATION = "kustomization.yaml"
Change = tuple[str, str | None, str]  # (file name in the allowlists directory, old text or None, new text)


class SuggestError(Exception):
    """The proposal cannot be written; the message names the file (and line) and what to change."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "suggest", help="propose allowlist additions from audit records (egress.connection and egress.dns lines)"
    )
    parser.add_argument("logs", nargs="+", metavar="AUDIT_LOG", help="audit log (JSON lines); - for standard input")
    parser.add_argument("--service", help="only this service's records")
    parser.add_argument("--min-siblings", type=_siblings, default=MIN_SIBLINGS, metavar="N",
                        help=f"propose *.parent when at least N names directly under parent were seen on the same "
                        f"ports (default {MIN_SIBLINGS}, at least 2)")
    parser.add_argument("--format", choices=["yaml", "patch"], default="yaml",
                        help="yaml: the proposed service files (default); patch: a unified diff")
    parser.add_argument("--out", metavar="DIR", help="write the changed files into DIR instead of printing them")
    parser.add_argument("--allowlists", default=env_default("allowlists", "allowlists"),
                        help="the current allowlists directory (default: allowlists)")


def _siblings(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 2")
    return int(text)


def cmd(args: argparse.Namespace) -> int:
    if args.out and args.format == "patch":
        print("egressd suggest: --out writes the files themselves; leave out --format patch", file=sys.stderr)
        return 2
    directory = Path(args.allowlists)
    try:
        policy = load_policy(directory)
        reading = read_records(_lines(args.logs))
    except PolicyError as exc:
        print(f"egressd suggest: {directory}: the allowlists do not load; fix them first:\n{exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"egressd suggest: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(reading.summary(), file=sys.stderr)
    proposals = []
    for proposal in propose(policy, reading, args.service, args.min_siblings):
        if proposal.rules or proposal.additions:
            proposals.append(proposal)
        else:  # only names left out: no file to say so in
            print("".join(f"egressd suggest: {proposal.service}: {note}\n" for note in proposal.notes), end="",
                  file=sys.stderr)
    if not proposals:
        print("egressd suggest: nothing to suggest: no counted record needs a new rule or port", file=sys.stderr)
        return 0
    try:
        changes = changed_files(directory, policy, proposals)
        _check(directory, changes, proposals)
    except SuggestError as exc:
        print(f"egressd suggest: {exc}; nothing was written", file=sys.stderr)
        return 1
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, _, text in changes:
            (out / name).write_text(text, encoding="utf-8")
            print(f"egressd suggest: wrote {out / name}", file=sys.stderr)
    elif args.format == "patch":
        sys.stdout.write(as_patch((f"{directory.resolve().name}/{name}", old, new) for name, old, new in changes))
    else:
        sys.stdout.write(as_stream((name, new) for name, _, new in changes if name != KUSTOMIZATION))
        if any(name == KUSTOMIZATION for name, _, _ in changes):
            news = ", ".join(name for name, old, _ in changes if old is None)
            print(f"egressd suggest: list {news} in {directory / KUSTOMIZATION} too", file=sys.stderr)
    return 0


def _lines(paths: Iterable[str]) -> Iterator[str]:
    for path in paths:
        if path == "-":
            yield from sys.stdin
            continue
        with open(path, encoding="utf-8", errors="replace") as file:
            yield from file


def changed_files(directory: Path, policy: Policy, proposals: Iterable[ServiceProposal]) -> list[Change]:
    """Each file the proposals change, with its old and new text; a new service's file is listed in the
    directory's kustomization.yaml when it has one (and a list of the service files in it)."""
    changes: list[Change] = []
    for proposal in proposals:
        if proposal.source is None:
            changes.append((f"{proposal.service}.yaml", None, render_new(proposal)))
        else:
            old = Path(proposal.source).read_text(encoding="utf-8-sig")
            changes.append((Path(proposal.source).name, old, edit_existing(old, proposal)))
    kustomization = directory / KUSTOMIZATION
    new = [name for name, old, _ in changes if old is None]
    if new and kustomization.is_file():
        old = kustomization.read_text(encoding="utf-8-sig")
        known = [Path(file).name for file in policy.files]
        text = add_to_kustomization(old, new, known)
        if text is None:
            raise SuggestError(f"{kustomization}: no list of the allowlist files ({', '.join(known)}) to add "
                               f"{', '.join(new)} to; list them by hand")
        changes.append((KUSTOMIZATION, old, text))
    return changes


def _check(directory: Path, changes: list[Change], proposals: Iterable[ServiceProposal]) -> None:
    """SuggestError unless the directory with ``changes`` loads and allows every proposed destination."""
    with tempfile.TemporaryDirectory(prefix="egressd-suggest-") as tmp:
        copy = Path(tmp) / directory.resolve().name
        shutil.copytree(directory, copy, symlinks=True)
        for name, _, text in changes:
            (copy / name).write_text(text, encoding="utf-8")
        try:
            missed = verify(load_policy(copy), proposals)
        except PolicyError as exc:
            raise SuggestError(f"the suggested allowlists would not load:\n{exc}") from None
    if missed:
        raise SuggestError("the suggested allowlists would not allow: " + ", ".join(missed))


# -- editing an existing file in place ----------------------------------------------------------------------


def edit_existing(text: str, proposal: ServiceProposal) -> str:
    """``text`` (the service's file) with the proposal's ports added in place and its new rules appended to
    ``allow:``, every other line and comment kept; SuggestError when the file's layout does not allow it."""
    path = proposal.source or f"{proposal.service}.yaml"
    text = text if text.endswith("\n") else text + "\n"
    root = compose(File(path), text.encode())
    if not isinstance(root, MappingNode):
        raise SuggestError(f"{path}: not an allowlist file; run egressd validate on it")
    keys = {key.value: (key, value) for key, value in root.value if isinstance(key, ScalarNode)}
    allow = keys.get("allow")
    after = _line_after(text)
    edits: list[tuple[int, int, int, str]] = []  # (start, order at the same start, end, replacement)
    for addition in proposal.additions:  # the rules it extends are in allow:, so allow: is there
        edits += _port_edits(path, allow[1], addition, after)  # type: ignore[index]
    block_at = len(text)
    if allow is None:
        block = "allow:\n" + render_block(proposal, "  ")
    elif _block_list(path, allow[1]):
        block_at = after(_last_line(allow[1].value[-1]))
        block = render_block(proposal, " " * allow[1].start_mark.column)
    else:  # allow: [] (flow, empty): the block follows "allow:"
        edits.append((allow[0].end_mark.index, 0, allow[1].end_mark.index, ":"))
        block_at = after(allow[1].end_mark.line)
        block = render_block(proposal, " " * (allow[0].start_mark.column + 2))
    edits.append((block_at, 2, block_at, block))
    for start, _, end, new in sorted(edits, reverse=True):  # from the end, so earlier indexes stay valid
        text = text[:start] + new + text[end:]
    return text


def _line_after(text: str) -> Callable[[int], int]:
    """For ``text``: a function from a 0-based line to the index where the next line starts."""
    starts = [0, *(index + 1 for index, char in enumerate(text) if char == "\n")]
    return lambda line: starts[line + 1] if line + 1 < len(starts) else len(text)


def _block_list(path: str, node: Node) -> bool:
    """True for a block list, False for ``[]``; SuggestError for a flow list with items."""
    if not isinstance(node, SequenceNode) or (node.flow_style and node.value):
        raise SuggestError(f"{path}:{node.start_mark.line + 1}: allow: is written as a flow list ([...]); write it "
                           "as a block list, one \"- host: ...\" item per line, and run egressd suggest again")
    return not node.flow_style


def _port_edits(path: str, allow: Node, addition: PortAddition,
                after: Callable[[int], int]) -> list[tuple[int, int, int, str]]:
    """A comment line above the rule, and its ports: written with the added ports (flow list, block list, or a
    new ports: key)."""
    line = int(addition.rule.source.rsplit(":", 1)[1])
    items = allow.value if _block_list(path, allow) else []
    item = next((node for node in items if node.start_mark.line + 1 == line), None)
    if not isinstance(item, MappingNode):
        raise SuggestError(f"{path}:{line}: no rule starts on this line; run egressd validate on the file")
    comment = (f"{' ' * allow.start_mark.column}# port{'s' * (len(addition.ports) > 1)} "
               f"{ports_text(addition.ports)} added: {addition.seen.describe()}\n")
    rule_start = after(item.start_mark.line - 1)
    edits = [(rule_start, 1, rule_start, comment)]
    ports = next((value for key, value in item.value if isinstance(key, ScalarNode) and key.value == "ports"), None)
    added = sorted(addition.ports)
    if isinstance(ports, SequenceNode) and ports.flow_style:
        listed = ", ".join([*(node.value for node in ports.value), *map(str, added)])
        edits.append((ports.start_mark.index, 0, ports.end_mark.index, f"[{listed}]"))
    elif isinstance(ports, SequenceNode):
        at = after(_last_line(ports))
        edits.append((at, 0, at, "".join(f"{' ' * ports.start_mark.column}- {port}\n" for port in added)))
    elif item.flow_style:
        at = item.end_mark.index - 1  # before the closing "}"
        edits.append((at, 0, at, f", ports: {flow_ports(addition.rule.ports, added)}"))
    else:
        at = after(_last_line(item))
        indent = " " * item.start_mark.column
        edits.append((at, 0, at, f"{indent}ports: {flow_ports(addition.rule.ports, added)}\n"))
    return edits


def _last_line(node: Node) -> int:
    """The 0-based line where ``node``'s own text ends (a block collection ends with its last child)."""
    if isinstance(node, MappingNode) and not node.flow_style:
        return max(_last_line(part) for pair in node.value for part in pair)
    if isinstance(node, SequenceNode) and not node.flow_style:
        return _last_line(node.value[-1])
    end = node.end_mark
    return end.line if end.column > 0 else end.line - 1


def add_to_kustomization(text: str, names: Iterable[str], known: Iterable[str]) -> str | None:
    """``text`` with ``names`` appended to the block list that lists ``known`` files; None when it has none."""
    found = _file_list(compose(File(KUSTOMIZATION), text.encode()), set(known))
    if found is None:
        return None
    text = text if text.endswith("\n") else text + "\n"
    listed = {node.value for node in found.value}
    at = _line_after(text)(_last_line(found))
    indent = " " * found.start_mark.column
    return text[:at] + "".join(f"{indent}- {name}\n" for name in names if name not in listed) + text[at:]


def _file_list(node: Node | None, known: set[str]) -> SequenceNode | None:
    """The first block list of scalars holding one of the ``known`` file names, depth first."""
    if isinstance(node, SequenceNode) and not node.flow_style and any(
        isinstance(item, ScalarNode) and item.value in known for item in node.value
    ):
        return node
    if isinstance(node, MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = node.value if isinstance(node, SequenceNode) else []
    return next((found for child in children if (found := _file_list(child, known)) is not None), None)
