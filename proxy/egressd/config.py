"""The frozen runtime configuration, validated once when it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from egressd.hostport import BadDestination, parse_ip
from egressd.identity import SOURCES
from egressd.policy.model import IPNetwork, Mode

HostPort = tuple[str, int]
AUDIT_FORMATS = ("native", "ecs", "ocsf")


class ConfigError(ValueError):
    """A flag or environment value that cannot be used; the message names it and the fix."""


@dataclass(frozen=True, slots=True)
class Config:
    allowlists: Path
    service: str | None  # a fixed identity (the sidecar); None: identify each client by --identity
    listen: HostPort | None = ("127.0.0.1", 3128)  # the explicit listener; None: off
    admin_listen: HostPort | None = ("127.0.0.1", 15020)
    transparent_listen: tuple[HostPort, ...] = ()  # connections redirected by iptables (sidecar)
    dns_listen: tuple[HostPort, ...] = ()  # the DNS filter, UDP and TCP (sidecar)
    dns_passthrough: tuple[str, ...] = ("cluster.local",)  # suffixes the DNS filter always forwards
    dns_audit: str = "all"  # which DNS queries get a record: all, or denied only
    identity: tuple[str, ...] = ("token", "cidr")  # identity sources in order, when there is no --service
    token_issuer: str | None = None
    token_audience: str = "egressd"
    token_leeway: float = 30.0
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_ca: str | None = None
    jwks_token_file: str | None = None
    kubeconfig: str | None = None
    pod_index_max_stale: float = 60.0
    mode: Mode | None = None
    allow_cidrs: tuple[IPNetwork, ...] = ()
    resolvers: tuple[HostPort, ...] = ()
    audit_log: str | None = None
    audit_signing_key: str | None = None  # PEM PKCS#8 Ed25519: checkpoints are signed with it
    audit_checkpoint_records: int = 1000  # a checkpoint after this many records ...
    audit_checkpoint_seconds: float = 60.0  # ... or this long after the last one, when records were written
    audit_format: str = "native"  # native, ecs or ocsf
    inspect_ca_cert: str | None = None  # inspect mode: the CA that signs the leaf certificates apps must trust
    inspect_ca_key: str | None = None
    inspect_upstream_ca: str | None = None  # verify origins against this instead of the system trust store
    inspect_log_query: bool = False  # keep the query string in egress.request records
    header_timeout: float = 10.0
    hello_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    dns_timeout: float = 2.0
    drain_timeout: float = 10.0
    max_header_bytes: int = 16384
    max_connections: int = 4096
    max_connections_per_client: int = 256
    max_pending_heads: int = 1024  # heads (request head, ClientHello) arriving at once; see egressd.limits
    max_pending_lookups: int = 1024  # names being looked up at once
    max_addresses_per_name: int = 50  # addresses kept of one name's answers (Cilium keeps 50 too)
    dns_max_qps_per_client: float = 2000.0  # queries a second one client may send the DNS filter
    dns_max_tcp_connections: int = 256  # TCP connections to the DNS filter at once
    dns_min_ttl: float = 5.0
    dns_max_ttl: float = 300.0
    reload_interval: float = 2.0
    workers: int = 1
    reuse_port: bool = False
    control_fd: int | None = None

    def __post_init__(self) -> None:
        for name in ("header_timeout", "hello_timeout", "connect_timeout", "idle_timeout", "dns_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds")
        if self.drain_timeout < 0 or self.reload_interval < 0:
            raise ConfigError("--drain-timeout and --reload-interval must not be negative")
        if self.max_header_bytes < 1024:
            raise ConfigError("--max-header-bytes must be at least 1024")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.workers > 1 and (self.listen is None or self.transparent_listen or self.dns_listen):
            raise ConfigError(
                "--workers above 1 shares the explicit --listen port only: give --workers 1 with "
                "--transparent-listen or --dns-listen, and a --listen address"
            )
        if not (self.listen or self.transparent_listen or self.dns_listen):
            raise ConfigError("every listener is off: give --listen, --transparent-listen or --dns-listen")
        if self.service is None:
            self._check_identity()
        if self.dns_audit not in ("all", "denied"):
            raise ConfigError("--dns-audit must be 'all' or 'denied'")
        limits = ("max_connections", "max_connections_per_client", "max_pending_heads", "max_pending_lookups",
                  "max_addresses_per_name", "dns_max_qps_per_client", "dns_max_tcp_connections")
        for name in limits:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; every limit is always on")
        if not 0 <= self.dns_min_ttl <= self.dns_max_ttl:
            raise ConfigError("--dns-min-ttl must be between 0 and --dns-max-ttl")
        if self.audit_checkpoint_records < 1 or self.audit_checkpoint_seconds <= 0:
            raise ConfigError("--audit-checkpoint-records must be at least 1 and --audit-checkpoint-seconds positive")
        if bool(self.inspect_ca_cert) != bool(self.inspect_ca_key):
            raise ConfigError("give --inspect-ca-cert and --inspect-ca-key together ('egressd inspect-ca init DIR' "
                              "makes a pair for trials)")
        if self.audit_format not in AUDIT_FORMATS:
            raise ConfigError(f"--audit-format must be one of {', '.join(AUDIT_FORMATS)}")

    def _check_identity(self) -> None:
        """Without --service, clients are identified by --identity; each source needs its settings."""
        if not self.identity:
            raise ConfigError("give --service NAME (a fixed identity, the sidecar) or --identity SOURCES (a gateway)")
        unknown = [s for s in self.identity if s not in SOURCES]
        if unknown or len(set(self.identity)) != len(self.identity):
            raise ConfigError(f"--identity {','.join(self.identity)}: use each of {', '.join(SOURCES)} at most once")
        if "token" in self.identity:
            if not self.token_issuer:
                raise ConfigError("the token identity needs --token-issuer (the iss of the cluster's tokens)")
            if bool(self.jwks_file) == bool(self.jwks_url):
                raise ConfigError("the token identity needs one of --jwks-file and --jwks-url (the keys that sign "
                                  "the cluster's tokens)")
        if self.token_leeway < 0 or self.pod_index_max_stale <= 0:
            raise ConfigError("--token-leeway must not be negative and --pod-index-max-stale must be positive")


def parse_hostport(text: str, what: str, default_port: int | None = None) -> HostPort:
    """Parse an IP[:port] flag value (``[v6]:port`` or a bare IPv6 address); port 0 means "any free port"."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "bad")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    try:
        ip = parse_ip(host)
    except BadDestination as exc:
        raise ConfigError(f"{what} {text!r}: {exc}") from None
    if ip is None:
        raise ConfigError(f"{what} {text!r}: give an IP address, not a name (e.g. 127.0.0.1:{default_port or 8080})")
    if port_text is None and default_port is not None:
        return (str(ip), default_port)
    if port_text is None or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{what} {text!r}: expected IP:PORT with a port 0-65535")
    return (str(ip), int(port_text))


def system_resolvers(path: str = "/etc/resolv.conf") -> tuple[HostPort, ...]:
    """The nameservers of resolv.conf, port 53; empty if the file has none."""
    found = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        found.append(parse_hostport(parts[1].split("%")[0], "nameserver", 53))
                    except ConfigError:
                        continue
    except OSError:
        return ()
    return tuple(found)


def env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get("EGRESSD_" + name.upper().replace("-", "_"), default)
