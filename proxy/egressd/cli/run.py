"""``egressd run`` and ``egressd sidecar``: the proxy's flags, each also read from ``EGRESSD_<FLAG>``.

``sidecar`` is ``run`` with the defaults of a container injected into a pod
(transparent and DNS listeners on loopback, admin on the pod's address, one
worker), so the injected container needs only ``--service`` and ``--allowlists``.
Repeatable flags take a comma-separated list in their variable; ``off`` turns a
listener off.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from egressd.addresses import parse_cidr
from egressd.config import AUDIT_FORMATS, Config, ConfigError, HostPort, env_default, parse_hostport
from egressd.policy.model import Mode

_FLOATS = {
    "header-timeout": "seconds to receive a complete request head",
    "hello-timeout": "seconds to receive the first bytes (TLS ClientHello or HTTP head) that name the destination",
    "connect-timeout": "seconds to open the upstream connection (all addresses)",
    "idle-timeout": "seconds a tunnel or kept-alive connection may stay silent",
    "dns-timeout": "seconds for one DNS lookup",
    "drain-timeout": "seconds open connections get to finish on SIGTERM",
    "dns-min-ttl": "shortest time an answer is cached, seconds",
    "dns-max-ttl": "longest time an answer is cached, seconds",
    "reload-interval": "seconds between checks of the allowlist files for changes (0: SIGHUP only)",
    "audit-checkpoint-seconds": "seconds after which a checkpoint follows the records written since the last one",
    "dns-max-qps-per-client": "DNS filter queries a second from one client (a burst of 2 s more); more get REFUSED",
}
_INTS = {
    "max-header-bytes": "largest request head accepted, bytes",
    "max-connections": "most client connections open at once; more get 503",
    "max-connections-per-client": "most connections open at once from one client IP; more get 503",
    "max-pending-heads": "most request heads and ClientHellos arriving at once; past it the oldest of the client "
    "with the most is reset",
    "max-pending-lookups": "most names being looked up at once; a new name past it gets 503",
    "max-addresses-per-name": "addresses kept of one name's DNS answers; the rest are never dialled",
    "dns-max-tcp-connections": "most TCP connections to the DNS filter; past it the idlest of the client with the "
    "most is closed",
    "audit-checkpoint-records": "records after which a checkpoint follows",
}
# The defaults live in Config alone.
_DEFAULTS = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(Config)}


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What differs between ``run`` and ``sidecar``."""

    listen: str
    admin_listen: str
    transparent_listen: str
    dns_listen: str
    workers: str


RUN = Defaults("127.0.0.1:3128", "127.0.0.1:15020", "off", "off", str(os.cpu_count() or 1))
SIDECAR = Defaults("127.0.0.1:3128", "0.0.0.0:15020", "127.0.0.1:15001,[::1]:15001", "127.0.0.1:15053,[::1]:15053", "1")


def env_list(name: str, default: str | None = None) -> list[str]:
    value = env_default(name, default)
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def add_run_flags(parser: argparse.ArgumentParser, defaults: Defaults) -> None:
    parser.add_argument("--listen", default=env_default("listen", defaults.listen),
                        help=f"IP:PORT for explicit proxy clients, 'off' for none ({defaults.listen})")
    parser.add_argument("--admin-listen", default=env_default("admin-listen", defaults.admin_listen),
                        help=f"IP:PORT for /metrics /healthz /readyz, 'off' for none ({defaults.admin_listen})")
    parser.add_argument("--transparent-listen", action="append", default=None,
                        help="IP:PORT for connections redirected by iptables (repeatable; 'off' for none; "
                        f"{defaults.transparent_listen})")
    parser.add_argument("--dns-listen", action="append", default=None,
                        help="IP:PORT for the DNS filter, UDP and TCP (repeatable; 'off' for none; "
                        f"{defaults.dns_listen})")
    parser.add_argument("--dns-passthrough", action="append", default=None,
                        help="a suffix whose names the DNS filter always forwards (repeatable; cluster.local)")
    parser.add_argument("--dns-audit", choices=["all", "denied"], default=env_default("dns-audit", "all"),
                        help="which DNS queries get an egress.dns record (all)")
    parser.add_argument("--allowlists", default=env_default("allowlists", "allowlists"), help="allowlists directory")
    parser.add_argument("--service", default=env_default("service"),
                        help="a fixed identity: every client is this service (the sidecar); without it, --identity")
    parser.add_argument("--identity", default=env_default("identity", "token,cidr"),
                        help="identity sources, in order, when there is no --service: token, pod-ip, cidr (token,cidr)")
    parser.add_argument("--token-issuer", default=env_default("token-issuer"),
                        help="the iss of service-account tokens (required with the token source)")
    parser.add_argument("--token-audience", default=env_default("token-audience", "egressd"),
                        help="an aud tokens must carry (egressd)")
    parser.add_argument("--token-leeway", type=float, default=env_default("token-leeway", "30"),
                        help="seconds of clock skew allowed on exp, nbf and iat (30)")
    parser.add_argument("--jwks-file", default=env_default("jwks-file"),
                        help="the keys that sign tokens, a JWKS file (re-read on change)")
    parser.add_argument("--jwks-url", default=env_default("jwks-url"),
                        help="the keys that sign tokens, fetched and refreshed (the API server's /openid/v1/jwks)")
    parser.add_argument("--jwks-ca", default=env_default("jwks-ca"), help="CA file to verify --jwks-url with")
    parser.add_argument("--jwks-token-file", default=env_default("jwks-token-file"),
                        help="a bearer token file sent to --jwks-url (re-read each time)")
    parser.add_argument("--kubeconfig", default=env_default("kubeconfig"),
                        help="the pod-ip source's API server (default: the in-cluster configuration)")
    parser.add_argument("--pod-index-max-stale", type=float, default=env_default("pod-index-max-stale", "60"),
                        help="seconds without a working list/watch after which pod-ip identifies no one (60)")
    parser.add_argument("--mode", choices=["enforce", "audit"], default=env_default("mode"),
                        help="override the mode of the service's allowlist")
    parser.add_argument("--allow-cidr", action="append", default=None,
                        help="re-admit an address range the proxy would refuse (repeatable)")
    parser.add_argument("--resolver", action="append", default=None,
                        help="DNS server IP[:PORT] (repeatable; default: /etc/resolv.conf)")
    parser.add_argument("--audit-log", default=env_default("audit-log"),
                        help="append audit records here (default stdout)")
    parser.add_argument("--audit-signing-key", default=env_default("audit-signing-key"),
                        help="sign the audit checkpoints with this Ed25519 key (PEM PKCS#8; 'egressd audit keygen'); "
                        "without it they are chained but unsigned")
    parser.add_argument("--audit-format", choices=AUDIT_FORMATS, default=env_default("audit-format", "native"),
                        help="audit records as egressd's own fields, Elastic Common Schema or OCSF (native)")
    parser.add_argument("--inspect-ca-cert", default=env_default("inspect-ca-cert"),
                        help="inspect mode: the CA certificate (PEM) signing the leaves apps see; apps must trust it")
    parser.add_argument("--inspect-ca-key", default=env_default("inspect-ca-key"),
                        help="inspect mode: the CA's private key (PEM), readable by egressd's UID only")
    parser.add_argument("--inspect-upstream-ca", default=env_default("inspect-upstream-ca"),
                        help="inspect mode: verify origins against this CA bundle (default: the system trust store)")
    parser.add_argument("--inspect-log-query", action="store_true",
                        default=env_default("inspect-log-query", "") in ("1", "true", "yes"),
                        help="inspect mode: keep query strings in egress.request records (default: path only)")
    parser.add_argument("--workers", type=int, default=env_default("workers", defaults.workers),
                        help=f"worker processes sharing the listen port ({defaults.workers})")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(defaults=defaults)
    for flags, kind in ((_FLOATS, float), (_INTS, int)):
        for name, text in flags.items():
            default = str(_DEFAULTS[name])
            parser.add_argument("--" + name, type=kind, default=env_default(name, default), help=f"{text} ({default})")


