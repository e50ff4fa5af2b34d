"""Who a service is for: the ``identities:`` of service files, read, checked across files, and indexed.

    payments-api.yaml: identities: [{namespace: payments, serviceAccount: payments-api}, {cidr: 10.20.0.0/24}]

    Identity(source="token" or "pod-ip", namespace, serviceaccount) --service_for--> "payments-api"
    client address 10.20.0.7 --cidr_identity--> ("payments-api", Identity(source="cidr", cidr="10.20.0.0/24"))
    Identity(source="fixed", service="payments-api")  --service_for--> "payments-api"  (--service, the sidecar)

A service account and a client address belong to at most one service: the
loader refuses a (namespace, serviceAccount) listed twice and identity ranges
that overlap, in one file or across files (:func:`clashes`), so every lookup
has at most one answer. Nothing is guessed from names: a service file without
``identities:`` is reached only through ``--service``, whatever its service
accounts are called.

The lookups run once per connection and cost little: service accounts sit in
one dict; the ranges, disjoint by the rule above, in one table per address
family of sorted integer bounds, searched with ``bisect`` (one binary search,
whatever the number of ranges). An IPv4 client seen by a dual-stack listener as
``::ffff:a.b.c.d`` is looked up as ``a.b.c.d``, always: identity ranges written
in that IPv4-mapped form are refused at load (they would never match), and an
IPv6 range around ``::ffff:0:0/96`` (such as ``::/64``) does not cover IPv4 clients.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_right
from collections.abc import Iterable

from yaml.nodes import Node

from egressd.addresses import parse_cidr
from egressd.hostport import IPAddress
from egressd.identity import Identity
from egressd.policy.model import IPNetwork, ServiceIdentity, ServicePolicy
from egressd.policy.nodes import File, LoadError

__all__ = ["IDENTITY_KEYS", "IdentityIndex", "clashes", "parse_identities"]

IDENTITY_KEYS = ("namespace", "serviceAccount", "cidr")
ACCOUNT_SOURCES = frozenset({"token", "pod-ip"})

_MISSPELLED = ("serviceaccount", "service_account", "service-account", "serviceAccountName")
_IDENTITY_HINTS = {
    key: f'key "{key}" in an identity: write serviceAccount: (as Kubernetes spells it)' for key in _MISSPELLED
}
_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")  # DNS-1123 label
_SUBDOMAIN_PART = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_SUBDOMAIN_PART}(?:\.{_SUBDOMAIN_PART})*\Z")  # DNS-1123 subdomain, at most 253
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

Claim = tuple[str, ServiceIdentity]  # (service, one of its identities)


def parse_identities(file: File, node: Node) -> tuple[ServiceIdentity, ...]:
    """The ``identities:`` list of a service file; every problem is recorded in ``file``, bad entries left out."""
    example = "[{namespace: NAMESPACE, serviceAccount: NAME}] or [] for none"
    parsed = (_parse_identity(file, item) for item in file.sequence(node, "identities", example))
    return tuple(identity for identity in parsed if identity is not None)


def _parse_identity(file: File, node: Node) -> ServiceIdentity | None:
    errors_before = len(file.errors)
    fields = file.mapping(node, "an identity", IDENTITY_KEYS, _IDENTITY_HINTS)
    if fields is None or len(file.errors) > errors_before:
        return None
    line = node.start_mark.line + 1
    account = "namespace" in fields or "serviceAccount" in fields
    if "cidr" in fields:
        if account:
            either = "an identity is either namespace: with serviceAccount:, or cidr:"
            file.error(node, f"{either}, not both; write two identities")
            return None
        cidr = file.convert(fields["cidr"][1], "identity cidr", _client_network)
        return ServiceIdentity(file.path, line, cidr=cidr) if cidr is not None else None
    if not account:
        file.error(node, "an identity needs namespace: and serviceAccount:, or cidr:")
        return None
    for have, missing in (("namespace", "serviceAccount"), ("serviceAccount", "namespace")):
        if missing not in fields:
            why = "a service account is named within its namespace"
            file.error(node, f"an identity with {have}: needs {missing}: too ({why}); add {missing}: to it")
    namespace = file.convert(fields["namespace"][1], "namespace", _namespace) if "namespace" in fields else None
    account_node = fields["serviceAccount"][1] if "serviceAccount" in fields else None
    name = file.convert(account_node, "serviceAccount", _service_account) if account_node is not None else None
    if len(file.errors) > errors_before or namespace is None or name is None:
        return None
    return ServiceIdentity(file.path, line, namespace=namespace, serviceaccount=name)


def clashes(services: Iterable[ServicePolicy]) -> list[LoadError]:
    """An error for every identity that an earlier one (in any file) already claims, at the later one's file:line.

    Two claims clash when they name the same (namespace, serviceAccount) or
    when their ranges overlap (CIDRs overlap only by one containing the other).
    """
    claims = _claims(services)
    errors: list[LoadError] = []
    for first, later in _clashing_pairs(claims):
        identity = claims[later][1]
        errors.append(LoadError(identity.file, identity.line, _clash(*claims[first], identity)))
    return errors


def _clash(first_service: str, first: ServiceIdentity, identity: ServiceIdentity) -> str:
    """What is wrong with ``identity``, given the ``first`` identity (of ``first_service``) it clashes with."""
    what = f"service account {identity.pattern}" if identity.cidr is None else f"identity cidr {identity.pattern}"
    same_file = first.file == identity.file
    if identity.cidr is not None and identity.cidr != first.cidr:
        if same_file:
            return f"{what} overlaps {first.pattern} on line {first.line} of this file; narrow or remove one of them"
        return (
            f"{what} overlaps {first.pattern}, an identity of service {first_service} ({first.source}); "
            "a client address is one service's: narrow or remove one of the ranges"
        )
    if same_file:
        return f"{what} is listed twice (first on line {first.line}); remove one"
    whose = "a service account" if identity.cidr is None else "a client address"
    return (
        f"{what} is already an identity of service {first_service} ({first.source}); "
        f"{whose} is one service's: remove it from one of the two files"
    )


def _claims(services: Iterable[ServicePolicy]) -> list[Claim]:
    """Every (service, identity), in file and line order (entries on one line keep their order)."""
    claims = [(service.name, identity) for service in services for identity in service.identities]
    return sorted(claims, key=lambda claim: (claim[1].file, claim[1].line))


def _clashing_pairs(claims: list[Claim]) -> list[tuple[int, int]]:
    """Index pairs (earlier, later) of ``claims`` naming the same account or overlapping ranges, by the later one.

    Ranges are swept in address order (outer before inner at the same start)
    with a stack of the ranges still open. CIDRs either nest or are disjoint,
    so once the ranges that end before a range's start are popped, the stack
    holds exactly the ranges containing it: each makes a pair with it. The work
    is the number of ranges (times log) plus the number of pairs reported.
    """
    pairs: list[tuple[int, int]] = []
    accounts: dict[tuple[str | None, str | None], int] = {}
    for index, (_, identity) in enumerate(claims):
        if identity.cidr is None:
            first = accounts.setdefault((identity.namespace, identity.serviceaccount), index)
            if first != index:
                pairs.append((first, index))
    open_: list[tuple[int, int, int]] = []  # (family, last address, index)
    for family, start, end, index in sorted(_ranges(claims), key=lambda r: (r[0], r[1], -r[2], r[3])):
        while open_ and (open_[-1][0] != family or open_[-1][1] < start):
            open_.pop()
        pairs.extend((min(other, index), max(other, index)) for _, _, other in open_)
        open_.append((family, end, index))
    return sorted(pairs, key=lambda pair: (pair[1], pair[0]))


def _ranges(claims: list[Claim]) -> list[tuple[int, int, int, int]]:
    """(family, first address, last address, index in ``claims``) of every range claim, addresses as integers."""
    return [
        (net.version, int(net.network_address), int(net.broadcast_address), index)
        for index, (_, identity) in enumerate(claims)
        if (net := identity.cidr) is not None
    ]


class IdentityIndex:
    """The identify step's lookups over every service's identities; immutable, and built only from claims that
    do not clash (the constructor raises ValueError otherwise: the loader reports them first, with file:line)."""

    __slots__ = ("claims", "_accounts", "_cidrs", "_v4", "_v6")

    claims: tuple[Claim, ...]
    _accounts: dict[tuple[str | None, str | None], str]
    _cidrs: dict[str | None, str]
    _v4: tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[str, Identity], ...]]
    _v6: tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[str, Identity], ...]]

    def __init__(self, services: Iterable[ServicePolicy] = ()) -> None:
        claims = _claims(services)
        pairs = _clashing_pairs(claims)
        if pairs:
            shown = ", ".join(f"{claims[a][1].source} and {claims[b][1].source}" for a, b in pairs)
            raise ValueError(f"identities claimed twice: {shown}")
        accounts = {(i.namespace, i.serviceaccount): service for service, i in claims if i.cidr is None}
        tables: dict[int, tuple[list[int], list[int], list[tuple[str, Identity]]]] = {4: ([], [], []), 6: ([], [], [])}
        for family, start, end, index in sorted(_ranges(claims)):
            service, identity = claims[index]
            starts, ends, hits = tables[family]
            starts.append(start)
            ends.append(end)
            hits.append((service, Identity(source="cidr", cidr=str(identity.cidr))))
        setattr_ = object.__setattr__
        setattr_(self, "claims", tuple(claims))
        setattr_(self, "_accounts", accounts)
        cidrs = {identity.cidr: service for _, _, hits in tables.values() for service, identity in hits}
        setattr_(self, "_cidrs", cidrs)
        setattr_(self, "_v4", tuple(tuple(column) for column in tables[4]))
        setattr_(self, "_v6", tuple(tuple(column) for column in tables[6]))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def service_for(self, identity: Identity) -> str | None:
        """The service ``identity`` is, or None (no identity: deny).

        ``token`` and ``pod-ip``: the service whose ``identities:`` list the
        identity's (namespace, serviceaccount). ``cidr``: the service whose
        identity range is ``identity.cidr`` (as :meth:`cidr_identity` made it).
        ``fixed``: ``identity.service`` itself. Any other source: None.
        """
        if identity.source in ACCOUNT_SOURCES:
            return self._accounts.get((identity.namespace, identity.serviceaccount))
        if identity.source == "cidr":
            return self._cidrs.get(identity.cidr)
        if identity.source == "fixed":
            return identity.service
        return None

    def cidr_identity(self, ip: IPAddress | str) -> tuple[str, Identity] | None:
        """The service whose identity range contains the client address ``ip``, and Identity(source="cidr",
        cidr=that range); None when no range does or ``ip`` is not an address. Ranges are disjoint, so the
        range found is the only one, hence the most specific one."""
        if isinstance(ip, str):
            try:
                ip = ipaddress.ip_address(ip)
            except ValueError:
                return None
        if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
            ip = ip.ipv4_mapped  # type: ignore[union-attr]
        starts, ends, hits = self._v4 if ip.version == 4 else self._v6
        value = int(ip)
        index = bisect_right(starts, value) - 1
        if index >= 0 and value <= ends[index]:
            return hits[index]
        return None

    def __len__(self) -> int:
        return len(self.claims)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdentityIndex) and self.claims == other.claims

    def __hash__(self) -> int:
        return hash(self.claims)

    def __repr__(self) -> str:
        return f"IdentityIndex({', '.join(f'{service}: {i.pattern}' for service, i in self.claims)})"


# Scalar parsers: text in, value out, or ValueError with the whole message (what is wrong; what to write).


def _namespace(text: str) -> str:
    if not _LABEL.match(text):
        raise ValueError(
            f'namespace "{text}" is not a Kubernetes namespace name (lower-case letters, digits and "-", '
            f'starting and ending with a letter or digit, at most 63 characters), e.g. "payments"'
        )
    return text


def _service_account(text: str) -> str:
    if len(text) > 253 or not _SUBDOMAIN.match(text):
        raise ValueError(
            f'serviceAccount "{text}" is not a Kubernetes service account name (lower-case letters, digits, "-" '
            f'and ".", each part between dots starting and ending with a letter or digit, at most 253 characters), '
            f'e.g. "payments-api"'
        )
    return text


def _client_network(text: str) -> IPNetwork:
    try:
        network = parse_cidr(text)
    except ValueError as exc:
        raise ValueError(f"invalid identity cidr: {exc}") from None
    if network.prefixlen == 0:
        raise ValueError(f"identity cidr {network} would make every client this service; name the clients' network")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        ipv4 = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
        raise ValueError(
            f'identity cidr "{text}" is an IPv4-mapped IPv6 range; write {ipv4} '
            f"(IPv4 clients are matched by their IPv4 address)"
        )
    return network
