"""Which resolved addresses egressd may dial.

An allowlisted name proves nothing about where its addresses point: a
compromised app (or whoever controls a zone it may reach) can publish an A
record of ``169.254.169.254`` and use the proxy to read cloud credentials, or
aim it at loopback, the pod network or the cluster's Services. So every
address the proxy might dial passes through :func:`check` first, and only
global unicast addresses go through unless an ``allow_cidrs`` entry names
them.

:func:`classify` returns ``None`` for global unicast and otherwise the name of
the forbidden range (``'loopback'``, ``'private'``, ``'metadata'``, ...). It
reads two tables transcribed from the IANA special-purpose registries, not
``ipaddress``'s ``is_global``/``is_private``, whose meaning changed between
Python 3.11 and 3.12. IPv6 forms that carry an IPv4 address are judged by it:

* IPv4-mapped ``::ffff:a.b.c.d`` is always forbidden (a dual-stack socket
  would dial the IPv4 address behind our back): ``'ipv4_mapped'`` or
  ``'ipv4_mapped(<class of a.b.c.d>)'``;
* NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16`` and Teredo ``2001::/32`` are
  forbidden when an embedded IPv4 is: ``'nat64(private)'``,
  ``'6to4(loopback)'``, ``'teredo(link_local)'``.

Lookups are a bisect over precomputed integer ranges. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from egressd.hostport import IPAddress, ip_text

__all__ = ["AddressCheck", "IPNetwork", "check", "classify", "embedded_ipv4", "parse_cidr"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED, _NAT64, _6TO4, _TEREDO = "ipv4_mapped", "nat64", "6to4", "teredo"
_EMBEDDING_FORMS = frozenset({_MAPPED, _NAT64, _6TO4, _TEREDO})
_U32 = 0xFFFFFFFF

# Sources: IANA IPv4 Special-Purpose Address Registry
#   https://www.iana.org/assignments/iana-ipv4-special-registry/
# and IANA IPv6 Special-Purpose Address Registry
#   https://www.iana.org/assignments/iana-ipv6-special-registry/
# Invariants: the most specific network containing an address names it; None
# means global unicast. IPv4 not listed is global. IPv6 starts from "::/0 is
# reserved" with 2000::/3 global, so only global unicast space can be global.
# Deliberately conservative: all of 192.0.0.0/24 and of 2001::/23 outside
# Teredo is forbidden, though IANA marks a few anycast entries there global.
# Embedding forms are looked up here, then judged by their embedded IPv4.
_IPV4_TABLE: tuple[tuple[str, str | None], ...] = (
    ("0.0.0.0/8", "this_network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link_local"),
    ("169.254.169.254/32", "metadata"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf_protocol"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),  # deprecated 6to4 relay anycast
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
)
_IPV6_TABLE: tuple[tuple[str, str | None], ...] = (
    ("::/0", "reserved"),
    ("2000::/3", None),
    ("::/96", "reserved"),  # deprecated IPv4-compatible addresses
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", _MAPPED),
    ("64:ff9b::/96", _NAT64),
    ("64:ff9b:1::/48", "nat64_local"),
    ("100::/64", "discard"),
    ("2001::/23", "ietf_protocol"),
    ("2001::/32", _TEREDO),
    ("2001:2::/48", "benchmarking"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", _6TO4),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "reserved"),  # SRv6 SIDs
    ("fc00::/7", "ula"),
    ("fd00:ec2::254/128", "metadata"),  # AWS instance metadata over IPv6
    ("fe80::/10", "link_local"),
    ("fec0::/10", "site_local"),
    ("ff00::/8", "multicast"),
)

# What each class is, after "<ip> is ". Keys are categories (and outer forms).
_DESCRIPTIONS = {
    "this_network": 'in "this network" (0.0.0.0/8)',
    "private": "private (RFC 1918)",
    "cgnat": "shared address space (CGNAT, RFC 6598)",
    "loopback": "loopback",
    "link_local": "link-local",
    "metadata": "link-local (cloud metadata endpoint)",
    "ietf_protocol": "reserved for IETF protocol assignments",
    "documentation": "reserved for documentation",
    "benchmarking": "reserved for benchmarking",
    "reserved": "reserved",
    "multicast": "multicast",
    "broadcast": "the limited broadcast address",
    "unspecified": "the unspecified address",
    "nat64_local": "in the local-use NAT64 prefix (64:ff9b:1::/48)",
    "discard": "in the discard-only prefix (100::/64)",
    "ula": "unique local (private, RFC 4193)",
    "site_local": "site-local (deprecated)",
    _MAPPED: "an IPv4-mapped address",
    _NAT64: "a NAT64 address",
    _6TO4: "a 6to4 address",
    _TEREDO: "a Teredo address",
}
_V6_METADATA = "unique local (cloud metadata endpoint)"


@dataclass(frozen=True, slots=True)
class _RangeMap:
    """A partition of one address family into [start, next start) ranges, each with a name or None."""

    starts: tuple[int, ...]
    names: tuple[str | None, ...]

    @classmethod
    def build(cls, table: Iterable[tuple[str, str | None]]) -> _RangeMap:
        nets = [(ipaddress.ip_network(text), name) for text, name in table]
        if len({net for net, _ in nets}) != len(nets):
            raise ValueError("address table lists a network twice")
        size = 1 << nets[0][0].max_prefixlen
        bounds = [(int(net.network_address), int(net.broadcast_address) + 1, net.prefixlen, name) for net, name in nets]
        cuts = sorted({0} | {lo for lo, _, _, _ in bounds} | {hi for _, hi, _, _ in bounds if hi < size})
        starts: list[int] = []
        names: list[str | None] = []
        for cut in cuts:
            covering = [(plen, name) for lo, hi, plen, name in bounds if lo <= cut < hi]
            name = max(covering, key=lambda c: c[0])[1] if covering else None
            if not names or names[-1] != name:
                starts.append(cut)
                names.append(name)
        return cls(tuple(starts), tuple(names))

    def lookup(self, value: int) -> str | None:
        return self.names[bisect_right(self.starts, value) - 1]


_V4 = _RangeMap.build(_IPV4_TABLE)
_V6 = _RangeMap.build(_IPV6_TABLE)


def _embedded(form: str | None, value: int) -> tuple[int, ...]:
    """The IPv4 addresses (as integers) inside an IPv6 address of ``form``; Teredo lists client, then server."""
    if form == _MAPPED or form == _NAT64:
        return (value & _U32,)
    if form == _6TO4:
        return ((value >> 80) & _U32,)
    if form == _TEREDO:
        return ((value & _U32) ^ _U32, (value >> 64) & _U32)
    return ()


def classify(ip: IPAddress) -> str | None:
    """None when ``ip`` is global unicast; otherwise the name of the forbidden range it falls in."""
    value = int(ip)
    if ip.version == 4:
        return _V4.lookup(value)
    name = _V6.lookup(value)
    if name not in _EMBEDDING_FORMS:
        return name
    for inner in _embedded(name, value):
        inner_name = _V4.lookup(inner)
        if inner_name is not None:
            return f"{name}({inner_name})"
    return _MAPPED if name == _MAPPED else None


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv4-mapped, NAT64, 6to4 or Teredo (client, server) address carries; () otherwise."""
    if ip.version == 4:
        return ()
    value = int(ip)
    return tuple(ipaddress.IPv4Address(v) for v in _embedded(_V6.lookup(value), value))


