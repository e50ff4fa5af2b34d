"""What a request head names: the destination, checked once, as pure functions.

Two request forms reach an explicit proxy and both name the destination:

* ``CONNECT host:port`` (authority-form) opens a tunnel;
* ``GET http://host[:port]/path`` (absolute-form, ``ws://`` too) is forwarded;
  its Host header must name the same host and port (``host_mismatch``
  otherwise), so that an origin behind one allowed IP cannot be asked for
  another site by Host. HTTP/1.0 may leave Host out.

Origin-form (``GET /path``), ``https://`` absolute-form and asterisk-form are
refused with 400 and a message saying what to send instead, as is a CONNECT
that announces a body (Content-Length above 0 or Transfer-Encoding): what
follows a CONNECT is the tunnel's, and a front proxy reading it as a body would
see other requests than egressd. A refused request that named a valid
destination carries it in the error's ``dest``, for the record. Messages quote
at most the start of what they refuse (:func:`egressd.hostport.quoted`).

A request that reached egressd through an iptables redirect (the transparent
listener) is the other way round: it is in origin-form, as sent to an origin,
and only its Host header names the destination, on the port the client dialled
(:func:`parse_origin_target`). A Host naming another port is ``host_mismatch``;
a request without Host names nothing (``no_name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from egressd.errors import BadRequest, Denied
from egressd.hostport import BadDestination, Destination, parse_authority, quoted
from egressd.policy.model import Reason
from egressd.sniff.http import Head


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the destination, and for forwarded requests the origin-form path."""

    dest: Destination
    connect: bool
    path: bytes = b""


def parse_target(head: Head) -> Target:
    """Turn a request head into a Target, or raise BadRequest/Denied with the reason (and, when the
    request named a valid destination, that destination in the error's ``dest``)."""
    target = head.target.decode("ascii", "replace")
    if head.method == b"CONNECT":
        try:
            dest = parse_authority(target)
        except BadDestination as exc:
            raise BadRequest(f"CONNECT: {exc}") from None
        if head.length or head.get(b"transfer-encoding") is not None:
            raise BadRequest(
                f"CONNECT {dest.authority} announces a body (Content-Length or Transfer-Encoding); a CONNECT has "
                "none, and what follows it is the tunnel's: send the CONNECT without them", dest=dest,
            )
        return Target(dest, connect=True)
    if target.startswith("/") or target == "*":
        raise BadRequest(
            f"{head.method.decode()} {quoted(target)}: egressd is a forward proxy; send an absolute URL "
            "(http://host/path) or CONNECT host:port"
        )
    try:
        url = urlsplit(target)
    except ValueError as exc:
        raise BadRequest(f"{quoted(target)} is not a URL: {exc}") from None
    try:
        dest: Destination | None = parse_authority(
            url.netloc.rpartition("@")[2], default_port=443 if url.scheme in ("https", "wss") else 80
        )
        problem = ""
    except BadDestination as exc:
        dest, problem = None, str(exc)
    if url.scheme not in ("http", "ws"):
        hint = "; for https and wss use CONNECT (curl -x does)" if url.scheme in ("https", "wss") else ""
        raise BadRequest(f"{quoted(target)}: only http:// (and ws://) URLs are forwarded{hint}", dest=dest)
    if url.username is not None or url.password is not None:
        raise BadRequest(f"{quoted(target)}: user-info in the URL is not accepted", dest=dest)
    if dest is None:
        raise BadRequest(f"{quoted(target)}: {problem}")
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    check_host_header(head, dest)
    return Target(dest, connect=False, path=path.encode("ascii", "replace"))


def check_host_header(head: Head, dest: Destination) -> None:
    """The Host header must name the absolute-form host and port (default 80); else Denied(host_mismatch).

    HTTP/1.0 requests may leave Host out: the absolute URL names the host (as Squid accepts)."""
    hosts = [value for name, value in head.headers if name == b"host"]
    if not hosts and head.version == "1.0":
        return
    if len(hosts) != 1:
        raise BadRequest(f"expected exactly one Host header, got {len(hosts)}", dest=dest)
    value = hosts[0].decode("ascii", "replace")
    try:
        named = parse_authority(value, default_port=80)
    except BadDestination:
        named = None
    if named is None or (named.host, named.port) != (dest.host, dest.port):
        raise Denied(
            Reason.HOST_MISMATCH, f"Host header {quoted(value)} does not name the requested {dest.authority}", dest=dest
        )


def parse_origin_target(head: Head, port: int) -> Target:
    """The Target of a request redirected to egressd on a connection to ``port``: Host's name on that port.

    The target must be in origin-form (``/path``); a Host without a port names
    ``port``, one with another port is Denied(host_mismatch); no Host at all is
    Denied(no_name); several Host headers or one that is not a host[:port] are
    BadRequest. The path is forwarded as sent.
    """
    if head.method == b"CONNECT" or not head.target.startswith(b"/"):
        target = head.target.decode("ascii", "replace")
        raise BadRequest(
            f"{head.method.decode('ascii', 'replace')} {target}: egressd received this request in place of the "
            "origin, so it must be in origin-form (GET /path with a Host header)"
        )
    hosts = [value for name, value in head.headers if name == b"host"]
    if not hosts:
        raise Denied(Reason.NO_NAME, "the request has no Host header, so it names no destination")
    if len(hosts) != 1:
        raise BadRequest(f"expected exactly one Host header, got {len(hosts)}")
    value = hosts[0].decode("ascii", "replace")
    try:
        named = parse_authority(value, default_port=port)
    except BadDestination as exc:
        raise BadRequest(f"Host header {quoted(value)}: {exc}") from None
    if named.port != port:
        raise Denied(
            Reason.HOST_MISMATCH,
            f"Host header {quoted(value)} names port {named.port} but the connection was made to port {port}",
            dest=Destination(named.host, port, named.ip),
        )
    return Target(named, connect=False, path=head.target)
