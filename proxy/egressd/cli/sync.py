"""``egressd allowlist-sync``: mirror the allowlist ConfigMap into every namespace labelled for injection (:mod:`egressd.allowlistsync`).

Every flag also reads ``EGRESSD_<FLAG>``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("allowlist-sync", help="(not built yet)")


def cmd(args: argparse.Namespace) -> int:
    raise NotImplementedError
