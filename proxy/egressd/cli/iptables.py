"""``egressd init-iptables``: install the pod's iptables and ip6tables rules (:mod:`egressd.iptables`).

Run once by a privileged init container in the pod's network namespace. Every flag also reads
``EGRESSD_<FLAG>`` (``EGRESSD_PROXY_UID``, ``EGRESSD_EXCLUDE_CIDR``...); repeatable flags take a
comma-separated list there (and on the command line too); ``EGRESSD_DRY_RUN`` and ``EGRESSD_CLEAN`` take
``1``/``true`` or ``0``/``false``. A flag value that cannot be used exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import sys

from egressd import iptables
from egressd.addresses import parse_cidr
from egressd.cli.run import env_list
from egressd.config import ConfigError, env_default
from egressd.policy.model import IPNetwork

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init-iptables",
        help="install the pod's iptables/ip6tables rules sending its TCP and DNS to the sidecar (init container)",
    )
    p.add_argument("--proxy-uid", default=env_default("proxy-uid", "1337"),
                   help="the sidecar's user ID: its traffic is left alone (1337)")
    p.add_argument("--transparent-port", default=env_default("transparent-port", "15001"),
                   help="where outbound TCP is redirected (15001)")
    p.add_argument("--dns-port", default=env_default("dns-port", "15053"),
                   help="where DNS (UDP and TCP port 53) is redirected (15053)")
    p.add_argument("--exclude-cidr", action="append", default=None,
                   help="a destination range left alone: not redirected, not dropped; DNS to it is still filtered "
                   "(repeatable)")
    p.add_argument("--exclude-port", action="append", default=None,
                   help="a destination port left alone, TCP and UDP (repeatable)")
    p.add_argument("--exclude-uid", action="append", default=None,
                   help="a user ID whose traffic is left alone (repeatable)")
    p.add_argument("--iptables-backend", default=env_default("iptables-backend", "auto"),
                   help="nft, legacy, or auto: the one already holding rules here, else iptables-restore on PATH")
    p.add_argument("--dry-run", action="store_true", default=None,
                   help="print the restore input for both families and change nothing")
    p.add_argument("--clean", action="store_true", default=None, help="remove egressd's chains and jumps")


def _flag(value: bool | None, name: str) -> bool:
    if value is not None:
        return value
    text = (env_default(name) or "").strip().lower()
    if text not in _TRUE + _FALSE:
        raise ConfigError(f"EGRESSD_{name.upper().replace('-', '_')}={text!r}: expected 1/true or 0/false")
    return text in _TRUE


def flag_values(given: list[str] | None, name: str) -> list[str]:
    """A repeatable flag's values (each may be a comma list), else its variable's; duplicates dropped."""
    texts = env_list(name) if given is None else [v.strip() for g in given for v in g.split(",") if v.strip()]
    return list(dict.fromkeys(texts))


def _number(text: str, name: str, what: str) -> int:
    if not text.strip().isdigit():
        variable = "EGRESSD_" + name.upper().replace("-", "_")
        raise ConfigError(f"--{name} (or {variable}) {text!r}: expected {what}")
    return int(text)


def exclude_cidrs(given: list[str] | None) -> tuple[IPNetwork, ...]:
    """The ``--exclude-cidr`` values (else ``EGRESSD_EXCLUDE_CIDR``) as networks, duplicates dropped."""
    cidrs = []
    for text in flag_values(given, "exclude-cidr"):
        try:
            cidrs.append(parse_cidr(text))
        except ValueError as exc:
            raise ConfigError(f"--exclude-cidr: {exc}") from None
    return tuple(dict.fromkeys(cidrs))


def rules_from(args: argparse.Namespace) -> iptables.PodRules:
    return iptables.PodRules(
        proxy_uid=_number(args.proxy_uid, "proxy-uid", "a user ID, e.g. 1337"),
        transparent_port=_number(args.transparent_port, "transparent-port", "a port, e.g. 15001"),
        dns_port=_number(args.dns_port, "dns-port", "a port, e.g. 15053"),
        exclude_cidrs=exclude_cidrs(args.exclude_cidr),
        exclude_ports=tuple(_number(p, "exclude-port", "a port 1-65535")
                            for p in flag_values(args.exclude_port, "exclude-port")),
        exclude_uids=tuple(_number(u, "exclude-uid", "a user ID")
                           for u in flag_values(args.exclude_uid, "exclude-uid")),
    )


def cmd_init(args: argparse.Namespace) -> int:
    dry_run, clean = _flag(args.dry_run, "dry-run"), _flag(args.clean, "clean")
    if args.iptables_backend not in iptables.BACKENDS:
        choices = ", ".join(iptables.BACKENDS)
        raise ConfigError(f"--iptables-backend {args.iptables_backend!r}: expected one of {choices}")
    rules = None if clean else rules_from(args)
    try:
        outcome = iptables.apply(rules, backend=args.iptables_backend, dry_run=dry_run)
    except iptables.ApplyError as exc:
        print(f"egressd: {exc}", file=sys.stderr)
        return 1
    for note in outcome.notes:
        print(f"egressd: {note}", file=sys.stderr)
    if dry_run:
        sys.stdout.write("".join(text for _, text in outcome.texts))
        return 0
    done = "removed egressd's rules" if clean else "installed the rules"
    print(f"egressd: {done} with {' and '.join(cmd.split()[0] for cmd, _ in outcome.texts)} "
          f"(back end {outcome.backend})", file=sys.stderr)
    return 0
