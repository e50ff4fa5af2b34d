"""Fuzzing the request-head parser (:mod:`egressd.sniff.http`) and what a head names (:mod:`egressd.sniff.target`).

Requests are generated from hostile parts (smuggling headers, odd line endings,
obs-fold, bad chunk sizes, control bytes) and fed in random pieces, draining the
events between feeds as the listener does. Properties: only BadRequest ever
leaves ``feed``; how the bytes are split never changes what is parsed; a head
over the limit is refused by the feed that crosses it; and whatever egressd
accepts, h11 (an independent HTTP/1.1 implementation) accepts too and reads the
same method, target, headers and body.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egressd.errors import BadRequest, Denied
from egressd.hostport import BadDestination, Destination, parse_authority
from egressd.sniff.http import END, Head, RequestParser
from egressd.sniff.target import parse_origin_target, parse_target
from fuzz.httpgen import pieces, requests
from harness import raw_request, wait_for

FUZZ = settings.get_profile("egressd-fuzz")
BIG = 1 << 20  # a head limit no generated request reaches, where splitting must not matter

# -- running our parser and h11 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """What a parser read, comparable across splits: messages (head fields and whole body), and the outcome."""

    messages: tuple[tuple, ...]
    error: bool
    upgraded: bool
    rest: bytes


def _head_key(head: Head) -> tuple:
    return (head.method, head.target, head.version, tuple(head.headers), head.chunked, head.length, head.upgrade)


def ours(chunks: list[bytes], limit: int = BIG) -> Parsed:
    """Feed the chunks one by one, draining the events after each feed as the listener does."""
    parser = RequestParser(limit)
    messages: list[tuple] = []
    head: Head | None = None
    body = b""
    error = False
    for chunk in chunks:
        try:
            parser.feed(chunk)
        except BadRequest:
            error = True
        while parser.events:
            event = parser.events.popleft()
            if isinstance(event, Head):
                head, body = event, b""
            elif event is END:
                assert head is not None, "END without a head"
                messages.append((_head_key(head), body))
                head = None
            else:
                assert head is not None, "body bytes without a head"
                body += event
        if error:
            break
    if head is not None:  # a head whose message did not end (CONNECT, an upgrade, or a body still coming)
        messages.append((_head_key(head), None if not parser.upgraded else b""))
    return Parsed(tuple(messages), error, parser.upgraded, parser.rest)


@dataclass(frozen=True)
class H11:
    """h11's reading of the first request: ``status`` is "ok", "error" or "incomplete"."""

    status: str
    request: h11.Request | None = None
    body: bytes = b""
    trailers: tuple[tuple[bytes, bytes], ...] = ()


