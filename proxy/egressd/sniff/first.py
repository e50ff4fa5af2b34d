"""What a redirected connection's first bytes are, by content alone (never by port): a pure function.

A TLS handshake record (``0x16``) is parsed as a ClientHello
(:mod:`egressd.sniff.tls`); a known request method followed by a space is an
HTTP/1.x head (:mod:`egressd.sniff.http`); anything else names nothing (an SMTP
``EHLO``, ``PRI * HTTP/2.0``, SSH). Until enough bytes have come, the answer is
:attr:`First.NEED_MORE`.
"""

from __future__ import annotations

import enum

__all__ = ["First", "classify"]


# Request methods llhttp knows: a client whose first word is one of these followed by a space speaks HTTP.
_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK "
    b"SEARCH REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PURGE MKCALENDAR LINK "
    b"UNLINK SOURCE QUERY BIND REBIND UNBIND ACL".split()
)
_LONGEST_METHOD = max(map(len, _METHODS))


class First(enum.Enum):
    """What a connection's first bytes are."""

    NEED_MORE = "need_more"
    TLS = "tls"  # a TLS handshake record: parse the ClientHello
    HTTP = "http"  # a known request method and a space: parse the request head
    OTHER = "other"  # anything else: no name


def classify(data: bytes | bytearray) -> First:
    """What the first bytes of a connection are, by content alone (never by port)."""
    if not data:
        return First.NEED_MORE
    if data[0] == 0x16:
        return First.TLS
    space = data.find(b" ", 0, _LONGEST_METHOD + 1)
    if space < 0:
        prefix = bytes(data[: _LONGEST_METHOD + 1])
        if len(prefix) <= _LONGEST_METHOD and any(m.startswith(prefix) for m in _METHODS):
            return First.NEED_MORE
        return First.OTHER
    return First.HTTP if bytes(data[:space]) in _METHODS else First.OTHER
