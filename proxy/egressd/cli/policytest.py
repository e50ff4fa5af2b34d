"""``egressd test``: run the policy tests of ``allowlists/tests/`` (:mod:`egressd.policy.policytest`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("test", help="(not built yet)")


def cmd(args: argparse.Namespace) -> int:
    raise NotImplementedError