def _culprits(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The embedded IPv4 addresses that make ``ip`` forbidden (all of them for a mapped global address)."""
    inner = embedded_ipv4(ip)
    forbidden = tuple(v4 for v4 in inner if classify(v4) is not None)
    return forbidden or inner


@dataclass(frozen=True, slots=True)
class AddressCheck:
    """The verdict on one address: its class, and whether it may be dialled (and which entry re-admitted it)."""

    ip: IPAddress
    category: str | None
    allowed: bool
    allowed_by: IPNetwork | None = None

    def __post_init__(self) -> None:
        if self.category is None and (not self.allowed or self.allowed_by is not None):
            raise ValueError(f"{self.ip}: a global address is allowed outright, never by an allow_cidrs entry")
        if self.category is not None and self.allowed != (self.allowed_by is not None):
            raise ValueError(f"{self.ip}: a forbidden address is allowed exactly when an allow_cidrs entry names it")

    def describe(self) -> str:
        """One line for error bodies and logs, e.g. ``169.254.169.254 is link-local (cloud metadata endpoint)``."""
        if self.category is None:
            return f"{ip_text(self.ip)} is global unicast"
        text = f"{ip_text(self.ip)} is {self._what()}"
        if self.allowed_by is not None:
            text += f"; re-admitted by allow_cidrs entry {self.allowed_by}"
        return text

    def _what(self) -> str:
        if self.category == "metadata" and self.ip.version == 6:
            return _V6_METADATA
        form, _, inner = self.category.partition("(")
        if form not in _EMBEDDING_FORMS:
            return _DESCRIPTIONS.get(self.category, self.category)
        embedded = _culprits(self.ip)[0]
        if not inner:
            return f"{_DESCRIPTIONS[form]} (embedding {embedded}); mapped addresses are never dialled"
        return f"{_DESCRIPTIONS[form]} embedding {embedded}, which is {_DESCRIPTIONS.get(inner[:-1], inner[:-1])}"


def _covering(ip: IPAddress, allow_cidrs: Sequence[IPNetwork]) -> IPNetwork | None:
    for net in allow_cidrs:
        if net.version == ip.version and ip in net:
            return net
    return None


def check(ip: IPAddress, allow_cidrs: Sequence[IPNetwork] = ()) -> AddressCheck:
    """Classify ``ip`` and decide whether it may be dialled.

    A forbidden address is re-admitted by the first ``allow_cidrs`` entry that
    contains it, or, for an embedding form, when every embedded IPv4 address
    that makes it forbidden is contained in an entry (``allowed_by`` is then
    the entry for the first of them).
    """
    category = classify(ip)
    if category is None:
        return AddressCheck(ip, None, True)
    entry = _covering(ip, allow_cidrs)
    if entry is None and allow_cidrs:
        entries = [_covering(v4, allow_cidrs) for v4 in _culprits(ip)]
        if entries and None not in entries:
            entry = entries[0]
    return AddressCheck(ip, category, entry is not None, entry)


_PREFIX = re.compile(r"(?:0|[1-9][0-9]{0,2})\Z")


def parse_cidr(text: str) -> IPNetwork:
    """Parse ``address/prefix`` strictly (a bare address means one host); ValueError says what to write instead."""
    if text != text.strip() or not text:
        raise ValueError(f"{text!r} is not a CIDR; write one without spaces, e.g. 10.0.0.0/8")
    address, slash, prefix = text.partition("/")
    if "%" in address:
        raise ValueError(f"{text}: zone identifiers are not accepted; write the network without '%zone'")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{text} is not a CIDR; write an IP address and prefix length, e.g. 10.0.0.0/8") from None
    if not slash:
        return ipaddress.ip_network(ip)
    if not _PREFIX.match(prefix):
        raise ValueError(f"{text}: {_prefix_fix(text, ip)}")
    if int(prefix) > ip.max_prefixlen:
        raise ValueError(f"{text}: prefix length {prefix} is out of range 0-{ip.max_prefixlen} for IPv{ip.version}")
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        fixed = ipaddress.ip_network(text, strict=False)
        raise ValueError(f"{text} has host bits set; did you mean {fixed}?") from None


def _prefix_fix(text: str, ip: IPAddress) -> str:
    """What to write instead of a prefix that is not a plain decimal length (a netmask, '/08', '/x')."""
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return f"the prefix length must be a decimal number 0-{ip.max_prefixlen}"
    return f"write the prefix length, not a mask or padded number: {network}"
