"""TLS ClientHello -> SNI, without touching a socket.

After answering ``200`` to ``CONNECT host:443`` the proxy reads the client's
first bytes and calls :func:`parse_client_hello` with the whole buffer so far,
each time more bytes arrive. No byte goes upstream until the result is ``OK``
and its ``sni`` equals the CONNECT host (the caller normalises and compares).
The transparent listener parses a redirected connection's first bytes the
same way, and the SNI is then the name it decides::

    buffer ──▶ record layer ──▶ handshake message ──▶ ClientHello body ──▶ extensions
               type 22, v3.x,   type 1, uint24 len,   version, random,     server_name (0)
               1..2^14+2048     reassembled across    session_id, ciphers, alpn (16)
               bytes each       records               compression          no duplicates

What is parsed (RFC 8446 5.1 and 4.1.2, RFC 6066 3, RFC 7301 3.1):

* TLSPlaintext records: ``type(1)=22 legacy_version(2, major 3) length(2)``.
  A record of length 0 or longer than 2^14+2048 is malformed.
* Handshake: ``msg_type(1)=1 length(3)``, the body possibly spread over
  several consecutive handshake records. Bytes after the ClientHello inside
  its last record are malformed; bytes after that record (early data, a
  pipelined request) are left alone and not counted in ``consumed``.
* ClientHello: ``legacy_version(2) random(32) session_id<0..32>
  cipher_suites<2..2^16-2> (even) compression_methods<1..2^8-1>`` and an
  optional ``extensions<..2^16-1>`` block that must fill the body exactly.
* server_name: a non-empty list of ``name_type(1) name<1..2^16-1>``; one
  host_name (type 0) at most, visible ASCII only (0x21-0x7e); other name
  types are skipped. ALPN: a non-empty list of non-empty protocol names.
  encrypted_client_hello: only its presence is reported (``ech``).

Hard cases, all tested:

* Fragmented records: evasive clients put the ClientHello in several records
  (down to a few bytes each) so that naive sniffers see no SNI; we reassemble.
* Split reads: a prefix of a valid record sequence is ``NEED_MORE``. Early
  checks (record type, version, length, handshake type and length, size
  limit) reject garbage before the whole hello has arrived.
* Duplicates: two server_name extensions, or two host_name entries, would
  let a filter and the origin read different names; both are malformed, as
  is any repeated extension type (RFC 8446 4.2).
* SSLv2-compatible hellos (first byte with the high bit set) carry no SNI:
  ``NOT_TLS``.
* ECH (Encrypted Client Hello, extension ``encrypted_client_hello``,
  0xfe0d): the outer hello's SNI is the provider's public name, not the real
  destination. The result says ``ech=True`` and reports that outer SNI, which
  the caller decides like any other: through CONNECT it will not equal the
  CONNECT host and the proxy denies; the transparent listener decides the
  outer name itself. That is intended: we cannot check what we cannot read.
  Browsers send GREASE ECH (a random extension of that type) to most sites,
  so the flag alone must never refuse a connection.

Limits: ``max_size`` bounds the bytes the hello may occupy (records included)
and the hello may span at most ``MAX_RECORDS`` records, so one call costs
O(records) until the hello is complete. The caller still needs a read
timeout: a client may trickle a valid prefix forever.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = ["MAX_RECORDS", "ClientHello", "HelloStatus", "parse_client_hello"]

MAX_RECORDS = 256
"""The most records one ClientHello may span: RFC 8446 sets no limit; browsers use one, evasive
clients (record "fragment" options) a few dozen; the cap bounds the work of each call."""

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_MAX_RECORD_LEN = 2**14 + 2048
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_ECH = 0xFE0D  # encrypted_client_hello (draft-ietf-tls-esni)
_HOST_NAME = 0
_VISIBLE_ASCII = bytes(range(0x21, 0x7F))
_FIRST_RECORD = struct.Struct("!BHHI").unpack_from  # type, version, length; handshake type << 24 | length
_TYPE_AND_LENGTH = struct.Struct("!HH").unpack_from


class HelloStatus(enum.Enum):
    """What the bytes so far are."""

    NEED_MORE = "need_more"  # a valid prefix of a ClientHello; call again with more bytes
    OK = "ok"  # a complete ClientHello parsed (sni may still be None)
    NOT_TLS = "not_tls"  # the first bytes are not a TLS handshake record
    MALFORMED = "malformed"  # looks like TLS but violates the format


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The result of one parse: a status, and for ``OK`` the SNI, ALPN, bytes consumed and whether the
    hello carried an encrypted_client_hello extension (``ech``; its ``sni`` is then the outer, public name)."""

    status: HelloStatus
    sni: str | None = None
    consumed: int = 0
    detail: str = ""
    alpn: tuple[str, ...] = ()
    ech: bool = False

    def __post_init__(self) -> None:
        if (self.status is HelloStatus.OK) != (self.consumed > 0):
            raise ValueError(f"consumed={self.consumed} is inconsistent with status {self.status.name}")
        if self.status is not HelloStatus.OK and (self.sni is not None or self.alpn or self.ech):
            raise ValueError(f"a {self.status.name} result carries no sni, alpn or ech")