def h11_first(data: bytes) -> H11:
    """Parse the first request of ``data`` with h11, as a server."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=BIG)
    conn.receive_data(data)
    request, body = None, b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return H11("ok", request, body, tuple(event.headers))
            elif event is h11.PAUSED:
                return H11("ok", request, body)
            elif event is h11.NEED_DATA:
                return H11("incomplete", request, body)
    except h11.RemoteProtocolError:
        return H11("error", request, body)


# -- properties ----------------------------------------------------------------------------------------------------


@FUZZ
@given(requests(), st.lists(st.integers(0, 4096), max_size=8))
@example(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\nhello", [70])
@example(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n\x16\x03\x01", [10, 20, 30])
def test_only_bad_request_and_splitting_changes_nothing(data: bytes, cuts: list[int]) -> None:
    """Fed whole or in pieces, a request gives the same messages, and nothing but BadRequest is ever raised."""
    whole = ours([data])
    split = ours(pieces(data, cuts))
    assert split.error == whole.error
    if not whole.error:
        assert split == whole


@FUZZ
@given(requests())
@example(b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\nhello\r\n0\r\n\r\n")
def test_h11_accepts_what_we_accept_and_reads_it_alike(data: bytes) -> None:
    """Whatever first request egressd accepts whole, h11 accepts too, with equal method, target, headers and body."""
    parsed = ours([data])
    if parsed.error or not parsed.messages:
        return
    (method, target, version, headers, chunked, length, _), body = parsed.messages[0]
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    if any(c.strip().lower() != b"chunked" for c in codings):
        return  # h11 supports no coding but chunked; egressd passes others through framed by the last one
    if method == b"CONNECT" and (codings or length):  # h11 reads a body framed so, llhttp a tunnel
        with pytest.raises(BadRequest):
            parse_target(_head(data))
        return
    theirs = h11_first(data)
    hosts = [v for n, v in headers if n == b"host"]
    if theirs.status == "error" and (len(hosts) > 1 or (version == "1.1" and not hosts)):
        if method != b"CONNECT":  # (a CONNECT is bound by its authority and the SNI; its Host is not read)
            with pytest.raises(BadRequest):
                parse_target(_head(data))
        return  # h11 checks Host while parsing; egressd at the target check
    assert theirs.status != "error", f"egressd accepted what h11 refuses: {data!r}"
    request = theirs.request
    assert request is not None
    assert (request.method, request.target, request.http_version.decode()) == (method, target, version)
    assert list(request.headers) == [(n, v.rstrip(b" \t")) for n, v in headers]
    if theirs.status == "ok" and body is not None and method != b"CONNECT":
        assert theirs.body == body


@FUZZ
@given(
    st.sampled_from(["target", "header", "headers", "fold"]),
    st.integers(16_385, 65_536),
    st.lists(st.integers(1, 8192), min_size=1, max_size=40),
)
@example("headers", 65_536, [1])
def test_an_oversized_head_is_refused_by_the_feed_that_crosses_the_limit(shape: str, size: int,
                                                                          sizes: list[int]) -> None:
    """A head of 16 KiB to 64 KiB, sent in pieces of any size, is refused (431, 400 for obs-fold) by the feed that
    takes the bytes past 16 KiB, never later."""
    limit = 16_384
    head = {
        "target": b"GET http://a.test/" + b"a" * size + b" HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "header": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"v" * size + b"\r\n\r\n",
        "headers": b"GET http://a.test/ HTTP/1.1\r\n" + b"X-A: 1\r\n" * (size // 8) + b"Host: a.test\r\n\r\n",
        "fold": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX: " + b"a\r\n b" * (size // 5) + b"\r\n\r\n",
    }[shape]
    parser = RequestParser(limit)
    fed = 0
    for n in sizes * (len(head) // sum(sizes) + 1):
        piece = head[fed : fed + n]
        if not piece:
            break
        fed += len(piece)
        try:
            parser.feed(piece)
        except BadRequest as exc:
            assert exc.status in (400, 431)
            assert fed <= limit + n  # refused by the feed that crossed the limit, never later
            return
        assert fed <= limit, f"{fed} bytes of one head accepted with a limit of {limit}"
    raise AssertionError("an oversized head was accepted")


# -- the target a head names ---------------------------------------------------------------------------------------

_LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_DESTS = st.builds(
    lambda host, port: parse_authority(f"{host}:{port}"),
    st.one_of(
        st.lists(_LABELS, min_size=1, max_size=4).map(lambda labels: ".".join([*labels, "test"])),
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    ),
    st.integers(1, 65535),
)


def _spellings(dest: Destination, port_required: bool = False) -> st.SearchStrategy[str]:
    """Other spellings of the same authority: letter case, a trailing dot, the default port 80 left out (unless
    ``port_required``, as in a CONNECT line)."""
    host = f"[{dest.host}]" if dest.ip is not None and dest.ip.version == 6 else dest.host
    names = [host, host.upper()] + ([host + "."] if dest.ip is None else [])
    ports = [f":{dest.port}"] + ([""] if dest.port == 80 and not port_required else [])
    return st.builds(lambda h, p: h + p, st.sampled_from(names), st.sampled_from(ports))


def _head(data: bytes) -> Head:
    parser = RequestParser(BIG)
    parser.feed(data)
    head = parser.events[0]
    assert isinstance(head, Head)
    return head


@FUZZ
@given(_DESTS, st.data())
def test_connect_and_absolute_form_round_trip(dest: Destination, data: st.DataObject) -> None:
    """A destination written as CONNECT or as an absolute URL with a Host of any spelling parses back to itself."""
    authority = data.draw(_spellings(dest, port_required=True))
    connect = parse_target(_head(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()))
    assert (connect.dest, connect.connect) == (dest, True)
    path = data.draw(st.sampled_from(["/", "/a/b?c=d", "/%41"]))
    host_header = data.draw(_spellings(dest))
    url_authority = data.draw(_spellings(dest))
    forward = parse_target(_head(f"GET http://{url_authority}{path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()))
    assert (forward.dest, forward.connect, forward.path) == (dest, False, path.encode())
    origin = parse_origin_target(_head(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()), dest.port)
    assert (origin.dest, origin.path) == (dest, path.encode())


@FUZZ
@given(_DESTS, _DESTS)
def test_a_host_header_naming_another_destination_is_host_mismatch(dest: Destination, other: Destination) -> None:
    """An absolute URL whose Host names another host or port is denied host_mismatch, never forwarded."""
    request = f"GET http://{dest.authority}/ HTTP/1.1\r\nHost: {other.authority}\r\n\r\n".encode()
    if (dest.host, dest.port) == (other.host, other.port):
        assert parse_target(_head(request)).dest == dest
        return
    with pytest.raises(Denied) as info:
        parse_target(_head(request))
    assert info.value.reason.value == "host_mismatch" and info.value.dest == dest


@FUZZ
@given(requests(), st.integers(1, 65535))
def test_parse_target_raises_only_its_errors(data: bytes, port: int) -> None:
    """Every head the parser accepts gives a Target or BadRequest/Denied, in both forms, and a Target's host is
    canonical."""
    parsed = RequestParser(BIG)
    try:
        parsed.feed(data)
    except BadRequest:
        return
    for head in [e for e in parsed.events if isinstance(e, Head)]:
        for parse in (parse_target, lambda h: parse_origin_target(h, port)):
            try:
                target = parse(head)
            except (BadRequest, Denied):
                continue
            try:
                assert parse_authority(target.dest.authority) == target.dest
            except BadDestination as exc:  # pragma: no cover - the assertion's message
                raise AssertionError(f"{target.dest} is not canonical: {exc}") from None


# -- findings, kept as regression cases ----------------------------------------------------------------------------

_TRAILED = (b"POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"\r\n3\r\nabc\r\n0\r\nAuthorization: Bearer from-the-trailer\r\nX-Trailer: 1\r\n\r\n")


def test_trailer_fields_never_join_the_head() -> None:
    """A chunked request's trailer fields stay out of its head's headers when the whole request arrives at once
    (llhttp reports them as header fields: they were appended to the head already queued)."""
    parser = RequestParser(BIG)
    parser.feed(_TRAILED)
    head = parser.events[0]
    assert isinstance(head, Head)
    assert [name for name, _ in head.headers] == [b"host", b"transfer-encoding", b"connection"]


class _RawOrigin:
    """An origin on loopback that keeps the bytes of the one request it gets and answers 200 with no body."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            while not self.received.endswith(b"0\r\n\r\n"):
                piece = conn.recv(65536)
                if not piece:
                    break
                self.received += piece
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_a_trailer_never_reaches_the_origin_as_a_header(lab, start_proxy) -> None:
    """A chunked request sent in one write reaches the origin with its own head only: its trailer fields (here an
    Authorization) are never forwarded as header fields, unseen by whatever checked the head (RFC 9110 6.5.1)."""
    origin = _RawOrigin()
    try:
        proxy = start_proxy({"svc.yaml": f"version: v1\nservice: svc\nallow:\n  - host: web.test\n"
                                         f"    ports: [{origin.port}]\n"})
        authority = f"web.test:{origin.port}"
        answer = raw_request(proxy.address, _TRAILED.replace(b"api.test", authority.encode()))
        assert answer.startswith(b"HTTP/1.1 200")
        wait_for(lambda: origin.received.endswith(b"0\r\n\r\n"), what="the request at the origin")
        head = origin.received.partition(b"\r\n\r\n")[0].lower()
        assert b"transfer-encoding: chunked" in head
        assert b"authorization" not in head and b"x-trailer" not in head
    finally:
        origin.close()


@pytest.mark.parametrize("framing", [b"Content-Length: 5", b"Transfer-Encoding: chunked"], ids=["length", "chunked"])
def test_a_connect_with_a_body_is_refused(framing: bytes) -> None:
    """A CONNECT that announces a body is refused 400: llhttp takes what follows as the tunnel, h11 (and a front
    proxy that reads it so) as a body, and the bytes after a head must never be read two ways."""
    head = _head(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n" + framing + b"\r\n\r\n")
    with pytest.raises(BadRequest):
        parse_target(head)
