"""``egressd diff OLD NEW``: what a change to the allowlists opens up, per service (:mod:`egressd.policy.diff`).

OLD and NEW are directories or git revisions (:mod:`egressd.policy.revision`);
one argument ``A..B`` or ``A...B`` names both. Both sides must load. The
report lists widenings first, then narrowings, then changes that leave the
reach as it was, as text or (``--format markdown``) as one pull-request
comment. Exit 0 when nothing widens, 3 when something does, 1 on an error
(a name that is no directory or revision, allowlists that do not load: their
errors are printed); 2 for bad usage (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import ExitStack

from egressd.inspect.rules import describe as describe_inspect
from egressd.policy.diff import GLOBAL, Change, Effect, Kind, PolicyDiff, Section, diff_policies
from egressd.policy.loader import PolicyError, load_policy
from egressd.policy.model import Mode, Policy, Rule
from egressd.policy.revision import RevisionError, Snapshot, snapshot, split_range

WIDENED_EXIT = 3
MARKER = "<!-- egressd diff -->"  # lets a CI job find its earlier comment and update it
_ORDER = (Effect.WIDENS, Effect.NARROWS, Effect.SAME)
_HEADINGS = {Effect.WIDENS: "Widenings", Effect.NARROWS: "Narrowings", Effect.SAME: "Same reach"}
_MARKS = {Effect.WIDENS: "⚠️ widens", Effect.NARROWS: "narrows", Effect.SAME: "same reach"}
_AUDIT = "audit lets every destination through except global denies"
_INSPECTION = (Kind.INSPECT_ADDED, Kind.INSPECT_REMOVED, Kind.REQUESTS_ADDED, Kind.REQUESTS_REMOVED)

Quote = Callable[[str], str]


class NotLoaded(Exception):
    """One side's allowlists do not load; the message lists every error, files named as in the repository."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    diff = sub.add_parser(
        "diff", help="what a change to the allowlists opens up, per service: exit 0 nothing widens, 3 something "
        "does, 1 on an error",
    )
    diff.add_argument("old", metavar="OLD", help="a directory, a git revision (REV or REV:PATH), or a range "
                      "OLD..NEW / OLD...NEW (from their merge base) when NEW is not given")
    diff.add_argument("new", metavar="NEW", nargs="?", help="a directory or a git revision (REV or REV:PATH)")
    diff.add_argument("--format", choices=["text", "markdown"], default="text",
                      help="text for a terminal, markdown for one pull-request comment")
    diff.add_argument("--allowlists-dir", default="allowlists", metavar="PATH",
                      help="where the allowlists are in a revision, from the repository's top (default: allowlists)")


def cmd(args: argparse.Namespace) -> int:
    try:
        old, new, title = (args.old, args.new, "") if args.new is not None else _range(args.old)
        with ExitStack() as stack:
            sides = [stack.enter_context(snapshot(old, args.allowlists_dir, title=title)),
                     stack.enter_context(snapshot(new, args.allowlists_dir))]
            policies = [_load(side) for side in sides]
            report = diff_policies(*policies)
            render = markdown if args.format == "markdown" else text
            print(render(report, sides[0], sides[1]))
    except (RevisionError, NotLoaded) as exc:
        print(f"egressd diff: {exc}", file=sys.stderr)
        return 1
    return WIDENED_EXIT if report.widens else 0


def _range(text: str) -> tuple[str, str, str]:
    if ".." not in text:
        raise RevisionError(f'only OLD was given ("{text}"); give NEW too, or a range such as origin/main...HEAD')
    return split_range(text)


def _load(side: Snapshot) -> Policy:
    try:
        return load_policy(side.directory)
    except PolicyError as exc:
        errors = "\n".join(side.show(str(error)) for error in exc.errors)
        raise NotLoaded(
            f"the allowlists of {side.label} do not load ({len(exc.errors)} error(s)); fix them first:\n{errors}"
        ) from None


# Rendering.


def text(report: PolicyDiff, old: Snapshot, new: Snapshot) -> str:
    """The report for a terminal: a title with the counts, then each effect's changes per section."""
    where = _where(old, new, str)
    lines = [f"egressd diff {old.label} -> {new.label}: {_counts(report)}"]
    for effect in _ORDER:
        groups = _by_effect(report, effect)
        if groups:
            lines += ["", f"{_HEADINGS[effect].upper()}:"]
        for section, changes in groups:
            lines.append(f"  {_section_title(section, where)}:")
            lines += [f"    {describe(change, where)}" for change in changes]
    return "\n".join([*lines, "", _last_line(report)])


def markdown(report: PolicyDiff, old: Snapshot, new: Snapshot) -> str:
    """The report as one pull-request comment: widenings first, each line marked with its effect."""
    where = _where(old, new, _code)
    warn = "⚠️ " if report.widens else ""
    lines = [MARKER, f"### {warn}Allowlist changes: {_counts(report)}", "",
             f"{_code(old.label)} → {_code(new.label)}"]
    for effect in _ORDER:
        groups = _by_effect(report, effect)
        if groups:
            lines += ["", f"#### {'⚠️ ' if effect is Effect.WIDENS else ''}{_HEADINGS[effect]}"]
        for section, changes in groups:
            lines += ["", f"**{_section_title(section, where)}**", ""]
            lines += [f"- {_MARKS[effect]}: {describe(change, where, _code)}" for change in changes]
    return "\n".join([*lines, "", _last_line(report)])


def _code(value: str) -> str:
    return f"`{value}`"