class _Malformed(Exception):
    """Raised inside this module only; becomes a MALFORMED result with the message as detail."""


_NEED_MORE = ClientHello(HelloStatus.NEED_MORE)


def parse_client_hello(data: bytes | bytearray | memoryview, max_size: int = 65536) -> ClientHello:
    """Parse the ClientHello at the start of ``data``; never raises for any byte content.

    ``data`` is everything the client has sent so far. The result is
    ``NEED_MORE`` until a whole ClientHello is present, then ``OK`` with the
    raw host_name (``None`` without a server_name extension), ``consumed``,
    the length of the records that hold it, and ``ech``; or
    ``NOT_TLS``/``MALFORMED`` with a short ``detail``.
    """
    view = memoryview(data)
    if view.format != "B" or not view.c_contiguous:
        view = memoryview(view.tobytes())
    try:
        framed = _reassemble(view, max_size)
        if isinstance(framed, ClientHello):
            return framed
        body, consumed = framed
        sni, alpn, ech = _parse_body(body)
    except _Malformed as exc:
        return ClientHello(HelloStatus.MALFORMED, detail=str(exc))
    return ClientHello(HelloStatus.OK, sni=sni, consumed=consumed, alpn=alpn, ech=ech)


def _not_tls(view: memoryview) -> ClientHello | None:
    """Return NOT_TLS if the first bytes cannot begin a TLS handshake record, else None."""
    first = view[0]
    if first & 0x80:
        detail = f"SSLv2-compatible hello (first byte 0x{first:02x}) cannot carry SNI"
        return ClientHello(HelloStatus.NOT_TLS, detail=detail)
    if first != _HANDSHAKE:
        return ClientHello(HelloStatus.NOT_TLS, detail=f"record type 0x{first:02x} is not handshake (22)")
    if len(view) > 1 and view[1] != 3:
        return ClientHello(HelloStatus.NOT_TLS, detail=f"record version major {view[1]} is not 3")
    return None


