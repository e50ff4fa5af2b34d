"""The llhttp-based message parsers, sans-io: bytes in any split, events out; h11 as a second opinion."""

from __future__ import annotations

import h11
import pytest

from egressd.errors import BadRequest
from egressd.sniff.http import END, Head, RequestParser, ResponseParser
from egressd.sniff.target import parse_target

GET = b"GET http://web.test/a HTTP/1.1\r\nHost: web.test\r\nUser-Agent: t\r\n\r\n"
POST = b"POST http://web.test/b HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"POST http://web.test/c HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
)


def events_of(parser: RequestParser | ResponseParser, data: bytes, step: int | None = None) -> list:
    for i in range(0, len(data), step or len(data) or 1):
        parser.feed(data[i : i + (step or len(data))])
    out = []
    while parser.events:
        event = parser.events.popleft()
        out.append((event.method, event.target, event.status) if isinstance(event, Head) else event)
    return out


def joined(events: list) -> list:
    """Body pieces joined, so that results from different splits compare equal."""
    out: list = []
    for event in events:
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        else:
            out.append(event)
    return out


@pytest.mark.parametrize("step", [None, 1, 2, 7, 64])
def test_pipelined_requests_give_the_same_events_in_any_split(step):
    """Three pipelined requests (no body, Content-Length, chunked) parse alike whatever the read sizes."""
    events = joined(events_of(RequestParser(8192), GET + POST + CHUNKED, step))
    assert events == [
        (b"GET", b"http://web.test/a", 0), END,
        (b"POST", b"http://web.test/b", 0), b"hello", END,
        (b"POST", b"http://web.test/c", 0), b"abc", END,
    ]


def test_connect_stops_the_parser_and_keeps_the_bytes_behind_it():
    parser = RequestParser(8192)
    events = events_of(parser, b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n\x16\x03\x01")
    assert events[0] == (b"CONNECT", b"api.test:443", 0)
    assert parser.upgraded and parser.rest == b"\x16\x03\x01"
    parser.feed(b"more")
    assert parser.rest == b"\x16\x03\x01more"


def test_head_fields_are_read_once():
    parser = RequestParser(8192)
    parser.feed(b"GET http://web.test/ HTTP/1.0\r\nHost: web.test\r\nX-A: 1\r\n\r\n")
    head = parser.events.popleft()
    assert (head.version, head.keep_alive, head.get(b"x-a"), head.get(b"nope")) == ("1.0", False, b"1", None)
    assert parse_target(head).path == b"/"


@pytest.mark.parametrize(
    ("data", "h11_refuses"),
    [
        # h11 takes these heads and refuses only when it frames the body (h11 raises then, egressd at once)
        (b"POST http://web.test/ HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
         False),
        (b"POST http://web.test/ HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", True),
        (b"POST http://web.test/ HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: gzip\r\n\r\n", True),
        (b"GET http://web.test/ HTTP/1.1\nHost: web.test\n\n", False),  # h11 accepts bare LF; llhttp does not
        (b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n folded\r\n\r\n", False),  # h11 unfolds obs-fold
        (b"GET http://web.test/ HTTP/1.1\r\nBad Name: x\r\n\r\n", True),
        (b"GET http://web.test/ HTTP/1.1\r\nX: a\x00b\r\n\r\n", True),
        (b"GET http://web.test/ HTTP/2.0\r\nHost: web.test\r\n\r\n", False),  # h11 reads any version
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", True),
    ],
    ids=["cl-and-te", "two-lengths", "te-not-chunked", "bare-lf", "obs-fold", "space-in-name", "nul", "http2",
         "tls-bytes"],
)
def test_smuggling_shapes_and_garbage_are_bad_requests(data, h11_refuses):
    """What RFC 9112 refuses in a head is refused at the head; h11, an independent parser, agrees where it
    judges heads alone."""
    with pytest.raises(BadRequest) as caught:
        RequestParser(8192).feed(data)
    assert caught.value.status == 400
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        conn.next_event()
        refused = False
    except h11.RemoteProtocolError:
        refused = True
    assert refused == h11_refuses


@pytest.mark.parametrize("step", [None, 100, 1000])
def test_oversized_heads_get_431_whole_or_in_pieces(step):
    head = b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nX-Big: " + b"a" * 5000
    with pytest.raises(BadRequest) as caught:
        events_of(RequestParser(2048), head + b"\r\n\r\n", step)
    assert caught.value.status == 431


def test_a_large_body_before_a_pipelined_head_is_not_counted_as_head():
    """The 431 bound counts head bytes, not the previous request's body in the same piece."""
    body = b"x" * 10_000
    data = b"POST http://web.test/ HTTP/1.1\r\nHost: web.test\r\nContent-Length: 10000\r\n\r\n" + body
    parser = RequestParser(2048)
    parser.feed(data[:100])
    parser.feed(data[100:] + b"GET http://web.test/ HTTP/1.1\r\n")
    parser.feed(b"Host: web.test\r\n")
    parser.feed(b"\r\n")
    assert [e for e in parser.events if isinstance(e, Head)][-1].method == b"GET"


def test_response_to_head_ends_at_its_head():
    parser = ResponseParser(65536)
    parser.expect_head_only()
    assert events_of(parser, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n") == [(b"", b"", 200), END]


@pytest.mark.parametrize(
    ("data", "eof", "expected"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", False, [(b"", b"", 204), END]),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False,
         [(b"", b"", 100), END, (b"", b"", 200), b"ok", END]),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", True, [(b"", b"", 200), b"until the end", END]),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False,
         [(b"", b"", 200), b"ok", END]),
    ],
    ids=["204", "interim-then-final", "close-delimited", "chunked"],
)
def test_response_framings(data, eof, expected):
    parser = ResponseParser(65536)
    parser.feed(data)
    if eof:
        assert parser.feed_eof()
    assert joined(events_of(parser, b"")) == expected


def test_cut_short_or_malformed_responses():
    parser = ResponseParser(65536)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert not parser.feed_eof()
    with pytest.raises(ValueError, match="HTTP"):
        ResponseParser(65536).feed(b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(ValueError, match="switched protocols"):
        ResponseParser(65536).feed(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
