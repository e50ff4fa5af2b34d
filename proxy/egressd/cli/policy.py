"""``egressd validate`` and ``egressd check``: the allowlists, without a running proxy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egressd.config import env_default
from egressd.hostport import BadDestination, parse_authority
from egressd.policy.decide import decide
from egressd.policy.loader import PolicyError, load_policy
from egressd.policy.model import Mode


def add_parsers(sub: argparse._SubParsersAction) -> None:
    validate = sub.add_parser("validate", help="check an allowlists directory; exit 1 listing every error")
    validate.add_argument("path", nargs="?", default="allowlists")

    check = sub.add_parser("check", help="decide one destination: exit 0 allow, 1 deny")
    check.add_argument("--allowlists", default=env_default("allowlists", "allowlists"))
    check.add_argument("--service", default=env_default("service"), required=env_default("service") is None)
    check.add_argument("--mode", choices=["enforce", "audit"], default=None)
    check.add_argument("destination", help="HOST[:PORT], port 443 when omitted")


def cmd_validate(args: argparse.Namespace) -> int:
    path = args.path
    try:
        policy = load_policy(Path(path))
    except PolicyError as exc:
        print(f"{path}: {len(exc.errors)} error(s)\n{exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok, {len(policy.services)} service(s), version {policy.version}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
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
    return 0 if decision.allowed else 1
