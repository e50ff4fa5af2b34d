"""Destinations, normalised once at the edge.

Every name that enters egressd (a CONNECT authority, an absolute-form URL host,
a Host header, a TLS SNI, an allowlist pattern) passes through
:func:`normalize_host` and comes out in one canonical form:

* a DNS name: IDNA (UTS #46) to punycode, lower case, trailing dot removed,
  labels of letters, digits, ``-`` and ``_``, each 1-63 octets, 253 in all, and
  a last label that is not numeric (so ``127.1``, ``2130706433``,
  ``0177.0.0.1`` and ``0x7f.1`` can never pass for a name), or
* an IP literal in the one textual form :mod:`ipaddress` prints: dotted quad
  with four decimal parts and no leading zeros, or compressed IPv6 written in
  brackets in authorities (``[2001:db8::1]:443``) and bare in hosts.

Anything else (octal, hex or integer IPv4 forms, zone identifiers, empty
labels, spaces, user-info) raises :class:`BadDestination`, whose message says
what was wrong, quoting at most the first hundred characters of what it
refuses (:func:`quoted`): a 16 KiB name in a request head must not become
16 KiB of audit record. Nothing here touches a socket.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = [
    "BadDestination", "Destination", "IPAddress", "ip_text", "join_host_port", "normalize_host", "parse_authority",
    "parse_ip", "quoted",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")
_DOTTED_QUAD = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}\Z")
_PORT = re.compile(r"[1-9][0-9]{0,4}\Z")
_ASCII_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+\Z")
_QUOTED = 100  # characters of a refused text a message quotes


def quoted(text: str, limit: int = _QUOTED) -> str:
    """``repr(text)``, or when ``text`` is longer than ``limit`` characters the repr of its start and its length:
    what a message quotes of hostile input stays bounded."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class BadDestination(ValueError):
    """A destination that is not a canonical host name or IP literal (status hint 400)."""

    status = 400


@dataclass(frozen=True, slots=True)
class Destination:
    """A normalised destination: ``host`` is canonical; ``ip`` is set when ``host`` is an IP literal."""

    host: str
    port: int
    ip: IPAddress | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise BadDestination(f"port {self.port} is out of range 1-65535")
        canonical = parse_ip(self.host) is None if self.ip is None else ip_text(self.ip) == self.host
        if not canonical:
            raise BadDestination(
                f"{quoted(self.host)}: host and ip disagree; build destinations with parse_authority()"
            )

    @property
    def authority(self) -> str:
        """``host:port`` with IPv6 literals bracketed, as it would appear in a CONNECT line."""
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address (any host containing ':') in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=4096)  # the same few answers are written into every record
def ip_text(ip: IPAddress) -> str:
    """The one textual form of an address, the same on every Python (mapped IPv6 as ``::ffff:1.2.3.4``)."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def parse_ip(text: str) -> IPAddress | None:
    """Return the IP address ``text`` spells in canonical form, None if it is not an IP literal.

    Raises BadDestination for forms that resolvers or ``inet_aton`` would read
    as an address but that are not canonical (``0177.0.0.1``, ``0x7f000001``,
    ``127.1``, ``fe80::1%eth0``).
    """
    if "%" in text and ":" in text:
        raise BadDestination(
            f"{quoted(text)}: IPv6 zone identifiers are not accepted; write the address without '%zone'"
        )
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            raise BadDestination(f"{quoted(text)} is not a valid IPv6 address") from None
    if _DOTTED_QUAD.match(text):
        try:
            return ipaddress.IPv4Address(text)
        except ValueError:
            raise BadDestination(f"{quoted(text)} is not a valid IPv4 address (each part must be 0-255)") from None
    return None


@functools.lru_cache(maxsize=4096)
def normalize_host(text: str) -> str:
    """Return the canonical form of a host name or IP literal, or raise BadDestination.

    IPv6 literals may come bracketed or bare; they come out bare. Results are
    cached (the same few names arrive over and over; errors are not cached).
    """
    if not text:
        raise BadDestination("empty host name")
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        ip = parse_ip(inner)
        if ip is None or ip.version != 6:
            raise BadDestination(f"{quoted(text)}: only IPv6 addresses may be written in brackets")
        return ip_text(ip)
    ip = parse_ip(text)
    if ip is not None:
        return ip_text(ip)
    return _normalize_name(text)


def _normalize_name(text: str) -> str:
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise BadDestination(f"{quoted(text)} is not a host name")
    if _ASCII_NAME_CHARS.match(name):
        name = name.lower()
    else:
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            why = str(exc)[: _QUOTED * 2]  # idna's words may quote the whole label
            raise BadDestination(f"{quoted(text)} is not a valid internationalised host name: {why}") from None
    if len(name) > 253:
        raise BadDestination(f"host name of {len(name)} characters is longer than 253")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise BadDestination(
                f"{quoted(text)}: label {quoted(label)} is not a DNS label (letters, digits, '-', '_'; 1-63 characters)"
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise BadDestination(f"{quoted(text)}: label {quoted(label)} is not valid punycode") from None
    if _NUMERIC_LABEL.match(labels[-1]):
        raise BadDestination(
            f"{quoted(text)} looks like an IP address in a non-canonical form; "
            "write IPv4 as four decimal parts (1.2.3.4)"
        )
    return name


@functools.lru_cache(maxsize=4096)  # the same few authorities, again and again; refusals are not cached
def parse_authority(text: str, default_port: int | None = None) -> Destination:
    """Parse ``host:port`` (``[v6]:port`` for IPv6) into a Destination.

    ``default_port`` is used when the port is absent; when it is None, a port
    is required (as in a CONNECT request line).
    """
    if not text or any(c in text for c in "@/?# \t\\"):
        raise BadDestination(f"{quoted(text)} is not a host:port authority")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadDestination(f"{quoted(text)}: unterminated '[' in IPv6 authority")
        host_text, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise BadDestination(f"{quoted(text)}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep:
            host_text, port_text = text, None
        elif ":" in host_text:
            raise BadDestination(f"{quoted(text)}: IPv6 addresses must be written in brackets, e.g. [2001:db8::1]:443")
    if port_text is None:
        if default_port is None:
            raise BadDestination(f"{quoted(text)}: a port is required (host:port)")
        port = default_port
    else:
        if not _PORT.match(port_text):
            raise BadDestination(
                f"{quoted(text)}: port {quoted(port_text)} is not a decimal number 1-65535 (no leading zeros)"
            )
        port = int(port_text)
    host = normalize_host(host_text)
    ip = parse_ip(host) if (host[0].isdigit() or ":" in host) else None
    return Destination(host=host, port=port, ip=ip)
