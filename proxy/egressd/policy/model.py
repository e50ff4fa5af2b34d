"""The compiled policy and the values a decision is made of.

Everything here is immutable: a Policy is built once per (re)load by
:mod:`egressd.policy.loader` and swapped in whole; a Decision is made once by
:func:`egressd.policy.decide.decide` and never edited afterwards.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egressd.hostport import IPAddress
    from egressd.identity import Identity
    from egressd.inspect.rules import Inspect
    from egressd.policy.identities import IdentityIndex
    from egressd.policy.match import RuleSet

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = frozenset({443})
TLS_PORT = 443


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


class Mode(enum.Enum):
    ENFORCE = "enforce"
    AUDIT = "audit"


class Reason(enum.Enum):
    """Why a connection ended the way it did: a closed set, asserted by tests and used as a metric label."""

    ALLOWED = "allowed"
    NOT_ALLOWLISTED = "not_allowlisted"
    PORT_NOT_ALLOWED = "port_not_allowed"
    DENYLISTED = "denylisted"
    SNI_MISMATCH = "sni_mismatch"
    SNI_MISSING = "sni_missing"
    HOST_MISMATCH = "host_mismatch"
    BAD_REQUEST = "bad_request"
    FORBIDDEN_ADDRESS = "forbidden_address"
    DNS_FAILURE = "dns_failure"
    UPSTREAM_FAILURE = "upstream_failure"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    NO_IDENTITY = "no_identity"
    OVERLOADED = "overloaded"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    BAD_IDENTITY = "bad_identity"  # credentials were presented and are not valid
    NO_NAME = "no_name"  # transparent: neither SNI nor an HTTP Host names the destination, and no cidr rule
    PASSTHROUGH = "passthrough"  # DNS filter: a name under a --dns-passthrough suffix, forwarded unchecked
    REQUEST_NOT_ALLOWED = "request_not_allowed"  # inspect mode: no inspect: entry allows the method and path


# Reasons that `mode: audit` turns into an allow with would_deny=true. Everything
# else (global deny, address rules, name binding, parse errors) still denies.
AUDITABLE_REASONS = frozenset({Reason.NOT_ALLOWLISTED, Reason.PORT_NOT_ALLOWED})


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny entry, with the file:line it came from.

    Exactly one of ``host`` (a canonical pattern: ``name``, ``*.name``,
    ``**.name``, or a name with whole ``*`` labels inside such as
    ``ec2.*.amazonaws.com``) and ``cidr`` is set. ``ports`` is None for "any port" (deny
    rules). ``tls`` None means "TLS on port 443 only". ``column`` (1-based, None
    when unknown) points tools such as ``egressd validate`` at the rule; it takes
    no part in equality, and ``source`` stays ``file:line`` as records print it.
    ``inspect`` (allow host rules only) lists the requests an inspected connection
    may make (:mod:`egressd.inspect.rules`); None: the name is not inspected.
    """

    source: str
    host: str | None = None
    cidr: IPNetwork | None = None
    ports: frozenset[int] | None = DEFAULT_PORTS
    tls: bool | None = None
    column: int | None = field(default=None, compare=False)
    inspect: Inspect | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.cidr is None):
            raise ValueError("a rule has exactly one of host and cidr")
        if self.inspect is not None and self.host is None:
            raise ValueError("only a host rule is inspected")

    def allows_port(self, port: int) -> bool:
        return self.ports is None or port in self.ports

    def requires_tls(self, port: int) -> bool:
        return port == TLS_PORT if self.tls is None else self.tls

    @property
    def pattern(self) -> str:
        return self.host if self.host is not None else str(self.cidr)


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    """One entry of a service file's ``identities:``, with the file and line it came from.

    Either a Kubernetes service account (``namespace`` and ``serviceaccount``,
    both set) or a range of client addresses (``cidr``), never both.
    """

    file: str
    line: int
    namespace: str | None = None
    serviceaccount: str | None = None
    cidr: IPNetwork | None = None

    def __post_init__(self) -> None:
        if (self.namespace is None) != (self.serviceaccount is None):
            raise ValueError("a service account identity has both namespace and serviceaccount")
        if (self.namespace is None) == (self.cidr is None):
            raise ValueError("an identity is a service account or a cidr, not both or neither")

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def pattern(self) -> str:
        """``namespace/serviceaccount`` or the range, as messages print it."""
        return str(self.cidr) if self.cidr is not None else f"{self.namespace}/{self.serviceaccount}"


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    name: str
    mode: Mode
    allow: RuleSet
    source: str
    identities: tuple[ServiceIdentity, ...] = ()  # who the service is for; () = only --service reaches it


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole loaded allowlists directory. ``version`` is a hash of the files' bytes.

    ``identities`` indexes every service's ``identities:`` for the identify
    step; :meth:`service_for` and :meth:`cidr_identity` are its lookups.
    """

    services: Mapping[str, ServicePolicy]
    global_allow: RuleSet
    global_deny: RuleSet
    allow_cidrs: tuple[IPNetwork, ...]
    version: str
    files: tuple[str, ...]
    identities: IdentityIndex

    def service_for(self, identity: Identity) -> str | None:
        """The service ``identity`` is, or None (see :meth:`egressd.policy.identities.IdentityIndex.service_for`)."""
        return self.identities.service_for(identity)

    def cidr_identity(self, ip: IPAddress | str) -> tuple[str, Identity] | None:
        """The service whose identity range contains the client address ``ip``, with a ``cidr`` Identity, or None."""
        return self.identities.cidr_identity(ip)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of the policy step: a verdict, a reason from the closed set, and the rule that matched.

    :attr:`inspect` says whether an allowed connection must be inspected, and with which entries.
    """

    verdict: Verdict
    reason: Reason
    rule: Rule | None = None
    would_deny: bool = False
    tls_required: bool = False

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def source(self) -> str | None:
        return self.rule.source if self.rule is not None else None

    @property
    def inspect(self) -> Inspect | None:
        """The requests an allowed connection may make (the rule's ``inspect:``), or None: a blind tunnel.

        When several inspected rules match, :func:`egressd.policy.decide.decide` gives the first of them with
        the entries of all. Not a field, so that deciding a connection costs what it did before inspect mode.
        """
        return self.rule.inspect if self.rule is not None and self.reason is Reason.ALLOWED else None
