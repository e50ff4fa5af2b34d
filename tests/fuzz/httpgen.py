"""Hypothesis strategies for HTTP/1.x requests built from hostile parts (smuggling headers, odd line endings,
obs-fold, bad chunk sizes, control bytes), each part hostile with a probability drawn per request."""

from __future__ import annotations

from hypothesis import strategies as st

# Each pool: (ordinary spellings, hostile ones).
_HOSTS = (["api.test", "API.Test.", "a.b.test", "127.0.0.1", "[::1]", "[2001:db8::1]", "xn--bcher-kva.test"],
          ["bücher.test", "0x7f.1", "127.1", "a..test", "a_b.test", "", "a.test%00", "[fe80::1%25eth0]"])
_PORTS = (["", ":80", ":443", ":8080"], [":0", ":65535", ":65536", ":080", ":+1", ":"])
_METHODS = (["GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE"], ["get", "FOO", "G\x00T", ""])
_VERSIONS = (["HTTP/1.1", "HTTP/1.0"], ["HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.01", "HTTP/11", "HTTP/1.1 "])
_PATHS = (["/", "/a?b=c", "/%2e%2e/", "//x"], ["/a#frag", "", "/\x7f", "/a b", "/é"])
_NAMES = (["Host", "host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "X-A"],
          ["Proxy-Authorization", "Host ", " Host", "Transfer_Encoding", "Content-Length\x00", "X\x7fY", ""])
_VALUES = (["api.test", "api.test:80", "a.b.test", "0", "5", "chunked", "Chunked", "keep-alive, Upgrade", "close",
            "websocket", "h2c", "identity", "gzip, chunked", "", "  v  ", "a\tb", "\x80\xff"],
           ["+5", "-1", "0x5", "5, 5", "05", "1_0", "18446744073709551616", "chunked, chunked", "chunked, gzip",
            " chunked", "chunked ", "chunked\x0b", "\x01", "é"])
_EOLS = (["\r\n"], ["\n", "\r", "\r\r\n", "\n\r"])
_FOLDS = ([""], ["\r\n continued", "\r\n\tx"])
_CHUNK_SIZES = (["{:x}", "{:X}", "0{:x}", "{:x};ext=1"],
                ["{:x} ;a", "{:x}\t", " {:x}", "0x{:x}", "-{:x}", "{:x}0000000000000000000", "g"])


@st.composite
def pick(draw: st.DrawFn, pool: tuple[list[str], list[str]], hostility: int) -> str:
    """A spelling from ``pool``: a hostile one with probability about ``hostility`` percent."""
    valid, hostile = pool
    return draw(st.sampled_from(hostile if draw(st.integers(0, 99)) < hostility else valid))


@st.composite
def targets(draw: st.DrawFn, method: str, hostility: int) -> str:
    """A request target: authority-form for CONNECT, absolute-form otherwise, now and then any other form."""
    host, port = draw(pick(_HOSTS, hostility)), draw(pick(_PORTS, hostility))
    path = draw(pick(_PATHS, hostility))
    if draw(st.integers(0, 99)) >= hostility:
        return f"{host}{port}" if method == "CONNECT" else f"http://{host}{port}{path}"
    return draw(st.sampled_from([
        f"{host}{port}", f"http://{host}{port}{path}", f"https://{host}{port}/", f"ws://{host}{port}/",
        f"ftp://{host}/", f"HTTP://{host}{port}/", f"http://user:pw@{host}{port}/", path, "*",
        draw(st.text(max_size=20)),
    ]))


@st.composite
def chunked_body(draw: st.DrawFn, hostility: int) -> str:
    """A chunked body whose size lines come in hostile spellings now and then, its last chunk now and then left
    out."""
    pieces = []
    for data in draw(st.lists(st.text(alphabet="abc\r\n", min_size=1, max_size=12), max_size=3)):
        size = draw(pick(_CHUNK_SIZES, hostility)).format(len(data.encode()))
        pieces.append(f"{size}{draw(pick(_EOLS, hostility))}{data}{draw(pick(_EOLS, hostility))}")
    if draw(st.integers(0, 99)) >= hostility // 2:
        trailer = draw(st.sampled_from(["", "X-T: 1\r\n", "X-T 1\r\n"]))
        pieces.append(f"0\r\n{trailer}\r\n")
    return "".join(pieces)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One request (sometimes two, pipelined) as bytes, each part hostile with a probability drawn per request."""
    hostility = draw(st.sampled_from([0, 0, 2, 5, 10, 30, 100]))
    method = draw(pick(_METHODS, hostility))
    line = f"{method} {draw(targets(method, hostility))} {draw(pick(_VERSIONS, hostility))}"
    out = [line, draw(pick(_EOLS, hostility))]
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = {"none": "", "length": "hello", "chunked": draw(chunked_body(hostility))}[framing]
    headers = [("Host", draw(pick(_HOSTS, hostility)))] if draw(st.integers(0, 99)) >= hostility // 2 else []
    if framing == "length":
        headers.append(("Content-Length", "5"))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    for _ in range(draw(st.integers(0, 4))):
        value = draw(st.one_of(pick(_VALUES, hostility), st.text(max_size=12))) if hostility else draw(
            pick(_VALUES, hostility))
        headers.insert(draw(st.integers(0, len(headers))), (draw(pick(_NAMES, hostility)), value))
    for name, value in headers:
        space = draw(st.sampled_from([" ", " ", "", "  "]))
        out += [f"{name}:{space}{value}{draw(pick(_FOLDS, hostility))}", draw(pick(_EOLS, hostility))]
    out.append(draw(pick(_EOLS, hostility)))
    data = "".join(out).encode("utf-8", "surrogatepass") + body.encode()
    if draw(st.integers(0, 4)) == 0:
        data += b"GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n"
    return data


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, sorted, repeated ones dropped)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]
