"""The request loop of a client connection that speaks HTTP/1.x to the proxy.

Shared by the explicit listener (absolute-form requests and CONNECT) and the
transparent one (origin-form requests named by ``Host``): read each request
head (:func:`read_head`), name its destination (the listener's ``parse``),
hand it to the :class:`~egressd.listeners.forward.Forwarder` or, for CONNECT,
to the listener's tunnel; every request on a kept-alive connection is decided
again and gets its own record. At a gateway each request is identified by its
one ``Proxy-Authorization`` (:func:`credentials_of`; several are a bad
request). Errors become the answers of :func:`error_response` (403 with
``X-Egressd-Reason``, 400, 502, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from egressd.connection import Client, Engine
from egressd.errors import BadRequest, ProxyError
from egressd.hostport import IPAddress
from egressd.listeners import client_ip, internal_error
from egressd.listeners.forward import DONE, SPLICED, Forwarder
from egressd.listeners.httpio import CLOSED, next_event, whole_response
from egressd.policy.model import Reason
from egressd.records import Record
from egressd.relay import Side
from egressd.sniff.http import Head, RequestParser
from egressd.sniff.target import Target

log = structlog.get_logger("egressd.requests")

Tunnel = Callable[[Engine, Record, Side, Target], Awaitable[None]]


def error_response(status: int, reason: Reason, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """egressd's own answer: the status, ``X-Egressd-Reason``, ``extra`` headers and a one-line body."""
    headers = [(b"X-Egressd-Reason", reason.value.encode()), *extra, (b"Content-Type", b"text/plain; charset=utf-8")]
    return whole_response(status, headers, body)



async def serve_requests(
    engine: Engine,
    client: Side,
    who: Client,
    rec: Record,
    *,
    listener: str,
    parse: Callable[[Head], Target],
    tunnel: Tunnel | None = None,
    original: IPAddress | None = None,
) -> None:
    """Serve the requests of one client connection, each named by ``parse`` and decided again, one record each.

    ``rec`` is the first request's record. A CONNECT (a Target with ``connect``)
    is handed to ``tunnel``; a spliced connection (a tunnel, a WebSocket)
    outlives this call, and its record then belongs to :meth:`Engine.splice`.
    ``original`` is where a redirected client was going (transparent listener).
    """
    requests = RequestParser(engine.config.max_header_bytes)
    forwarder = None
    spliced = False
    try:
        first = True
        while True:
            head = await read_head(engine, client, requests, first)
            if head is None:
                if not first:
                    rec.emitted = True  # the client ended a kept-alive connection: no request, no record
                else:
                    rec.note("the client closed the connection before sending a request")
                return
            rec.protocol = "connect" if head.method == b"CONNECT" else "http"
            if not first and (refused := engine.audit_refusal()) is not None:  # a kept-alive connection's next
                raise refused
            first = False
            if engine.identifier.fixed is None:  # the gateway: every request is identified by its own credentials
                engine.identify(rec, who.ip, credentials_of(head))
            target = parse(head)
            if target.connect and tunnel is not None:
                if forwarder is not None:  # plain HTTP first, then CONNECT: its upstream is done with
                    forwarder.close()
                    forwarder = None
                client.buffer[:0] = requests.rest  # the tunnel's first bytes, sent right behind the head
                await tunnel(engine, rec, client, target)
                spliced = True
                return
            if forwarder is None:
                forwarder = Forwarder(engine, client, requests, original)
            outcome = await forwarder.exchange(rec, head, target)
            if outcome is SPLICED:
                spliced = True
                return
            if outcome is DONE:
                return
            rec = engine.open(who, listener, follows=rec)
    except ProxyError as exc:
        answered = rec.status is not None
        if exc.dest is not None and rec.host is None:
            rec.host, rec.port = exc.dest.host, exc.dest.port
        engine.fail(rec, exc)
        if answered and rec.protocol == "http":  # a response cut short: a reset, never a clean end of stream
            client.reset()
        elif answered:  # 200 to CONNECT went out: no error answer can follow it
            client.close()
        else:
            client.write(error_response(exc.status, exc.reason, engine.denial_body(rec, exc), exc.headers))
            client.linger()
    except asyncio.CancelledError:
        rec.note("the proxy shut down")
        client.abort()
        raise
    except Exception as exc:  # a bug must cost one connection, never the process; the record still goes out
        internal_error(rec, client, exc)
    finally:
        if not spliced:
            if forwarder is not None:
                forwarder.close()
            engine.close(rec)
            if not client.lingering:
                client.close()



def credentials_of(head: Head) -> bytes | None:
    """The request's one Proxy-Authorization value; BadRequest for several (which one would be the client's?)."""
    values = [value for name, value in head.headers if name == b"proxy-authorization"]
    if len(values) > 1:
        raise BadRequest(f"the request has {len(values)} Proxy-Authorization headers; send one")
    return values[0] if values else None


async def read_head(engine: Engine, client: Side, requests: RequestParser, first: bool) -> Head | None:
    """The next request head; None when the client closes cleanly between requests.

    The first request must arrive within header_timeout; a kept-alive connection
    may wait idle_timeout for its next request, then header_timeout for its head.
    """
    cfg = engine.config
    loop = asyncio.get_running_loop()
    if not first and not requests.events and not client.buffer and not client.eof:
        try:
            await client.read_more(loop.time() + cfg.idle_timeout)
        except TimeoutError:
            return None
    timeout = cfg.header_timeout
    event = await engine.heads.reading(client, client_ip(client), next_event(
        client, requests, loop.time() + timeout,
        stalled=lambda: BadRequest(f"no complete request head within {timeout:g}s", status=408),
    ))
    if event is CLOSED:
        if requests.in_head:
            raise BadRequest("the client closed the connection in the middle of its request head")
        return None
    if not isinstance(event, Head):
        raise BadRequest("request body bytes where a request head was expected")
    return event
