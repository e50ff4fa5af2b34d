"""ClientHellos for the hostile rows: a real one from the ssl module, and hand-made ones that break a rule.

A real hello (:func:`real`) is what OpenSSL sends, so an origin answers it with
a ServerHello. The hand-made ones (:func:`made`) have the fields of RFC 8446
4.1.2 and whatever extensions a row needs: several server names, a NUL in the
name, an upper-case name, padding past the size limit. :func:`records` cuts a
hello's handshake message into records of a few bytes each, as evasive clients
do.
"""

from __future__ import annotations

import ssl
import struct


def real(name: str | None) -> bytes:
    """The first flight of a Python TLS client for ``name``: one record holding its ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS handshake completed without a server")


def vec(width: int, payload: bytes) -> bytes:
    """A TLS vector: its length in ``width`` bytes, then the payload."""
    return len(payload).to_bytes(width, "big") + payload


def ext(ext_type: int, body: bytes) -> bytes:
    """One extension: type, length, body."""
    return struct.pack("!H", ext_type) + vec(2, body)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    """A server_name extension listing ``names`` (host_name entries unless ``name_type`` says otherwise)."""
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, name) for name in names)))


def padding(size: int) -> bytes:
    """A padding extension (RFC 7685) of ``size`` zero bytes."""
    return ext(21, bytes(size))


def message(extensions: bytes) -> bytes:
    """A ClientHello handshake message (type 1, uint24 length) with these extensions."""
    body = b"\x03\x03" + b"\x5a" * 32 + vec(1, b"\x11" * 32)
    body += vec(2, b"\x13\x01\x13\x02\xc0\x2b\xc0\x2f") + vec(1, b"\x00") + vec(2, extensions)
    return b"\x01" + vec(3, body)


def records(handshake: bytes, size: int = 16384) -> bytes:
    """The handshake message in TLS 1.0-versioned handshake records of at most ``size`` bytes each."""
    return b"".join(b"\x16\x03\x01" + vec(2, handshake[i : i + size]) for i in range(0, len(handshake), size))


# What a TLS 1.2 server needs to pick ECDHE with the lab's (ECDSA) certificate: groups, point formats, sigalgs.
TLS12 = ext(10, vec(2, b"\x00\x1d\x00\x17")) + ext(11, b"\x01\x00") + ext(13, vec(2, bytes.fromhex("080404010403")))


def made(*extensions: bytes) -> bytes:
    """A hand-made ClientHello with these extensions (and :data:`TLS12`, so an origin answers it), in as few
    records as it fits."""
    return records(message(b"".join(extensions) + TLS12))


def refragment(hello: bytes, size: int) -> bytes:
    """A one-record hello (:func:`real`) re-cut into records of ``size`` bytes of its handshake message."""
    return records(hello[5:], size)


SSLV2 = bytes.fromhex("8046010301002d0000001000") + b"\x00" * 61  # an SSLv2-compatible hello: no SNI possible