def _reassemble(view: memoryview, max_size: int) -> ClientHello | tuple[memoryview, int]:
    """Walk handshake records from offset 0; return (ClientHello body, bytes consumed) or a verdict.

    Each record contributes a fragment of the handshake message; the walk
    stops when the fragments hold the whole message (4-byte header + length).
    """
    n = len(view)
    if n == 0:
        return _NEED_MORE
    if (verdict := _not_tls(view)) is not None:
        return verdict
    if n >= 9:  # fast path: the whole ClientHello in the first record, as browsers send it
        _, _, length, handshake = _FIRST_RECORD(view)
        end = 5 + length
        if (handshake & 0xFFFFFF) + 4 == length <= _MAX_RECORD_LEN and end <= n and end <= max_size and (
            handshake >> 24 == _CLIENT_HELLO
        ):
            return view[9:end], end
    fragments: list[memoryview] = []
    have = 0  # handshake bytes seen so far
    need = -1  # 4 + handshake length, once the header has arrived
    off = 0
    while True:
        if len(fragments) == MAX_RECORDS:
            raise _Malformed(f"ClientHello spans more than {MAX_RECORDS} records")
        if off + 5 > max_size:
            raise _Malformed(f"ClientHello exceeds max_size={max_size} bytes")
        _check_header_prefix(view[off : off + 5])
        if off + 5 > n:
            return _NEED_MORE
        length = view[off + 3] << 8 | view[off + 4]
        if length == 0 or length > _MAX_RECORD_LEN:
            raise _Malformed(f"record at offset {off} has length {length}, outside 1..{_MAX_RECORD_LEN}")
        end = off + 5 + length
        if end > max_size:
            raise _Malformed(f"ClientHello exceeds max_size={max_size} bytes")
        fragments.append(view[off + 5 : min(end, n)])
        have += len(fragments[-1])
        if need < 0 and have > 0:
            need = _handshake_length(fragments, max_size)
        if 0 <= need < have:
            raise _Malformed(f"{have - need} bytes follow the ClientHello inside its last record")
        if end > n:
            return _NEED_MORE
        off = end
        if need == have:
            break
    if len(fragments) == 1:
        return fragments[0][4:], off
    return memoryview(b"".join(fragments))[4:], off


def _check_header_prefix(header: memoryview) -> None:
    """A later record must also be a TLS 1.x handshake record (checked on as many bytes as have arrived)."""
    if len(header) > 0 and header[0] != _HANDSHAKE:
        raise _Malformed(f"record type 0x{header[0]:02x} interrupts the ClientHello")
    if len(header) > 1 and header[1] != 3:
        raise _Malformed(f"record version major {header[1]} is not 3")


def _handshake_length(fragments: list[memoryview], max_size: int) -> int:
    """Check the handshake header in the first fragments; return 4 + its length, or -1 if still partial."""
    head = fragments[0][:4] if len(fragments[0]) >= 4 else b"".join(fragments)[:4]
    if head[0] != _CLIENT_HELLO:
        raise _Malformed(f"handshake type {head[0]} is not ClientHello (1)")
    if len(head) < 4:
        return -1
    need = 4 + (head[1] << 16 | head[2] << 8 | head[3])
    if need + 5 > max_size:
        raise _Malformed(f"ClientHello of {need} bytes exceeds max_size={max_size} bytes")
    return need


def _parse_body(body: memoryview) -> tuple[str | None, tuple[str, ...], bool]:
    """Check the fixed ClientHello fields; return (sni, alpn, ech) from the extensions, if any."""
    n = len(body)
    if n < 35:
        raise _Malformed(f"ClientHello body of {n} bytes is too short for version and random")
    if body[0] != 3:
        raise _Malformed(f"ClientHello legacy_version 0x{body[0]:02x}{body[1]:02x} is not 3.x")
    sid_len = body[34]
    if sid_len > 32:
        raise _Malformed(f"session_id length {sid_len} exceeds 32")
    pos = 35 + sid_len
    cs_len = _u16(body, pos, "cipher_suites")
    if cs_len < 2 or cs_len & 1:
        raise _Malformed(f"cipher_suites length {cs_len} is not even and at least 2")
    pos += 2 + cs_len
    if pos >= n:
        raise _Malformed("ClientHello truncated before compression_methods")
    cm_len = body[pos]
    if cm_len == 0:
        raise _Malformed("compression_methods is empty")
    pos += 1 + cm_len
    if pos > n:
        raise _Malformed("compression_methods runs past the ClientHello")
    if pos == n:
        return None, (), False
    block = _u16(body, pos, "extensions")
    if pos + 2 + block != n:
        raise _Malformed(f"extensions block says {block} bytes but {n - pos - 2} remain")
    return _parse_extensions(body, pos + 2, n)


