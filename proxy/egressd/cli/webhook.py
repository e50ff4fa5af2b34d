"""``egressd inject-webhook``: the mutating admission webhook that injects the sidecar (:mod:`egressd.webhook` over :mod:`egressd.inject`).

Every flag also reads ``EGRESSD_<FLAG>``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("inject-webhook", help="(not built yet)")


def cmd(args: argparse.Namespace) -> int:
    raise NotImplementedError