def _where(old: Snapshot, new: Snapshot, quote: Quote) -> Quote:
    return lambda source: quote(new.show(old.show(source)))


def _by_effect(report: PolicyDiff, effect: Effect) -> list[tuple[Section, list[Change]]]:
    groups = [(section, [change for change in section.changes if change.effect is effect])
              for section in report.sections]
    return [(section, changes) for section, changes in groups if changes]


def _section_title(section: Section, where: Quote) -> str:
    name = "global, affects every service" if section.name == GLOBAL else section.name
    audit = ", in audit mode" if section.mode is Mode.AUDIT else ""
    return f"{name} ({where(section.source)}{audit})" if section.source else name


def _counts(report: PolicyDiff) -> str:
    widens, narrows, same = (report.count(effect) for effect in _ORDER)
    return (f"{widens} widening{'s' * (widens != 1)}, {narrows} narrowing{'s' * (narrows != 1)}, "
            f"{same} with the same reach")


def _last_line(report: PolicyDiff) -> str:
    if not report.sections:
        return "Nothing changed: every service reaches exactly what it did."
    if not report.widens:
        return "Nothing widened: no service reaches anything it could not reach before."
    widens = report.count(Effect.WIDENS)
    return f"{widens} change{'s' * (widens != 1)} widen{'s' * (widens == 1)} what a service may reach."


# One line per change.


def describe(change: Change, where: Quote = str, quote: Quote = str) -> str:
    """What ``change`` does, in one line; ``where`` prints a file:line, ``quote`` a pattern or a name."""
    kind, rule, prefix = change.kind, change.rule, f"{change.scope} " if change.scope else ""
    if rule is None:
        return prefix + _subject_text(change, where(change.source), quote)
    at, ports, pattern = where(rule.source), _ports_text(change.ports), quote(rule.pattern)
    if kind is Kind.WIDENED and change.others:
        line = f"widened {_list(change.others, where, quote, 'was ')} to {pattern}{ports} ({at})"
        line += f", which also covers existing {_list(change.kept, where, quote)}" if change.kept else ""
    elif kind is Kind.WIDENED:
        what = "wildcard" if rule.host is not None else "range"
        line = f"new {what} {pattern}{ports} ({at}) covers existing {_list(change.kept, where, quote)}"
    elif kind is Kind.NARROWED:
        line = f"narrowed {pattern}{ports} (was {at}) to {_list(change.others, where, quote)}"
    elif kind is Kind.TLS:
        state = "now required" if rule.requires_tls(change.ports[0] or 0) else "no longer required"
        line = f"TLS check {state} on {pattern}{ports} ({at})"
    elif kind in (Kind.PORTS_ADDED, Kind.PORTS_REMOVED):
        line = f"{kind.value} on {pattern}: {_numbers(change.ports)} ({_at(kind, at)})"
    elif kind in _INSPECTION:
        same = "; within the other requests" if change.effect is Effect.SAME else ""
        subject = change.subject if kind is Kind.INSPECT_REMOVED else quote(change.subject)
        line = f"{kind.value} on {pattern}{ports}: {subject} ({at}){same}"
    else:
        line = f"{kind.value} {pattern}{ports} ({_at(kind, at)})"
    if rule.inspect is not None and kind not in _INSPECTION:
        line += f", inspected: {quote(describe_inspect(rule.inspect))}"
    return prefix + line + _covered_text(change, where, quote)


def _at(kind: Kind, at: str) -> str:
    return f"was {at}" if kind in (Kind.REMOVED, Kind.PORTS_REMOVED, Kind.IDENTITY_REMOVED) else at


def _covered_text(change: Change, where: Quote, quote: Quote) -> str:
    if not change.covered:
        return ""
    removal = change.kind in (Kind.REMOVED, Kind.NARROWED, Kind.PORTS_REMOVED)
    rules = _list(change.covered, where, quote)
    if change.covered[0].ports is None and change.scope != "deny":
        return f"; {'was ' if removal else ''}blocked by global deny {rules}"
    verb = f"{'still' if removal else 'already'} {'denied' if change.scope == 'deny' else 'allowed'} by {rules}"
    if change.effect is Effect.SAME:
        return f"; {verb}"
    return f"; {_ports_text(change.covered_ports).strip()} {verb}"


def _subject_text(change: Change, at: str, quote: Quote) -> str:
    kind, subject = change.kind, change.subject
    if kind is Kind.SERVICE_ADDED:
        return f"new service file {at}, mode {subject}" + (f": {_AUDIT}" if subject == Mode.AUDIT.value else "")
    if kind is Kind.SERVICE_REMOVED:
        return f"service file removed (was {at}, {subject})"
    if kind is Kind.MODE:
        return f"mode {subject} ({at})" + (f": {_AUDIT}" if subject.endswith(Mode.AUDIT.value) else "")
    same = "; within another entry" if change.effect is Effect.SAME else ""
    return f"{kind.value} {quote(subject)} ({_at(kind, at)}){same}"


def _numbers(ports: tuple[int | None, ...]) -> str:
    return ", ".join(str(port) for port in ports if port is not None)


def _ports_text(ports: tuple[int | None, ...]) -> str:
    shown = _numbers(ports)
    return f" port{'s' * (',' in shown)} {shown}" if shown else ""


def _list(rules: tuple[Rule, ...], where: Quote, quote: Quote, was: str = "") -> str:
    return ", ".join(f"{quote(rule.pattern)} ({was}{where(rule.source)})" for rule in rules)
