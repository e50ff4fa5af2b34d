"""A Kubernetes API server for Pods on loopback: list and watch ``/api/v1/pods`` from recorded objects.

The one mock the tests allow themselves: a real HTTP server (aiohttp) that
answers a real client (kubernetes_asyncio, configured from a kubeconfig over
HTTP, or in-cluster over HTTPS with a trustme CA and a bearer token) in the
shape the real API server does:

* ``GET /api/v1/pods?limit=N&continue=T``: a ``PodList`` (``kind``,
  ``apiVersion``, ``metadata.resourceVersion``, ``metadata.continue`` and
  ``remainingItemCount`` while pages remain, ``items`` without kind and
  apiVersion), every page a snapshot of the first page's moment;
* ``GET /api/v1/pods?watch=1&resourceVersion=R&allowWatchBookmarks=true&timeoutSeconds=T``:
  newline-delimited JSON events ``{"type": ..., "object": ...}`` after ``R``
  from the history, then live ones, ended after ``T`` seconds (a bookmark
  first, when allowed); ``R`` older than the history kept: ``410 Gone`` as the
  HTTP status with a ``Status`` body, or as an ERROR event in a 200 stream
  (:meth:`KubeApi.expire` chooses which, as the real server answers either way);
* every change (:meth:`add`, :meth:`modify`, :meth:`delete`) gets the next
  resourceVersion, as the server stamps it; :meth:`advance` moves the version
  as writes to other kinds of objects do (which only bookmarks then show).

The test steers it from any thread (it usually runs in a
:class:`egressd.lab.LabThread`): push events, expire the history, cut
connections, fail every request with a status, pause (requests and streams
hang), go down (connections refused) and come back. :attr:`requests` records
every request received, in order.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import json
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson
import trustme
from aiohttp import web

T = TypeVar("T")

CONTROL_TIMEOUT = 5.0  # seconds a control call from another thread waits for the server's loop
HOLD_LIMIT = 60.0  # seconds a paused request or stream waits at most
MAX_WATCH_SECONDS = 120.0  # a watch without timeoutSeconds ends after this (the real server picks 30-60 min)
_CUT = object()  # tells a watch stream that its connection was cut
_FAILURES = {  # status -> (reason, message) as the API server words them
    403: ("Forbidden", 'pods is forbidden: User "system:serviceaccount:egress:egressd" cannot list resource '
          '"pods" in API group "" at the cluster scope'),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: an error on the server has prevented the request"),
    503: ("ServiceUnavailable", "The server is currently unable to handle the request"),
}


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


def pod(
    name: str,
    ip: str | tuple[str, ...] | None = "10.244.1.10",
    *,
    namespace: str = "default",
    serviceaccount: str | None = "default",
    phase: str = "Running",
    host_network: bool = False,
    uid: str | None = None,
    labels: dict[str, str] | None = None,
    node: str = "node-a",
    node_ip: str = "192.168.49.2",
) -> dict[str, Any]:
    """A Pod as the API server returns it; ``ip``: one address, a tuple (``podIPs``, dual stack), or None (no
    IP yet); ``serviceaccount`` None leaves ``spec.serviceAccountName`` out."""
    ips = (ip,) if isinstance(ip, str) else tuple(ip or ())
    if host_network:
        ips = (node_ip,)
    app = labels or {"app": name.rsplit("-", 2)[0]}
    spec: dict[str, Any] = {
        "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ]}}],
        "containers": [{
            "name": "app", "image": "registry.example/app:1.4.2",
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "resources": {}, "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
            "volumeMounts": [{"name": "kube-api-access", "readOnly": True,
                              "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        }],
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "nodeName": node, "securityContext": {}, "schedulerName": "default-scheduler",
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 300},
        ],
        "priority": 0, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
    }
    if serviceaccount is not None:
        spec["serviceAccountName"] = serviceaccount
        spec["serviceAccount"] = serviceaccount  # the deprecated alias the server still fills in
    if host_network:
        spec["hostNetwork"] = True  # the server omits the field when false
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None,
             "lastTransitionTime": "2026-11-02T09:14:03Z"},
        ],
        "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
        "startTime": "2026-11-02T09:14:03Z", "qosClass": "BestEffort",
    }
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": a} for a in ips]
    return {
        "metadata": {
            "name": name, "generateName": name.rsplit("-", 1)[0] + "-", "namespace": namespace,
            "uid": uid or str(uuid.uuid4()), "resourceVersion": "0",
            "creationTimestamp": "2026-11-02T09:14:03Z", "labels": app,
        },
        "spec": spec,
        "status": status,
    }


def with_ip(obj: dict[str, Any], ip: str | tuple[str, ...] | None) -> dict[str, Any]:
    """A copy of the pod with other addresses (None: none yet)."""
    new = copy.deepcopy(obj)
    ips = (ip,) if isinstance(ip, str) else tuple(ip or ())
    new["status"].pop("podIP", None)
    new["status"].pop("podIPs", None)
    if ips:
        new["status"]["podIP"] = ips[0]
        new["status"]["podIPs"] = [{"ip": a} for a in ips]
    return new


def with_phase(obj: dict[str, Any], phase: str) -> dict[str, Any]:
    """A copy of the pod in another phase (a pod that has ended keeps its IP in status)."""
    new = copy.deepcopy(obj)
    new["status"]["phase"] = phase
    return new


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class _Watch:
    """One open watch stream: the events still to write (None: end it; _CUT: its connection is gone)."""

    def __init__(self, bookmarks: bool) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.bookmarks = bookmarks


class KubeApi:
    """The server; ``pods`` are there from the start (each gets a resourceVersion)."""

    def __init__(
        self, pods: Iterable[dict[str, Any]] = (), *, ca: trustme.CA | None = None, token: str | None = None
    ) -> None:
        """``ca``: serve HTTPS with a certificate for 127.0.0.1 from it; ``token``: demand ``Bearer token``."""
        self.requests: list[Seen] = []
        self._ca, self._token = ca, token
        self._version = 1000
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: list[tuple[int, dict[str, Any]]] = []
        self._oldest = 0  # a watch from an older resourceVersion is answered 410
        self._gone_form = "status"
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # continue token -> (version, rest)
        self._watches: set[_Watch] = set()
        self._failing: int | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: web.Server | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._ssl: ssl.SSLContext | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        for item in pods:
            self._change("ADDED", item)

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
        return str(self._version)

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def lists(self) -> list[Seen]:
        return [r for r in self.requests if not r.watch]

    def watches(self) -> list[Seen]:
        return [r for r in self.requests if r.watch]

    # -- what the test does (from any thread) -------------------------------------------------------

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the pod (ADDED); returns the stored object."""
        return self._call(lambda: self._change("ADDED", obj))

    def modify(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace the pod of that namespace and name (MODIFIED)."""
        return self._call(lambda: self._change("MODIFIED", obj))

    def delete(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Delete the pod of that namespace and name (DELETED, with its last state)."""
        return self._call(lambda: self._change("DELETED", obj))

    def advance(self, by: int = 1) -> str:
        """Move the resourceVersion on, as writes to other kinds of objects do."""

        def go() -> str:
            self._version += by
            return self.version

        return self._call(go)

    def bookmark(self) -> str:
        """Send a BOOKMARK at the current resourceVersion to every watch that allows them."""

        def go() -> str:
            event = {"type": "BOOKMARK", "object": self._bookmark_object()}
            for watch in self._watches:
                if watch.bookmarks:
                    watch.queue.put_nowait(event)
            return self.version

        return self._call(go)

    def expire(self, form: str = "status") -> None:
        """Forget the history (and paged-list snapshots): a watch from an older resourceVersion than the current
        one gets 410 Gone, as the HTTP ``status`` or as an ERROR ``event`` in a 200 stream."""
        if form not in ("status", "event"):
            raise ValueError(f"form is status or event, not {form!r}")

        def go() -> None:
            self._oldest, self._gone_form = self._version, form
            self._history.clear()
            self._snapshots.clear()

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

    def _change(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if kind == "ADDED" and key in self._objects:
            raise ValueError(f"pod {key} exists already")
        if kind != "ADDED" and key not in self._objects:
            raise ValueError(f"no pod {key}")
        self._version += 1
        stored = copy.deepcopy(obj if kind != "DELETED" else self._objects[key])
        stored["metadata"]["resourceVersion"] = str(self._version)
        if kind == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = stored
        event = {"type": kind, "object": {"kind": "Pod", "apiVersion": "v1", **stored}}
        self._history.append((self._version, event))
        for watch in self._watches:
            watch.queue.put_nowait(event)
        return copy.deepcopy(stored)

    def _bookmark_object(self) -> dict[str, Any]:
        # what the server sends: an empty Pod but for the resourceVersion (Go zero values included)
        return {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": self.version,
                "creationTimestamp": None}, "spec": {"containers": None}, "status": {}}

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
        if self._failing is not None:
            return _status(self._failing, *_FAILURES.get(self._failing, _FAILURES[500]))
        if request.method != "GET" or request.path != "/api/v1/pods":
            return _status(404, "NotFound", f"the server could not find the requested resource ({request.path})")
        if flag(query.get("watch")):
            return await self._watch(request, query)
        return self._list(query)

    def _list(self, query: dict[str, str]) -> web.Response:
        token = query.get("continue")
        if token:
            if token not in self._snapshots:
                return _status(410, "Expired", "The provided continue parameter is too old to display a "
                               "consistent list result. You can start a new list without the continue parameter.")
            version, items = self._snapshots.pop(token)
        else:
            version = self._version
            items = [copy.deepcopy(o) for _, o in sorted(self._objects.items())]
        limit = int(query.get("limit") or 0) or len(items) or 1
        page, rest = items[:limit], items[limit:]
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if rest:
            token = secrets.token_urlsafe(12)
            self._snapshots[token] = (version, rest)
            meta.update({"continue": token, "remainingItemCount": len(rest)})
        return _json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page})

    async def _watch(self, request: web.BaseRequest, query: dict[str, str]) -> web.StreamResponse:
        since = query.get("resourceVersion") or "0"
        seconds = min(float(query.get("timeoutSeconds") or MAX_WATCH_SECONDS), MAX_WATCH_SECONDS)
        gone = since != "0" and int(since) < self._oldest
        if gone and self._gone_form == "status":
            return _status(410, "Expired", f"too old resource version: {since} ({self._oldest})")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if gone:
            error = status_object(410, "Expired", f"too old resource version: {since} ({self._oldest})")
            await resp.write(_line({"type": "ERROR", "object": error}))
            await resp.write_eof()
            return resp
        watch = _Watch(flag(query.get("allowWatchBookmarks")))
        if since == "0":  # from "any" version: the current objects as ADDED first
            backlog = [{"type": "ADDED", "object": {"kind": "Pod", "apiVersion": "v1", **o}}
                       for _, o in sorted(self._objects.items())]
        else:
            backlog = [event for version, event in self._history if version > int(since)]
        for event in backlog:
            watch.queue.put_nowait(event)
        self._watches.add(watch)
        deadline = time.monotonic() + seconds
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        event = await watch.queue.get()
                except TimeoutError:  # the server ends the watch; a bookmark first, as the real one does
                    if watch.bookmarks:
                        await resp.write(_line({"type": "BOOKMARK", "object": self._bookmark_object()}))
                    break
                if event is _CUT:
                    return resp
                if event is None:
                    break
                await asyncio.wait_for(self._running.wait(), HOLD_LIMIT)
                await resp.write(_line(event))
            await resp.write_eof()
        except ConnectionError:  # the client went away
            return resp
        finally:
            self._watches.discard(watch)
        return resp


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

