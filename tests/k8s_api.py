"""A Kubernetes API server on loopback: Pods, Namespaces and ConfigMaps, listed, watched and written.

The one mock the tests allow themselves: a real HTTP server (aiohttp) that
answers a real client (kubernetes_asyncio, configured from a kubeconfig over
HTTP, or in-cluster over HTTPS with a trustme CA and a bearer token) in the
shape the real API server does, over the objects of a :class:`k8s_store.Store`:

* collections: ``/api/v1/pods``, ``/api/v1/configmaps`` (every namespace),
  ``/api/v1/namespaces/{ns}/pods``, ``/api/v1/namespaces/{ns}/configmaps``,
  ``/api/v1/namespaces`` (cluster-scoped); items:
  ``/api/v1/namespaces/{ns}/configmaps/{name}`` (and pods),
  ``/api/v1/namespaces/{name}``;
* ``GET`` a collection ``?limit=N&continue=T&labelSelector=S&fieldSelector=F``:
  a ``PodList`` / ``NamespaceList`` / ``ConfigMapList`` (``kind``,
  ``apiVersion``, ``metadata.resourceVersion``, ``metadata.continue`` and
  ``remainingItemCount`` while pages remain, ``items`` without kind and
  apiVersion), every page a snapshot of the first page's moment; label
  selectors are equality-based (``k=v``, ``k!=v``, ``k``, ``!k``, comma
  lists), field selectors ``metadata.name`` and ``metadata.namespace``;
* ``GET`` a collection ``?watch=1&resourceVersion=R&allowWatchBookmarks=true&timeoutSeconds=T``
  (same selectors): newline-delimited JSON events ``{"type": ..., "object": ...}``
  after ``R`` from the history, then live ones, ended after ``T`` seconds (a
  bookmark first, when allowed); no ``R`` (or ``0``): the objects of the moment
  as ADDED first. An object that starts matching a watch's selectors is ADDED
  to it, one that stops matching is DELETED from it (its previous content), as
  the real server's watch cache does. ``R`` older than the history kept:
  ``410 Gone`` as the HTTP status with a ``Status`` body, or as an ERROR event
  in a 200 stream (:meth:`KubeApi.expire` chooses which, as the real server
  answers either way);
* ``GET`` an item; ``POST`` a collection (create: 409 AlreadyExists when
  present, 404 when its namespace is missing, 403 when it is terminating);
  ``PUT`` an item (replace: 404 when absent, 409 Conflict when the body's
  ``metadata.resourceVersion`` is stale, none: unconditional); ``DELETE`` an
  item (404 when absent, 409 when a ``preconditions`` of the DeleteOptions
  body fails; a ``Status`` of Success as the answer), a Namespace with
  everything in it. Refusals carry the ``Status`` body the real server words;
* every change, by a request or by the test (:meth:`add`, :meth:`modify`,
  :meth:`delete`), gets the next resourceVersion (one counter for every kind,
  as the server stamps it) and an event to every watch it matches;
  :meth:`advance` moves the version as writes to other kinds of objects do
  (which only bookmarks then show).

The test steers it from any thread (it usually runs in a
:class:`egressd.lab.LabThread`): change objects, push bookmarks, expire the
history, cut connections, fail every request with a status, pause (requests
and streams hang), go down (connections refused) and come back; it reads the
objects with :meth:`read` and :meth:`items`. :attr:`requests` records every
request received, in order.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import json
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson
import trustme
from aiohttp import web

from k8s_store import (
    RESOURCES,
    ApiStatus,
    Change,
    Filter,
    Store,
    configmap,
    namespace,
    parse_fields,
    parse_labels,
    pod,
    resource_of,
    status_object,
    typed,
    with_ip,
    with_phase,
)

__all__ = ["KubeApi", "Seen", "configmap", "flag", "namespace", "pod", "status_object", "with_ip", "with_phase"]

T = TypeVar("T")

CONTROL_TIMEOUT = 5.0  # seconds a control call from another thread waits for the server's loop
HOLD_LIMIT = 60.0  # seconds a paused request or stream waits at most
MAX_WATCH_SECONDS = 120.0  # a watch without timeoutSeconds ends after this (the real server picks 30-60 min)
_CUT = object()  # tells a watch stream that its connection was cut
_FAILURES = {  # status -> (reason, message) as the API server words them; {verb} {resource} filled in
    403: ("Forbidden", '{resource} is forbidden: User "system:serviceaccount:egress:egressd" cannot {verb} '
          'resource "{resource}" in API group "" {scope}'),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: an error on the server has prevented the request"),
    503: ("ServiceUnavailable", "The server is currently unable to handle the request"),
}
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "DELETE": "delete"}


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, str]
    authorization: str | None

    @property
    def watch(self) -> bool:
        return flag(self.query.get("watch"))


def flag(value: str | None) -> bool:
    """A boolean query parameter as the API server reads it: absent, empty, "0" and "false" are false."""
    return bool(value) and value != "0" and value.lower() != "false"  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class Route:
    """What a request's path names: a resource, a namespace (None: all, or cluster-scoped), an item's name."""

    resource: str
    namespace: str | None
    name: str | None


def route(path: str) -> Route | None:
    parts = path.strip("/").split("/")
    if parts[:2] != ["api", "v1"]:
        return None
    rest = parts[2:]
    if len(rest) == 1 and rest[0] in RESOURCES:
        return Route(rest[0], None, None)
    if len(rest) == 2 and rest[0] == "namespaces":
        return Route("namespaces", None, rest[1])
    if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[2] in RESOURCES and RESOURCES[rest[2]].namespaced:
        return Route(rest[2], rest[1], rest[3] if len(rest) == 4 else None)
    return None


class _Watch:
    """One open watch stream: what it selects, the changes still to write (None: end it; _CUT: its connection is
    gone; a dict: an event as it is)."""

    def __init__(self, selection: Filter, bookmarks: bool) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.selection = selection
        self.bookmarks = bookmarks


class KubeApi:
    """The server; ``objects`` (Pods, and Namespaces and ConfigMaps by their ``kind``) are there from the start,
    each with a resourceVersion."""

    def __init__(
        self, objects: Iterable[dict[str, Any]] = (), *, ca: trustme.CA | None = None, token: str | None = None
    ) -> None:
        """``ca``: serve HTTPS with a certificate for 127.0.0.1 from it; ``token``: demand ``Bearer token``."""
        self.requests: list[Seen] = []
        self._ca, self._token = ca, token
        self._store = Store()
        self._published = self._store.version  # changes up to this version have gone to the watches
        self._gone_form = "status"
        self._watches: set[_Watch] = set()
        self._failing: int | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: web.Server | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._ssl: ssl.SSLContext | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        for item in objects:
            self._write("ADDED", item)

    # -- life ---------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        if host not in ("127.0.0.1", "::1"):
            raise ValueError(f"the mock API server binds loopback only, not {host}")
        self._loop = asyncio.get_running_loop()
        if self._ca is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ca.issue_cert(host).configure_cert(self._ssl)
        self._server = web.Server(self._handle, handler_cancellation=True)
        self.address = (host, port)
        await self._listen()
        return self.address

    async def stop(self) -> None:
        self._running.set()
        await self._unlisten()
        if self._server is not None:
            await self._server.shutdown(1.0)

    async def _listen(self) -> None:
        assert self._loop is not None and self._server is not None
        self._listener = await self._loop.create_server(
            self._server, *self.address, ssl=self._ssl, reuse_address=True
        )
        self.address = self._listener.sockets[0].getsockname()[:2]

    async def _unlisten(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._cut()
            self._listener = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{'https' if self._ca else 'http'}://{host if ':' not in host else f'[{host}]'}:{port}"

    # -- how clients find it ------------------------------------------------------------------------

    def kubeconfig(self, path: Path) -> str:
        """Write a kubeconfig for this server (its CA and token when it has them) to ``path``."""
        cluster: dict[str, Any] = {"server": self.url}
        if self._ca is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self._ca.cert_pem.bytes()).decode()
        user = {"token": self._token} if self._token else {}
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": cluster}],
            "users": [{"name": "egressd", "user": user}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "egressd"}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return str(path)

    def service_account(self, directory: Path) -> dict[str, str]:
        """Write the in-cluster files (``token``, ``ca.crt``) to ``directory``; returns the pod's environment."""
        if self._ca is None or self._token is None:
            raise ValueError("in-cluster clients need HTTPS and a token: KubeApi(ca=..., token=...)")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(self._token)
        self._ca.cert_pem.write_to_path(str(directory / "ca.crt"))
        host, port = self.address
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(port)}

    # -- what the test reads ------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return str(self._store.version)

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def lists(self) -> list[Seen]:
        """The list requests received (GET of a collection, not a watch)."""
        return [r for r in self.requests if r.method == "GET" and not r.watch and _is_collection(r.path)]

    def watches(self) -> list[Seen]:
        return [r for r in self.requests if r.watch]

    def writes(self) -> list[Seen]:
        """The POST, PUT and DELETE requests received."""
        return [r for r in self.requests if r.method != "GET"]

    def read(self, resource: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The stored object (with kind and apiVersion), or None."""
        return self._call(lambda: _typed_or_none(resource, self._store.find(resource, namespace, name)))

    def items(self, resource: str, *, namespace: str | None = None, labels: str = "",
              fields: str = "") -> list[dict[str, Any]]:
        """The stored objects a list with these selectors returns (with kind and apiVersion)."""
        selection = Filter(resource, namespace, parse_labels(labels), parse_fields(fields))
        return self._call(lambda: [typed(resource, o) for o in self._store.select(selection)])

    # -- what the test does (from any thread) -------------------------------------------------------

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the object (ADDED; a Pod unless its ``kind`` says otherwise); returns the stored object."""
        return self._call(lambda: self._write("ADDED", obj))

    def modify(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace the object of that kind, namespace and name (MODIFIED)."""
        return self._call(lambda: self._write("MODIFIED", obj))

    def delete(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Delete the object of that kind, namespace and name (DELETED, with its last state); a Namespace with
        everything in it."""
        return self._call(lambda: self._write("DELETED", obj))

    def advance(self, by: int = 1) -> str:
        """Move the resourceVersion on, as writes to other kinds of objects do."""

        def go() -> str:
            self._store.version += by
            self._published = self._store.version
            return self.version

        return self._call(go)

    def bookmark(self) -> str:
        """Send a BOOKMARK at the current resourceVersion to every watch that allows them."""

        def go() -> str:
            for watch in self._watches:
                if watch.bookmarks:
                    watch.queue.put_nowait(self._bookmark(watch.selection.resource))
            return self.version

        return self._call(go)

    def expire(self, form: str = "status") -> None:
        """Forget the history (and paged-list snapshots): a watch from an older resourceVersion than the current
        one gets 410 Gone, as the HTTP ``status`` or as an ERROR ``event`` in a 200 stream."""
        if form not in ("status", "event"):
            raise ValueError(f"form is status or event, not {form!r}")

        def go() -> None:
            self._gone_form = form
            self._store.forget()

        self._call(go)

    def error_event(self, code: int = 410) -> None:
        """Send an ERROR event (a Status with ``code``) to every open watch and end them."""

        def go() -> None:
            reason = "Expired" if code == 410 else "InternalError"
            event = {"type": "ERROR", "object": status_object(code, reason, f"watch ended: {reason}")}
            for watch in self._watches:
                watch.queue.put_nowait(event)
                watch.queue.put_nowait(None)

        self._call(go)

    def stray(self, line: Any) -> None:
        """Send ``line`` as one more line of JSON on every open watch: something no server should send (a list, a
        number), for the client's handling of what is not an event."""

        def go() -> None:
            for watch in self._watches:
                watch.queue.put_nowait(line)

        self._call(go)

    def cut(self) -> None:
        """Abort every connection (open watches included), as a network failure would."""
        self._call(self._cut)

    def fail(self, status: int | None) -> None:
        """Answer every request with ``status`` (and a Status body) until ``fail(None)``."""

        def go() -> None:
            self._failing = status

        self._call(go)

    def pause(self) -> None:
        """Hold every request, and every open stream, without a byte until :meth:`resume`."""
        self._call(self._running.clear)

    def resume(self) -> None:
        self._call(self._running.set)

    def down(self) -> None:
        """Stop listening (connections are refused) and abort every connection."""
        self._call_async(self._unlisten())

    def up(self) -> None:
        """Listen again on the same address."""
        self._call_async(self._listen())

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None or _running_loop() is loop:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the calling thread
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(CONTROL_TIMEOUT)

    def _call_async(self, coro: Any) -> None:
        if self._loop is None or _running_loop() is self._loop:
            coro.close()
            raise RuntimeError("call down() and up() from another thread than the server's loop (a LabThread)")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    # -- the state ----------------------------------------------------------------------------------

    def _write(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        change = self._store.commit(resource_of(obj), kind, obj)
        self._publish()
        return typed(change.resource, change.obj) if "kind" in obj else copy.deepcopy(change.obj)

    def _publish(self) -> None:
        """Hand every change since the last call to the open watches."""
        for change in self._store.since(self._published):
            for watch in self._watches:
                watch.queue.put_nowait(change)
        self._published = self._store.version

    def _bookmark(self, resource: str) -> dict[str, Any]:
        # what the server sends: an empty object but for the resourceVersion (Go zero values included)
        meta = {"resourceVersion": self.version, "creationTimestamp": None}
        body = {"Pod": {"spec": {"containers": None}, "status": {}}, "Namespace": {"spec": {}, "status": {}},
                "ConfigMap": {}}[RESOURCES[resource].kind]
        return {"type": "BOOKMARK", "object": {"kind": RESOURCES[resource].kind, "apiVersion": "v1", "metadata": meta,
                                               **body}}

    def _cut(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(_CUT)
        self._watches.clear()
        if self._server is not None:
            for handler in self._server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    # -- HTTP ---------------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        self.requests.append(Seen(request.method, request.path, query, request.headers.get("Authorization")))
        await asyncio.wait_for(self._running.wait(), HOLD_LIMIT)
        if self._token is not None and request.headers.get("Authorization") != f"Bearer {self._token}":
            return _status(401, "Unauthorized", "Unauthorized")
        where = route(request.path)
        if self._failing is not None:
            reason, text = _FAILURES.get(self._failing, _FAILURES[500])
            verb = "watch" if flag(query.get("watch")) else _VERBS.get(request.method, "get")
            if request.method == "GET" and where is not None and where.name is None and verb == "get":
                verb = "list"
            scope = f'in the namespace "{where.namespace}"' if where and where.namespace else "at the cluster scope"
            return _status(self._failing, reason, text.format(resource=where.resource if where else "pods", verb=verb,
                                                              scope=scope))
        if where is None or request.method not in _VERBS:
            return _status(404, "NotFound", f"the server could not find the requested resource ({request.path})")
        if request.method != "GET" and (request.method == "POST") != (where.name is None):
            return _status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        try:
            if request.method == "GET" and where.name is None:
                selection = Filter(where.resource, where.namespace, parse_labels(query.get("labelSelector", "")),
                                   parse_fields(query.get("fieldSelector", "")))
                if flag(query.get("watch")):
                    return await self._watch(request, query, selection)
                return self._list(query, selection)
            if request.method == "GET":
                assert where.name is not None
                return _json(200, self._store.get(where.resource, where.namespace, where.name))
            body = await request.read()
            return self._change(request.method, where, orjson.loads(body) if body else {})
        except ApiStatus as exc:
            return _json(exc.code, status_object(exc.code, exc.reason, exc.message, exc.details))
        except orjson.JSONDecodeError as exc:
            return _status(400, "BadRequest", f"the body of the request was in an unknown format: {exc}")

    def _change(self, method: str, where: Route, body: dict[str, Any]) -> web.Response:
        store = self._store
        if method == "POST":
            change = store.create(where.resource, where.namespace, body)
        elif method == "PUT":
            assert where.name is not None
            change = store.replace(where.resource, where.namespace, where.name, body)
        else:
            assert where.name is not None
            change = store.delete(where.resource, where.namespace, where.name, body)
        self._publish()
        if method == "DELETE":  # the server answers a deletion with a Status of Success (Pods: the object)
            if where.resource == "pods":
                return _json(200, typed(where.resource, change.obj))
            meta = change.obj["metadata"]
            return _json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                               "details": {"name": meta["name"], "kind": where.resource, "uid": meta.get("uid")}})
        return _json(201 if method == "POST" else 200, typed(where.resource, change.obj))

    def _list(self, query: dict[str, str], selection: Filter) -> web.Response:
        version, page, token = self._store.page(selection, int(query.get("limit") or 0), query.get("continue"))
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if token is not None:
            meta.update({"continue": token, "remainingItemCount": len(self._store.snapshots[token][1])})
        kind = RESOURCES[selection.resource].kind + "List"
        return _json(200, {"kind": kind, "apiVersion": "v1", "metadata": meta, "items": page})

    async def _watch(self, request: web.BaseRequest, query: dict[str, str], selection: Filter) -> web.StreamResponse:
        since = query.get("resourceVersion") or "0"
        seconds = min(float(query.get("timeoutSeconds") or MAX_WATCH_SECONDS), MAX_WATCH_SECONDS)
        gone = since != "0" and int(since) < self._store.oldest
        if gone and self._gone_form == "status":
            return _status(410, "Expired", f"too old resource version: {since} ({self._store.oldest})")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if gone:
            error = status_object(410, "Expired", f"too old resource version: {since} ({self._store.oldest})")
            await resp.write(_line({"type": "ERROR", "object": error}))
            await resp.write_eof()
            return resp
        watch = _Watch(selection, flag(query.get("allowWatchBookmarks")))
        if since == "0":  # from "any" version: the current objects as ADDED first
            for obj in self._store.select(selection):
                watch.queue.put_nowait({"type": "ADDED", "object": typed(selection.resource, obj)})
        else:
            for change in self._store.since(int(since)):
                watch.queue.put_nowait(change)
        self._watches.add(watch)
        deadline = time.monotonic() + seconds
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        item = await watch.queue.get()
                except TimeoutError:  # the server ends the watch; a bookmark first, as the real one does
                    if watch.bookmarks:
                        await resp.write(_line(self._bookmark(selection.resource)))
                    break
                if item is _CUT:
                    return resp
                if item is None:
                    break
                event = selection.view(item) if isinstance(item, Change) else item
                if event is None:
                    continue
                await asyncio.wait_for(self._running.wait(), HOLD_LIMIT)
                await resp.write(_line(event))
            await resp.write_eof()
        except ConnectionError:  # the client went away
            return resp
        finally:
            self._watches.discard(watch)
        return resp


def _is_collection(path: str) -> bool:
    where = route(path)
    return where is not None and where.name is None


def _typed_or_none(resource: str, obj: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if obj is None else typed(resource, obj)


def _line(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event) + b"\n"


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _status(code: int, reason: str, message: str) -> web.Response:
    return _json(code, status_object(code, reason, message))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
