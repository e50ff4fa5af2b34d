"""The mitmproxy addon of the inspection worker: who may hand a tunnel over, which layers run, which requests pass.

One tunnel through the worker (mitmproxy in regular mode on loopback, ``connection_strategy=lazy``)::

    CONNECT <pinned ip>:<port>   http_connect: the secret (Proxy-Authorization), an IP literal target, the
                                 X-Egressd-* headers -> a Tunnel, kept per client connection; else 407/400
    TLS ClientHello              next_layer: TLS, then HTTP, nothing else (no raw TCP, no plaintext, no
                                 secure-web-proxy); the client's leaf is for the tunnel's name (worker.CaTlsConfig)
    each request                 requestheaders: Host/:authority must be the name (host_mismatch), Upgrade
                                 only to websocket, then rules.check_request(inspect, method, target):
                                 refused -> 403 + X-Egressd-Reason, never forwarded (no upstream connection);
                                 allowed -> the normalised path is forwarded, bodies streamed and counted
    upstream                     server_connect: only the tunnel's pinned ip:port; tls_start_server: SNI is the
                                 name, verified against the system trust store (or --inspect-upstream-ca)
    response / error / ws end    one event (a dict) per request to ``emit``

Bodies are streamed (never kept, never logged); the event carries their sizes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from mitmproxy import connection, http, tls
from mitmproxy.net.http import url
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, context, layer, layers, server_hooks
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode

from egressd.hostport import join_host_port
from egressd.inspect import client as wire
from egressd.inspect.rules import Inspect, check_request

log = logging.getLogger("egressd.inspect")

REASON_HEADER = "X-Egressd-Reason"
_KEY = "egressd"  # flow.metadata key of the Exchange
_SAFE = "!$&'()*+,=:@-._~"  # pchar that needs no escape (a normalised segment has no "/", ";", "%", "\\")
_MAX_PATH = 2048  # characters of a path an event keeps
_ALPNS = (None, b"", b"http/1.1", b"h2")


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Tunnel:
    """One handed-over tunnel, from the CONNECT's target and headers."""

    conn_id: str
    sni: str
    service: str
    client: str
    policy: str
    ip: str
    port: int
    inspect: Inspect
    rule: str | None
    requests: int = 0


@dataclass(slots=True)
class Exchange:
    """One request's state between its headers and its event."""

    tunnel: Tunnel
    number: int
    started: float
    method: str
    path: str
    http_version: str
    decision: str = "deny"
    reason: str = "bad_request"
    rule: str | None = None
    detail: str | None = None
    status: int | None = None
    up: int = 0
    down: int = 0
    forwarded: bool = False
    done: bool = False

    def count_up(self, chunk: bytes) -> bytes:
        self.up += len(chunk)
        return chunk

    def count_down(self, chunk: bytes) -> bytes:
        self.down += len(chunk)
        return chunk


def admit(headers: Any, host: str, port: int, secret: str) -> Tunnel:
    """The Tunnel a CONNECT names, or Refused: the secret, an IP literal target, well-formed metadata."""
    scheme, _, token = (headers.get("proxy-authorization") or "").partition(" ")
    try:
        user, _, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        user = password = ""
    if scheme.lower() != "basic" or user != wire.USER or not hmac.compare_digest(password.encode(), secret.encode()):
        raise Refused(407, "this inspection worker takes tunnels from its egressd only (Proxy-Authorization)")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise Refused(400, f"the CONNECT target {host!r} is not an IP address: the worker never resolves "
                      "names") from None
    sni = (headers.get(wire.H_SNI) or "").strip().lower().rstrip(".")
    conn_id = (headers.get(wire.H_CONN) or "").strip()
    if not sni or not conn_id:
        raise Refused(400, f"the CONNECT lacks {wire.H_SNI} or {wire.H_CONN}")
    try:
        inspect, rule = wire.decode_inspect(headers.get(wire.H_INSPECT) or "")
    except ValueError as exc:
        raise Refused(400, str(exc)) from None
    return Tunnel(conn_id, sni, headers.get(wire.H_SERVICE) or "", headers.get(wire.H_CLIENT) or "",
                  headers.get(wire.H_POLICY) or "", ip, port, inspect, rule)


def forwarded_target(normalised: str, raw: str) -> str:
    """The request-target sent upstream: the normalised path re-encoded, and the raw query if any."""
    path = "/".join(quote(segment, safe=_SAFE) for segment in normalised.split("/"))
    query = raw.partition("#")[0].partition("?")
    return path + (query[1] + query[2] if query[1] else "")


class Refuse(layer.Layer):
    """A layer that closes the client connection: what next_layer puts where only TLS-then-HTTP may run."""

    def __init__(self, ctx: context.Context, why: str) -> None:
        super().__init__(ctx)
        self.why = why
        self.closed = False

    def _handle_event(self, event: Any) -> layer.CommandGenerator[None]:
        if not self.closed:
            self.closed = True
            yield commands.Log(f"egressd: closing a tunnel: {self.why}", logging.WARNING)
            yield commands.CloseConnection(self.context.client)


