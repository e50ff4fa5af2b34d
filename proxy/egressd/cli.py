"""Command line: argument and environment parsing only.

``egressd run``      the proxy (every flag also reads EGRESSD_<FLAG>, e.g. EGRESSD_SERVICE;
                     repeatable flags take a comma-separated list there)
``egressd validate`` load an allowlists directory, list every error, exit 1 if any
``egressd check``    decide one destination for one service: exit 0 allow, 1 deny
``egressd demo``     the offline demo (its own DNS server and HTTPS origins)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from egressd.addresses import parse_cidr
from egressd.config import Config, ConfigError, env_default, parse_hostport
from egressd.hostport import BadDestination, parse_authority
from egressd.policy.decide import decide
from egressd.policy.loader import PolicyError, load_policy
from egressd.policy.model import Mode

_FLOATS = {
    "header-timeout": "seconds to receive a complete request head",
    "hello-timeout": "seconds to receive the TLS ClientHello on a TLS port",
    "connect-timeout": "seconds to open the upstream connection (all addresses)",
    "idle-timeout": "seconds a tunnel or kept-alive connection may stay silent",
    "dns-timeout": "seconds for one DNS lookup",
    "drain-timeout": "seconds open connections get to finish on SIGTERM",
    "dns-min-ttl": "shortest time an answer is cached, seconds",
    "dns-max-ttl": "longest time an answer is cached, seconds",
    "reload-interval": "seconds between checks of the allowlist files for changes (0: SIGHUP only)",
}
_INTS = {
    "max-header-bytes": "largest request head accepted, bytes",
    "max-connections": "most client connections open at once; more get 503",
    "max-connections-per-client": "most connections open at once from one client IP; more get 503",
}
# The defaults live in Config alone.
_DEFAULTS = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(Config)}


def _env_list(name: str) -> list[str]:
    value = env_default(name)
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egressd", description="Egress FQDN-filtering proxy.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--listen", default=env_default("listen", "127.0.0.1:3128"), help="IP:PORT for proxy clients")
    run.add_argument("--admin-listen", default=env_default("admin-listen", "127.0.0.1:15020"),
                     help="IP:PORT for /metrics /healthz /readyz ('off' to disable)")
    run.add_argument("--allowlists", default=env_default("allowlists", "allowlists"), help="allowlists directory")
    run.add_argument("--service", default=env_default("service"), help="the service this proxy serves")
    run.add_argument("--mode", choices=["enforce", "audit"], default=env_default("mode"),
                     help="override the mode of the service's allowlist")
    run.add_argument("--allow-cidr", action="append", default=None,
                     help="re-admit an address range the proxy would refuse (repeatable)")
    run.add_argument("--resolver", action="append", default=None,
                     help="DNS server IP[:PORT] (repeatable; default: /etc/resolv.conf)")
    run.add_argument("--audit-log", default=env_default("audit-log"), help="append audit records here (default stdout)")
    run.add_argument("--workers", type=int, default=env_default("workers", str(os.cpu_count() or 1)),
                     help="worker processes sharing the listen port (default: number of CPUs)")
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--control-fd", type=int, default=None, help=argparse.SUPPRESS)
    for flags, kind in ((_FLOATS, float), (_INTS, int)):
        for name, text in flags.items():
            default = str(_DEFAULTS[name])
            run.add_argument("--" + name, type=kind, default=env_default(name, default), help=f"{text} ({default})")

    validate = sub.add_parser("validate", help="check an allowlists directory; exit 1 listing every error")
    validate.add_argument("path", nargs="?", default="allowlists")

    check = sub.add_parser("check", help="decide one destination: exit 0 allow, 1 deny")
    check.add_argument("--allowlists", default=env_default("allowlists", "allowlists"))
    check.add_argument("--service", default=env_default("service"), required=env_default("service") is None)
    check.add_argument("--mode", choices=["enforce", "audit"], default=None)
    check.add_argument("destination", help="HOST[:PORT], port 443 when omitted")

    demo = sub.add_parser("demo", help="run the offline demo and print each decision")
    demo.add_argument("--serve", action="store_true", help="keep the demo proxy up for your own curl -x")
    demo.add_argument("--listen", default="127.0.0.1:3128", help="proxy address with --serve")
    demo.add_argument("--allowlists", default=env_default("allowlists", "allowlists"))
    return parser


def config_from(args: argparse.Namespace) -> Config:
    if not args.service:
        raise ConfigError("--service is required (or EGRESSD_SERVICE): the service whose allowlist applies")
    admin = None if args.admin_listen in ("off", "") else parse_hostport(args.admin_listen, "--admin-listen", 15020)
    cidrs = []
    for text in args.allow_cidr if args.allow_cidr is not None else _env_list("allow-cidr"):
        try:
            cidrs.append(parse_cidr(text))
        except ValueError as exc:
            raise ConfigError(f"--allow-cidr: {exc}") from None
    resolvers = args.resolver if args.resolver is not None else _env_list("resolver")
    extra = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name in (*_FLOATS, *_INTS)}
    return Config(
        allowlists=Path(args.allowlists),
        service=args.service,
        listen=parse_hostport(args.listen, "--listen", 3128),
        admin_listen=admin,
        mode=Mode(args.mode) if args.mode else None,
        allow_cidrs=tuple(cidrs),
        resolvers=tuple(parse_hostport(r, "--resolver", 53) for r in resolvers),
        audit_log=args.audit_log,
        workers=args.workers,
        reuse_port=args.reuse_port,
        control_fd=args.control_fd,
        **extra,
    )


def cmd_validate(path: str) -> int:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            return cmd_validate(args.path)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "demo":
            from egressd import demo

            return demo.main(Path(args.allowlists), serve=args.serve, listen=args.listen)
        from egressd import app

        return app.run(config_from(args), argv=sys.argv[2:] if argv is None else argv[1:])
    except ConfigError as exc:
        print(f"egressd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
