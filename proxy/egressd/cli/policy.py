"""``egressd validate`` and ``egressd check``: the allowlists, without a running proxy.

``check`` decides one destination; with ``--method`` and ``--path`` it also decides one request on a name
whose rule has ``inspect:`` (:func:`egressd.inspect.rules.check_request`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from egressd.config import env_default
from egressd.hostport import BadDestination, parse_authority
from egressd.inspect.rules import check_request
from egressd.policy.decide import decide
from egressd.policy.lint import LintWarning, lint
from egressd.policy.loader import LoadError, PolicyError, load_policy
from egressd.policy.model import Decision, Mode, Policy

FORMATS = ("text", "json", "github")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    validate = sub.add_parser(
        "validate", help="check an allowlists directory: every error and warning with file:line:column; exit 1 on "
        "an error (with --strict, on a warning too)"
    )
    validate.add_argument("path", nargs="?", default="allowlists")
    validate.add_argument("--strict", action="store_true", help="exit 1 when there is a warning, too")
    validate.add_argument(
        "--format", choices=FORMATS, default="text",
        help="text (default), json (one object) or github (workflow annotations, ::error and ::warning)",
    )

    check = sub.add_parser(
        "check", help="decide one destination (and with --method and --path one request on an inspected name): "
        "exit 0 allow, 1 deny",
    )
    check.add_argument("--allowlists", default=env_default("allowlists", "allowlists"))
    check.add_argument("--service", default=env_default("service"), required=env_default("service") is None)
    check.add_argument("--mode", choices=["enforce", "audit"], default=None)
    check.add_argument("destination", help="HOST[:PORT], port 443 when omitted")
    check.add_argument("--method", help="with --path: the request's method, e.g. GET, for a name with inspect:")
    check.add_argument("--path", help="with --method: the request-target, e.g. /repos/acme/x?page=2")


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the allowlists, lint them when they load, print the report in ``args.format``; the exit code.

    Exit 1 when there is an error, or with ``--strict`` a warning; else 0. Warnings need a loaded policy,
    so a directory with errors reports only its errors. The text report goes to stdout, or to stderr when
    the allowlists do not load; json and github print to stdout only, and json's ``ok`` is true exactly
    when the exit code is 0.
    """
    errors: tuple[LoadError, ...] = ()
    policy: Policy | None = None
    try:
        policy = load_policy(Path(args.path))
    except PolicyError as exc:
        errors = exc.errors
    warnings = tuple(lint(policy)) if policy is not None else ()
    failed = bool(errors) or (args.strict and bool(warnings))
    if args.format == "json":
        print(json.dumps(_json_report(args.path, not failed, errors, warnings, policy)))
    elif args.format == "github":
        for line in [*(_annotation("error", e.file, e.line, e.column, e.message) for e in errors),
                     *(_annotation("warning", w.file, w.line, w.column, w.message) for w in warnings)]:
            print(line)
    else:
        lines = [*(_text_line("error", e.file, e.line, e.column, e.message) for e in errors),
                 *(_text_line("warning", w.file, w.line, w.column, w.message) for w in warnings),
                 _summary(args.path, errors, warnings, policy, args.strict)]
        print("\n".join(lines), file=sys.stderr if errors else sys.stdout)
    return 1 if failed else 0


def _text_line(severity: str, file: str, line: int | None, column: int | None, message: str) -> str:
    where = "".join(f":{part}" for part in (line, column if line is not None else None) if part is not None)
    return f"{file}{where}: {severity}: {message}"


def _summary(
    path: str, errors: tuple[LoadError, ...], warnings: tuple[LintWarning, ...], policy: Policy | None, strict: bool
) -> str:
    if errors or policy is None:
        return f"{path}: {len(errors)} error(s); warnings are checked once every file loads"
    loaded = f"{len(policy.services)} service(s), version {policy.version}"
    if not warnings:
        return f"{path}: ok, {loaded}"
    if strict:
        return f"{path}: {len(warnings)} warning(s), failing under --strict; {loaded}"
    return f"{path}: ok with {len(warnings)} warning(s), {loaded}"


def _json_report(
    path: str, ok: bool, errors: tuple[LoadError, ...], warnings: tuple[LintWarning, ...], policy: Policy | None
) -> dict[str, object]:
    return {
        "path": path,
        "ok": ok,
        "errors": [{"file": e.file, "line": e.line, "column": e.column, "message": e.message} for e in errors],
        "warnings": [
            {"file": w.file, "line": w.line, "column": w.column, "code": w.code, "message": w.message}
            for w in warnings
        ],
        "services": sorted(policy.services) if policy is not None else None,
        "version": policy.version if policy is not None else None,
    }


def _annotation(command: str, file: str, line: int | None, column: int | None, message: str) -> str:
    """A GitHub workflow command (``::error file=F,line=L,col=C::message``), escaped as GitHub's docs say."""
    properties = [("file", file), ("line", line), ("col", column if line is not None else None)]
    shown = ",".join(f"{key}={_escape(str(value), True)}" for key, value in properties if value is not None)
    return f"::{command} {shown}::{_escape(message, False)}"


def _escape(text: str, is_property: bool) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if is_property else text


def cmd_check(args: argparse.Namespace) -> int:
    if (args.method is None) != (args.path is None):
        print("egressd check: give --method and --path together, or neither", file=sys.stderr)
        return 2
    try:
        policy = load_policy(Path(args.allowlists))
    except PolicyError as exc:
        print(f"{args.allowlists}: the allowlists do not load:\n{exc}", file=sys.stderr)
        return 2
    try:
        dest = parse_authority(args.destination, default_port=443)
    except BadDestination as exc:
        print(f"deny bad_request: {exc}")
        return 1
    decision = decide(policy, args.service, dest, Mode(args.mode) if args.mode else None)
    audit = " (audit mode: would deny)" if decision.would_deny else ""
    print(f"{decision.verdict.value} {decision.reason.value} rule={decision.source or '-'} "
          f"{dest.authority} service={args.service}{audit}")
    if not decision.allowed or (args.method is None and decision.inspect is None):
        return 0 if decision.allowed else 1
    return _check_request(decision, args.method, args.path)


def _check_request(decision: Decision, method: str | None, path: str | None) -> int:
    """The inspection of an allowed connection: its entries, or the verdict on one request; the exit code."""
    inspect = decision.inspect
    if inspect is None:
        print("request not inspected: the rule has no inspect:, so every method and path passes")
        return 0
    if method is None or path is None:
        print(f"inspected: a request passes only if one of these {len(inspect.entries)} entries allows it")
        for entry in inspect.entries:
            print(f"  {entry} ({entry.source})")
        return 0
    verdict = check_request(inspect, method, path)
    why = f" ({verdict.refusal})" if verdict.refusal else "" if verdict.allowed else " (no entry allows it)"
    print(f"request {verdict.verdict.value} {verdict.reason.value} entry={verdict.source or '-'} {method} "
          f"path={verdict.path or '-'}{why}")
    return 0 if verdict.allowed else 1