class Inspection:
    """The addon: tunnels by client connection, a decision per request, one event per request."""

    name = "nextlayer"  # it makes the next-layer decisions (mitmproxy's NextLayer addon is not loaded)

    def __init__(self, secret: str, emit: Callable[[dict[str, Any]], None], log_query: bool = False) -> None:
        self.secret = secret
        self.emit = emit
        self.log_query = log_query
        self.tunnels: dict[str, Tunnel] = {}

    # -- the tunnel -----------------------------------------------------------
    def http_connect(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        tunnel = self.tunnels.get(client.id)
        if tunnel is not None or client.tls:
            if tunnel is not None:
                ex = self._exchange(tunnel, flow)
                self._refuse(ex, flow, "request_not_allowed", "a CONNECT inside an inspected tunnel is never allowed")
                ex.down = len(flow.response.raw_content or b"") if flow.response else 0
                self._finish(ex)
            else:
                flow.response = _answer(403, "request_not_allowed", "egressd: no tunnel here")
            return
        try:
            tunnel = admit(flow.request.headers, flow.request.host, flow.request.port, self.secret)
        except Refused as exc:
            log.warning("egressd: refused a CONNECT to %s from %s: %s", flow.request.host, client.peername, exc)
            flow.response = _answer(exc.status, "bad_request", f"egressd inspection worker: {exc}")
            if exc.status == 407:
                flow.response.headers["Proxy-Authenticate"] = 'Basic realm="egressd-inspect"'
            return
        self.tunnels[client.id] = tunnel
        flow.server_conn.sni = tunnel.sni

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client.id, None)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        ctx = nextlayer.context
        if len(ctx.layers) == 1 and isinstance(ctx.layers[0], modes.HttpProxy):
            nextlayer.layer = layers.HttpLayer(ctx, HTTPMode.regular)
            return
        if ctx.client.id not in self.tunnels:
            nextlayer.layer = Refuse(ctx, "no CONNECT opened this tunnel")
        elif not ctx.client.tls:
            data = nextlayer.data_client()
            if not data:
                return  # decided when the first bytes arrive
            if starts_like_tls_record(data):
                server_tls = layers.ServerTLSLayer(ctx)
                server_tls.child_layer = layers.ClientTLSLayer(ctx)
                nextlayer.layer = server_tls
            else:
                nextlayer.layer = Refuse(ctx, "the tunnel does not start with a TLS ClientHello")
        elif ctx.client.alpn in _ALPNS:
            nextlayer.layer = layers.HttpLayer(ctx, HTTPMode.transparent)
        else:
            nextlayer.layer = Refuse(ctx, f"ALPN {ctx.client.alpn!r} is not HTTP")

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        tunnel = self.tunnels.get(data.client.id)
        address = data.server.address
        if tunnel is None or address is None or not _same_address(address, tunnel):
            data.server.error = "egressd: the worker connects only to the address egressd pinned for the tunnel"

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        tunnel = self.tunnels.get(tls_start.context.client.id)
        if tunnel is not None:
            tls_start.conn.sni = tunnel.sni  # the name egressd checked, verified in the origin's certificate

    def tls_failed_client(self, data: tls.TlsData) -> None:
        tunnel = self.tunnels.get(data.context.client.id)
        log.warning("egressd: the client's TLS handshake failed (does the app trust egressd's inspection CA?): "
                    "conn_id=%s sni=%s: %s", tunnel and tunnel.conn_id, tunnel and tunnel.sni, data.conn.error)

    # -- each request -----------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tunnel = self.tunnels.get(flow.client_conn.id)
        if tunnel is None or not flow.client_conn.tls:
            flow.response = _answer(403, "bad_request", "egressd inspection worker: only CONNECT tunnels")
            return
        ex = self._exchange(tunnel, flow)
        request = flow.request
        if not _same_address((request.host, request.port), tunnel):
            return self._refuse(ex, flow, "bad_request", "the request is not for the tunnel's pinned address")
        names = [n for n in (request.data.authority.decode("latin-1"), request.headers.get("host")) if n]
        if not names or any(not _names(n, tunnel) for n in names):
            return self._refuse(ex, flow, "host_mismatch",
                                f"the request names {', '.join(names) or 'no host'}, not {tunnel.sni}", 421)
        upgrade = request.headers.get("upgrade")
        if upgrade is not None and (upgrade.lower() != "websocket" or ex.method != "GET"):
            return self._refuse(ex, flow, "request_not_allowed", f"an upgrade to {upgrade!r} is not inspected")
        raw = request.data.path.decode("latin-1")
        decision = check_request(tunnel.inspect, ex.method, raw)
        if not decision.allowed or decision.path is None:
            why = decision.refusal or f"{ex.method} {decision.path} is in no inspect entry for {tunnel.sni}"
            return self._refuse(ex, flow, decision.reason.value, why)
        ex.decision, ex.reason, ex.rule, ex.forwarded = "allow", decision.reason.value, decision.source, True
        target = forwarded_target(decision.path, raw)
        if target != raw:
            ex.detail = f"forwarded as {target[:_MAX_PATH]}"
            request.path = target
        request.stream = ex.count_up

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = flow.metadata.get(_KEY)
        if ex is not None and ex.forwarded and flow.response is not None:
            flow.response.stream = ex.count_down

    def response(self, flow: http.HTTPFlow) -> None:
        ex = flow.metadata.get(_KEY)
        if ex is None or flow.response is None:
            return
        ex.status = flow.response.status_code
        if not ex.forwarded:
            ex.up = len(flow.request.raw_content or b"")  # read and dropped, never sent
            ex.down = len(flow.response.raw_content or b"")
        if flow.websocket is None:
            self._finish(ex)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        ex = flow.metadata.get(_KEY)
        if ex is not None and flow.websocket is not None and flow.websocket.messages:
            message = flow.websocket.messages[-1]
            if message.from_client:
                ex.up += len(message.content)
            else:
                ex.down += len(message.content)
            flow.websocket.messages.clear()  # counted, not kept

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        ex = flow.metadata.get(_KEY)
        if ex is not None:
            self._finish(ex)

    def error(self, flow: http.HTTPFlow) -> None:
        ex = flow.metadata.get(_KEY)
        if ex is None or ex.done:
            return
        message = flow.error.msg if flow.error else "unknown error"
        client_gone = flow.client_conn.timestamp_end is not None or message.lower().startswith("client")
        if client_gone:
            ex.detail = _join(ex.detail, f"the client went away: {message}")
        elif ex.forwarded:
            ex.reason = "upstream_failure"
            origin = f"{ex.tunnel.sni} at {join_host_port(ex.tunnel.ip, ex.tunnel.port)}"
            ex.detail = _join(ex.detail, f"{origin}: {message}")
            if flow.response is None:
                ex.decision, ex.status = "deny", 502  # nothing came back: as the engine records a failed dial
        self._finish(ex)

    # -- helpers -------------------------------------------------------------------
    def _exchange(self, tunnel: Tunnel, flow: http.HTTPFlow) -> Exchange:
        tunnel.requests += 1
        raw = flow.request.data.path.decode("latin-1")
        path = raw if self.log_query else raw.partition("?")[0]
        method = flow.request.data.method.decode("latin-1")  # as sent: .method upper-cases, HTTP does not
        ex = Exchange(tunnel, tunnel.requests, time.time(), method, path[:_MAX_PATH],
                      flow.request.http_version, rule=tunnel.rule)
        flow.metadata[_KEY] = ex
        return ex

    def _refuse(self, ex: Exchange, flow: http.HTTPFlow, reason: str, detail: str, status: int = 403) -> None:
        ex.reason, ex.detail, ex.status = reason, detail, status
        t = ex.tunnel
        flow.response = _answer(status, reason, f"egressd denied {ex.method} {ex.path} to {t.sni} for service "
                                f"{t.service or '-'}: {reason}: {detail}")

    def _finish(self, ex: Exchange) -> None:
        if ex.done:
            return
        ex.done = True
        t = ex.tunnel
        self.emit({
            "event": "request", "started": ex.started, "conn_id": t.conn_id, "service": t.service,
            "client": t.client, "host": t.sni, "port": t.port, "upstream": join_host_port(t.ip, t.port),
            "request": ex.number, "method": ex.method, "path": ex.path, "http_version": ex.http_version,
            "status": ex.status, "bytes_up": ex.up, "bytes_down": ex.down, "decision": ex.decision,
            "reason": ex.reason, "detail": ex.detail, "rule": ex.rule, "policy_version": t.policy or None,
            "duration_ms": round((time.time() - ex.started) * 1000, 3),
        })


def _answer(status: int, reason: str, text: str) -> http.Response:
    return http.Response.make(status, (text.replace("\n", " ") + "\n").encode("utf-8", "replace"),
                              {REASON_HEADER: reason, "Content-Type": "text/plain; charset=utf-8"})


def _same_address(address: tuple, tunnel: Tunnel) -> bool:
    try:
        return str(ipaddress.ip_address(address[0])) == tunnel.ip and int(address[1]) == tunnel.port
    except ValueError:
        return False


def _names(authority: str, tunnel: Tunnel) -> bool:
    """Whether a Host or :authority value names the tunnel's name (and its port, when it gives one)."""
    try:
        host, port = url.parse_authority(authority, check=True)
    except ValueError:
        return False
    return host.lower().rstrip(".") == tunnel.sni and port in (None, tunnel.port)


def _join(first: str | None, second: str) -> str:
    return second if not first else f"{first}; {second}"
