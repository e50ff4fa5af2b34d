"""``egressd test``: run the policy tests of ``allowlists/tests/`` (:mod:`egressd.policy.policytest`).

Exit 0 when every expectation holds; 1 when one does not, when an expectation
file has an error, or when the allowlists do not load; 2 for bad usage
(argparse). Results go to stdout, load errors to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egressd.policy.loader import PolicyError, load_policy
from egressd.policy.policytest import describe, load_expectations, run, summary

TESTS_DIR = "tests"


def add_parser(sub: argparse._SubParsersAction) -> None:
    test = sub.add_parser(
        "test", help="run the policy tests of ALLOWLISTS/tests/*.yaml: exit 0 when every expectation holds, 1 if not"
    )
    test.add_argument("path", nargs="?", default="allowlists", metavar="ALLOWLISTS",
                      help="the allowlists directory (default: allowlists)")
    test.add_argument("--tests", metavar="DIR", default=None,
                      help=f"the directory of expectation files (default: ALLOWLISTS/{TESTS_DIR})")
    test.add_argument("-v", "--verbose", action="store_true", help="list the expectations that hold too")


def cmd(args: argparse.Namespace) -> int:
    directory = Path(args.path)
    try:
        policy = load_policy(directory)
    except PolicyError as exc:
        print(f"{args.path}: the allowlists do not load ({len(exc.errors)} error(s)):\n{exc}", file=sys.stderr)
        return 1
    tests = Path(args.tests) if args.tests is not None else directory / TESTS_DIR
    expectations, errors = load_expectations(tests, policy.services)
    if errors:
        listed = "\n".join(str(error) for error in errors)
        print(f"{tests}: the policy tests do not load ({len(errors)} error(s)):\n{listed}", file=sys.stderr)
        return 1
    outcomes = run(policy, expectations)
    for outcome in outcomes:
        if args.verbose or not outcome.passed:
            print(describe(outcome))
    print(summary(outcomes))
    return 0 if all(outcome.passed for outcome in outcomes) else 1