def _addresses(values: list[str] | None, name: str, default: str, default_port: int) -> tuple[HostPort, ...]:
    """A repeatable listener flag: the flag's values, else its variable, else the default; 'off' means none."""
    texts = values if values is not None else env_list(name, default)
    if not texts or any(t in ("off", "") for t in texts):
        return ()
    return tuple(parse_hostport(t, "--" + name, default_port) for t in texts)


def _address(text: str, name: str, default_port: int) -> HostPort | None:
    return None if text in ("off", "") else parse_hostport(text, "--" + name, default_port)


def config_from(args: argparse.Namespace) -> Config:
    defaults: Defaults = args.defaults
    cidrs = []
    for text in args.allow_cidr if args.allow_cidr is not None else env_list("allow-cidr"):
        try:
            cidrs.append(parse_cidr(text))
        except ValueError as exc:
            raise ConfigError(f"--allow-cidr: {exc}") from None
    resolvers = args.resolver if args.resolver is not None else env_list("resolver")
    passthrough = args.dns_passthrough if args.dns_passthrough is not None else env_list("dns-passthrough")
    extra = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name in (*_FLOATS, *_INTS)}
    return Config(
        allowlists=Path(args.allowlists),
        service=args.service or None,
        identity=tuple(t.strip() for t in args.identity.split(",") if t.strip()),
        token_issuer=args.token_issuer,
        token_audience=args.token_audience,
        token_leeway=args.token_leeway,
        jwks_file=args.jwks_file,
        jwks_url=args.jwks_url,
        jwks_ca=args.jwks_ca,
        jwks_token_file=args.jwks_token_file,
        kubeconfig=args.kubeconfig,
        pod_index_max_stale=args.pod_index_max_stale,
        listen=_address(args.listen, "listen", 3128),
        admin_listen=_address(args.admin_listen, "admin-listen", 15020),
        transparent_listen=_addresses(
            args.transparent_listen, "transparent-listen", defaults.transparent_listen, 15001
        ),
        dns_listen=_addresses(args.dns_listen, "dns-listen", defaults.dns_listen, 15053),
        dns_passthrough=tuple(passthrough) if passthrough else _DEFAULTS["dns-passthrough"],
        dns_audit=args.dns_audit,
        mode=Mode(args.mode) if args.mode else None,
        allow_cidrs=tuple(cidrs),
        resolvers=tuple(parse_hostport(r, "--resolver", 53) for r in resolvers),
        audit_log=args.audit_log,
        audit_signing_key=args.audit_signing_key or None,
        audit_format=args.audit_format,
        inspect_ca_cert=args.inspect_ca_cert or None,
        inspect_ca_key=args.inspect_ca_key or None,
        inspect_upstream_ca=args.inspect_upstream_ca or None,
        inspect_log_query=args.inspect_log_query,
        workers=args.workers,
        reuse_port=args.reuse_port,
        control_fd=args.control_fd,
        **extra,
    )
