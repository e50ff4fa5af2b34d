"""``egressd diff OLD NEW``: what a change to the allowlists opens up, per service (:mod:`egressd.policy.diff`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("diff", help="(not built yet)")


def cmd(args: argparse.Namespace) -> int:
    raise NotImplementedError
