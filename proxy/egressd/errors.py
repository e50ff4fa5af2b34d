"""The small error hierarchy of the connection path.

Every error that ends a connection carries a reason from the closed set in
:class:`egressd.policy.model.Reason` and an HTTP status hint; the listener
turns it into the answer the client sees and the audit record keeps both. Library
exceptions (dnspython, OSError, httptools) are mapped to these at one boundary each
(resolve.py, connection.py, sniff/http.py), never let through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from egressd.policy.model import Reason

if TYPE_CHECKING:
    from egressd.hostport import Destination


class ProxyError(Exception):
    """A connection cannot go on: ``reason`` for the record, ``status`` for the client, ``str()`` for humans.

    ``dest`` is the destination the refused request named, when it named one, so that
    the record keeps host and port even when the request itself was refused."""

    status = 403

    headers: tuple[tuple[bytes, bytes], ...] = ()  # extra headers of the answer (407's Proxy-Authenticate)

    def __init__(
        self,
        reason: Reason,
        message: str,
        status: int | None = None,
        dest: Destination | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.dest = dest
        self.headers = headers
        if status is not None:
            self.status = status


class BadRequest(ProxyError):
    """The client's bytes are not a request we can act on (400, or 408/431 where HTTP has a better code)."""

    def __init__(self, message: str, status: int = 400, dest: Destination | None = None) -> None:
        super().__init__(Reason.BAD_REQUEST, message, status, dest)


class ClientGone(BadRequest):
    """The client went away in the middle of its request. Once the request went upstream this is how an
    allowed request ended, not a denial."""


class Denied(ProxyError):
    """Policy, address rules or the name binding refused the destination."""

    status = 403


class DnsFailure(ProxyError):
    def __init__(self, message: str) -> None:
        super().__init__(Reason.DNS_FAILURE, message, 502)


class UpstreamFailure(ProxyError):
    def __init__(self, message: str) -> None:
        super().__init__(Reason.UPSTREAM_FAILURE, message, 502)


class UpstreamTimeout(ProxyError):
    def __init__(self, message: str) -> None:
        super().__init__(Reason.UPSTREAM_TIMEOUT, message, 504)
