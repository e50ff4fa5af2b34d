"""``egressd inspect-ca init DIR``: make a CA for trying inspect mode.

Writes DIR/ca.crt (mount it into the apps' trust store) and DIR/ca.key (EC P-256, mode 0600, for
``--inspect-ca-key``; in production keep it in a Kubernetes Secret mounted with ``defaultMode: 0400``), and
prints both paths. It never overwrites an existing file. See :mod:`egressd.inspect.ca`.
"""

from __future__ import annotations

import argparse
import sys

from egressd.inspect import ca


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("inspect-ca", help="the CA of inspect mode: make one for trials")
    commands = parser.add_subparsers(dest="inspect_ca_command", required=True)
    init = commands.add_parser("init", help="make a CA certificate and key in DIR (ca.crt, ca.key mode 0600)")
    init.add_argument("directory", metavar="DIR", help="where to write ca.crt and ca.key (created 0700 if missing)")
    init.add_argument("--days", type=int, default=ca.TRIAL_DAYS, help="validity in days (default: %(default)s)")
    init.add_argument("--name", default="egressd inspection CA", help="the CA's common name")


def cmd(args: argparse.Namespace) -> int:
    if args.days < 1:
        print("egressd inspect-ca init: --days must be 1 or more", file=sys.stderr)
        return 2
    try:
        cert, key = ca.init(args.directory, common_name=args.name, days=args.days)
    except (ca.CaError, OSError) as exc:
        print(f"egressd inspect-ca init: {exc}", file=sys.stderr)
        return 2
    print(f"certificate: {cert}\nkey: {key}\nrun egressd with --inspect-ca-cert {cert} --inspect-ca-key {key}, and "
          "add the certificate to the trust store of the apps whose requests are inspected")
    return 0
