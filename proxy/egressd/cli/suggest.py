"""``egressd suggest``: propose allowlist additions from audit records (:mod:`egressd.policy.suggest`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("suggest", help="(not built yet)")


def cmd(args: argparse.Namespace) -> int:
    raise NotImplementedError