def _parse_extensions(body: memoryview, pos: int, n: int) -> tuple[str | None, tuple[str, ...], bool]:
    """Walk the extension block; reject repeated types; decode server_name and ALPN; note ECH.

    The walk only records where each extension starts (this loop is the hot
    path); a header cut short raises struct.error, a body running past the
    block leaves ``pos`` beyond ``n``.
    """
    types: list[int] = []
    starts: list[int] = []
    try:
        while pos < n:
            ext_type, length = _TYPE_AND_LENGTH(body, pos)
            types.append(ext_type)
            starts.append(pos + 4)
            pos += 4 + length
    except struct.error:
        raise _Malformed(f"extension header at body offset {pos} is truncated") from None
    if pos != n:
        raise _Malformed(f"extension 0x{types[-1]:04x} runs past the extensions block")
    if len(set(types)) != len(types):
        twice = next(t for i, t in enumerate(types) if t in types[:i])
        raise _Malformed(f"extension 0x{twice:04x} appears twice")
    sni = _server_name(_ext_body(body, types, starts, _EXT_SERVER_NAME)) if _EXT_SERVER_NAME in types else None
    alpn = _alpn(_ext_body(body, types, starts, _EXT_ALPN)) if _EXT_ALPN in types else ()
    return sni, alpn, _EXT_ECH in types


def _ext_body(body: memoryview, types: list[int], starts: list[int], ext_type: int) -> memoryview:
    """The body of the (present, bounds-checked) extension of type ``ext_type``."""
    start = starts[types.index(ext_type)]
    return body[start : start + (body[start - 2] << 8 | body[start - 1])]


def _server_name(ext: memoryview) -> str | None:
    """Return the one host_name in a server_name extension (None if it lists only other name types)."""
    n = len(ext)
    if n <= 2 or (ext[0] << 8 | ext[1]) != n - 2:
        raise _Malformed("server_name list length does not fill the extension or is empty")
    host: str | None = None
    pos = 2
    while pos < n:
        if pos + 3 > n:
            raise _Malformed("server_name entry header is truncated")
        name_type = ext[pos]
        end = pos + 3 + (ext[pos + 1] << 8 | ext[pos + 2])
        if end > n:
            raise _Malformed("server_name entry runs past the extension")
        if name_type == _HOST_NAME:
            if host is not None:
                raise _Malformed("server_name lists two host_name entries")
            host = _host_name(ext[pos + 3 : end].tobytes())
        pos = end
    return host


def _host_name(raw: bytes) -> str:
    """Return ``raw`` as text if it is non-empty visible ASCII (the caller normalises it)."""
    if not raw:
        raise _Malformed("server_name host_name is empty")
    if raw.translate(None, _VISIBLE_ASCII):
        raise _Malformed(f"server_name host_name {raw[:64]!r} has bytes outside visible ASCII")
    return raw.decode("ascii")


def _alpn(ext: memoryview) -> tuple[str, ...]:
    """Return the protocol names of an ALPN extension, decoded as latin-1."""
    n = len(ext)
    if n <= 2 or (ext[0] << 8 | ext[1]) != n - 2:
        raise _Malformed("ALPN list length does not fill the extension or is empty")
    text = ext.tobytes().decode("latin-1")
    names: list[str] = []
    pos = 2
    while pos < n:
        end = pos + 1 + ext[pos]
        if end == pos + 1 or end > n:
            raise _Malformed("ALPN protocol name is empty or runs past the extension")
        names.append(text[pos + 1 : end])
        pos = end
    return tuple(names)


def _u16(body: memoryview, pos: int, what: str) -> int:
    """Read a big-endian uint16 length at ``pos``, or fail naming the field."""
    if pos + 2 > len(body):
        raise _Malformed(f"ClientHello truncated before {what}")
    return body[pos] << 8 | body[pos + 1]
