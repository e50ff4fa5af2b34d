"""Command line: argument and environment parsing only, one module per subcommand group.

``egressd run``       the proxy (:mod:`egressd.cli.run`; every flag also reads EGRESSD_<FLAG>,
                      e.g. EGRESSD_SERVICE; repeatable flags take a comma-separated list there)
``egressd sidecar``   ``run`` with the defaults of a container injected into a pod
``egressd validate``  load an allowlists directory, list every error and warning, exit 1 on an error
                      (``--strict``: on a warning too) (:mod:`egressd.cli.policy`)
``egressd check``     decide one destination for one service: exit 0 allow, 1 deny
``egressd diff``      what a change to the allowlists opens up, per service (:mod:`egressd.cli.review`)
``egressd test``      run the policy tests of allowlists/tests/ (:mod:`egressd.cli.policytest`)
``egressd suggest``   propose allowlist additions from audit records (:mod:`egressd.cli.suggest`)
``egressd audit verify``  check the chain and signed checkpoints of audit logs; ``audit keygen`` makes the
                      signing key (:mod:`egressd.cli.audit`)
``egressd demo``      the offline demo (its own DNS server and HTTPS origins; ``--sidecar``: in a simulated pod;
                      ``--inspect``: inspect mode)
``egressd init-iptables``  install the pod's iptables rules, in an init container (:mod:`egressd.cli.iptables`)
``egressd inject-webhook``  the mutating admission webhook that injects the sidecar (:mod:`egressd.cli.webhook`)
``egressd inspect-ca init DIR``  make a CA for trying inspect mode (:mod:`egressd.cli.inspect`)
``egressd allowlist-sync``  copy the allowlist ConfigMap into every namespace labelled for injection
                            (:mod:`egressd.cli.sync`)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from egressd.cli import audit, inspect, iptables, policy, policytest, review, run, suggest, sync, webhook
from egressd.config import ConfigError, env_default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egressd", description="Egress FQDN-filtering proxy.")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_run_flags(sub.add_parser("run", help="run the proxy"), run.RUN)
    run.add_run_flags(
        sub.add_parser("sidecar", help="run the proxy with the defaults of a pod's sidecar (transparent and DNS "
                       "listeners on loopback, admin on 0.0.0.0:15020, one worker)"),
        run.SIDECAR,
    )
    policy.add_parsers(sub)
    review.add_parser(sub)
    policytest.add_parser(sub)
    suggest.add_parser(sub)
    audit.add_parser(sub)
    iptables.add_parser(sub)
    webhook.add_parser(sub)
    sync.add_parser(sub)
    inspect.add_parser(sub)
    demo = sub.add_parser("demo", help="run the offline demo and print each decision")
    demo.add_argument("--serve", action="store_true", help="keep the demo proxy up for your own curl -x")
    demo.add_argument("--sidecar", action="store_true",
                      help="sidecar mode in a simulated pod: init-iptables, egressd sidecar, an app with no proxy "
                      "settings (root)")
    demo.add_argument("--inspect", action="store_true",
                      help="inspect mode: requests to an allowed name decided by method and path (Python 3.12+)")
    demo.add_argument("--listen", default="127.0.0.1:3128", help="proxy address with --serve")
    demo.add_argument("--allowlists", default=env_default("allowlists", "allowlists"))
    return parser


# Each subcommand that only needs its parsed arguments; run, sidecar and demo are dispatched in main().
_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": policy.cmd_validate, "check": policy.cmd_check, "diff": review.cmd, "test": policytest.cmd,
    "suggest": suggest.cmd, "audit": audit.cmd, "init-iptables": iptables.cmd_init, "inject-webhook": webhook.cmd,
    "allowlist-sync": sync.cmd, "inspect-ca": inspect.cmd,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = _HANDLERS.get(args.command)
        if handler is not None:
            return handler(args)
        if args.command == "demo" and args.inspect:
            from egressd import demo_inspect

            return demo_inspect.main()
        if args.command == "demo" and args.sidecar:
            from egressd import demo_sidecar

            return demo_sidecar.main(Path(args.allowlists))
        if args.command == "demo":
            from egressd import demo

            return demo.main(Path(args.allowlists), serve=args.serve, listen=args.listen)
        from egressd import app

        return app.run(run.config_from(args), argv=sys.argv[2:] if argv is None else argv[1:])
    except ConfigError as exc:
        print(f"egressd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
