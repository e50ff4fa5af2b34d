"""The allowlist sync: the allowlist ConfigMap mirrored into every namespace labelled for injection.

::

    watch namespaces (INJECT_LABEL=INJECT_ENABLED) ───┐
    watch the source (fieldSelector metadata.name=) ──┼─▶ wake ─▶ reconcile: list the labelled namespaces and the
    watch the copies (MANAGED_BY_LABEL=SYNC_MANAGER) ─┘    ▲      ConfigMaps of the name ─▶ plan() ─▶ writes
                                      every resync_interval ┘

A ConfigMap can only be mounted in its own namespace, so each sidecar reads a
copy in its own. The reconciler is level-triggered: a watch event or the
periodic resync only wakes it (coalesced); it lists the state, the pure
:func:`egressd.allowlistplan.plan` says what to change (its docstring has the
rules), and it creates, updates (with the copy's resourceVersion) or deletes
(with it as a precondition) the copies.

Two replicas may run it at once, with no leader election: every write is
idempotent. A create answered 409 AlreadyExists, an update answered 409
Conflict or 404, and a delete whose precondition fails (409) are conflicts:
the state is listed and planned again after a short jittered pause; a delete
answered 404 is done. Any other failure (connection refused or cut, timeouts,
5xx, 401/403) is logged, counted and retried with a doubling, jittered,
bounded pause: the process never stops for one.

Watches resume from their last resourceVersion (events and bookmarks move it);
after a ``410 Gone`` (the HTTP status, or an ERROR event) they start again from
the current state and the reconcile that follows lists everything. A watch
silent for ``Timing.idle_timeout`` is taken for a dead connection. The client,
its paged lists and its watches are :mod:`egressd.kubeclient`'s, as the pod
index's are.

API verbs used (the ClusterRole grants these only): namespaces list, watch;
configmaps list, watch, create, update, delete, in every namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
import structlog

from egressd import kube, kubeclient
from egressd.allowlistplan import (
    Action,
    ApiError,
    ConfigMap,
    Expired,
    Verb,
    configmap_from,
    copy_body,
    done,
    namespace_from,
    plan,
    result_of,
    skip_detail,
    source_missing,
    watch_event,
)
from egressd.kubeclient import SERVICE_ACCOUNT, ClientConfig, ClientConfigError, Timing
from egressd.metrics import SyncMetrics

log = structlog.get_logger("egressd")

WRITES_AT_ONCE = 8  # creates, updates and deletes in flight at once
_PAST = {Verb.CREATE: "created", Verb.UPDATE: "updated", Verb.DELETE: "deleted"}

# What a failed attempt can raise (malformed JSON included); anything else is a bug.
_FAILURES: tuple[type[BaseException], ...] = (
    ApiError, ClientConfigError, OSError, TimeoutError, aiohttp.ClientError, ValueError, TypeError, KeyError,
    AttributeError,
)


class AllowlistSync:
    """Keeps the copies of one ConfigMap right while ``run()`` runs."""

    def __init__(
        self,
        kubeconfig: str | None = None,
        *,
        namespace: str = kube.NAMESPACE,
        configmap: str = kube.ALLOWLISTS_CONFIGMAP,
        resync_interval: float = 300.0,
        metrics: SyncMetrics | None = None,
        service_account: str = SERVICE_ACCOUNT,
        environ: Mapping[str, str] | None = None,
        timing: Timing = kubeclient.DEFAULT_TIMING,
    ) -> None:
        """``kubeconfig``: a kubeconfig file; None: in-cluster (the token and ca.crt in ``service_account``, and
        ``KUBERNETES_SERVICE_HOST``/``PORT`` in ``environ``). ClientConfigError at once when those are missing."""
        if resync_interval <= 0:
            raise ValueError("resync_interval must be positive")
        self.config = ClientConfig(kubeconfig, None, service_account, environ)
        self.namespace, self.name, self.ref = namespace, configmap, f"{namespace}/{configmap}"
        self._injected = f"{kube.INJECT_LABEL}={kube.INJECT_ENABLED}"  # the selectors of the lists and watches
        self._owned = f"{kube.MANAGED_BY_LABEL}={kube.SYNC_MANAGER}"
        self._named = f"metadata.name={configmap}"
        self.resync_interval, self.timing = resync_interval, timing
        self.metrics = metrics or SyncMetrics()
        self.reconciles = 0  # reconciles that left every copy right
        self.listed_version: str | None = None  # the resourceVersion of the state the last reconcile acted on
        self._wake = asyncio.Event()
        self._reconciled = False  # a reconcile has listed everything and applied its plan
        self._source: ConfigMap | None = None  # as the last reconcile listed it
        self._last_error: str | None = None

    def not_ready(self) -> str | None:
        """Why ``/readyz`` answers 503, or None once a reconcile has completed and while the source exists."""
        if not self._reconciled:
            why = "the first reconcile of the allowlist copies has not completed"
            return f"{why}; last error: {self._last_error}" if self._last_error else why
        return None if self._source is not None else source_missing(self.ref)

    async def run(self) -> None:
        """Watch and reconcile until cancelled; failures are logged and retried."""
        api = await self._connect()
        core = kubeclient.core(api)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._reconcile_loop(core))
                tasks.create_task(self._watch_loop("namespaces", lambda **kw: core.list_namespace(
                    label_selector=self._injected, **kw)))
                tasks.create_task(self._watch_loop("source", lambda **kw: core.list_namespaced_config_map(
                    self.namespace, field_selector=self._named, **kw)))
                tasks.create_task(self._watch_loop("copies", lambda **kw: core.list_config_map_for_all_namespaces(
                    label_selector=self._owned, **kw)))
        finally:
            await kubeclient.close(api)

    # -- the reconciler -----------------------------------------------------------------------------

    async def _reconcile_loop(self, core: Any) -> None:
        self._wake.set()
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                right = await self._reconcile(core)
            except _FAILURES as exc:
                self._last_error = kubeclient.describe(exc)
                self.metrics.errors["list"] += 1
                log.warning("allowlist_sync.error", reason="list", error=self._last_error)
                right = False
            if right:
                failures = 0
                continue
            failures += 1
            await asyncio.sleep(kubeclient.backoff(self.timing, failures))
            self._wake.set()

    async def _reconcile(self, core: Any) -> bool:
        """List, plan, write; True when every copy is right (no conflict, no failed write)."""
        listed = await kubeclient.list_all(core.list_namespace, self.timing, "a list", ApiError,
                                           label_selector=self._injected)
        namespaces, version = [namespace_from(o) for o in listed.items], listed.resource_version
        listed = await kubeclient.list_all(core.list_config_map_for_all_namespaces, self.timing, "a list", ApiError,
                                           field_selector=self._named)
        maps = [configmap_from(o) for o in listed.items]
        source = next((m for m in maps if m.namespace == self.namespace), None)
        copies = [m for m in maps if m.namespace != self.namespace]
        actions = plan(source, self.ref, namespaces, copies)
        for action in actions:
            if action.verb is Verb.SKIP:
                self._report(action, source)
        if source is None:
            self.metrics.errors["source_missing"] += 1
            log.error("allowlist_sync.error", reason="source_missing", source=self.ref, detail=source_missing(self.ref))
        writes = [a for a in actions if a.verb is not Verb.SKIP]
        limit = asyncio.Semaphore(WRITES_AT_ONCE)

        async def write(action: Action) -> str:
            assert source is not None  # plan() writes nothing without a source
            async with limit:
                return await self._write(core, source, action)

        results = await asyncio.gather(*(write(a) for a in writes))
        ours = {m.namespace for m in copies if m.managed and m.copy_of in (None, self.ref)}
        for action, result in zip(writes, results, strict=True):
            if action.verb is Verb.CREATE and done(action.verb, result):
                ours.add(action.namespace)
            elif action.verb is Verb.DELETE and done(action.verb, result):
                ours.discard(action.namespace)
        self.metrics.copies = len(ours)
        self._source, self._reconciled, self.listed_version = source, True, version
        if not all(done(a.verb, r) for a, r in zip(writes, results, strict=True)):
            return False
        self._last_error = None
        self.reconciles += 1
        self.metrics.last_success = time.time()
        return True

    async def _write(self, core: Any, source: ConfigMap, action: Action) -> str:
        """One create, update or delete; its result (:func:`egressd.allowlistplan.result_of`), logged and counted."""
        ns, name, verb, error = action.namespace, self.name, action.verb, ""
        try:
            async with kubeclient.deadline(self.timing.request_timeout, f"the {verb} of ConfigMap {ns}/{name}"):
                if verb is Verb.CREATE:
                    resp = await core.create_namespaced_config_map(ns, copy_body(source, ns), _preload_content=False)
                elif verb is Verb.UPDATE:
                    resp = await core.replace_namespaced_config_map(
                        name, ns, copy_body(source, ns, action.resource_version), _preload_content=False)
                else:
                    resp = await core.delete_namespaced_config_map(
                        name, ns, body={"preconditions": {"resourceVersion": action.resource_version}},
                        _preload_content=False)
                try:
                    body = await resp.read()
                finally:
                    resp.release()
            result = result_of(resp.status)
            if result != "success":
                error = str(ApiError(resp.status, body))
        except _FAILURES as exc:
            result, error = "error", kubeclient.describe(exc)
        self.metrics.actions[(str(verb), result)] += 1
        fields = {"namespace": ns, "configmap": name, "reason": str(action.reason),
                  "source_resource_version": source.resource_version}
        if done(verb, result):
            log.info(f"allowlist_sync.{_PAST[verb]}", **fields, already_gone=result == "not_found")
        elif result == "error":
            self.metrics.errors["write"] += 1
            self._last_error = error
            log.error("allowlist_sync.error", action=str(verb), error=error, **fields)
        else:
            log.info("allowlist_sync.conflict", action=str(verb), detail=error, **fields)
        return result

    def _report(self, action: Action, source: ConfigMap | None) -> None:
        self.metrics.errors[str(action.reason)] += 1
        log.error("allowlist_sync.error", namespace=action.namespace, configmap=self.name, reason=str(action.reason),
                  source_resource_version=source.resource_version if source else None,
                  detail=skip_detail(action, self.name, self.ref))

    # -- the watches --------------------------------------------------------------------------------

    async def _watch_loop(self, what: str, call: Callable[..., Any]) -> None:
        """Watch one kind of object until cancelled; every change wakes the reconciler."""
        cursor = _Cursor()
        failures = 0
        while True:
            try:
                if cursor.version is None:
                    self._wake.set()  # from the current state: what happened before it is for a reconcile to see
                progressed = await self._watch(call, cursor)
            except Expired as exc:
                log.info("allowlist_sync.expired", watch=what, resource_version=cursor.version, detail=str(exc))
                cursor.version, progressed = None, True
            except _FAILURES as exc:
                self.metrics.errors["watch"] += 1
                log.warning("allowlist_sync.watch_retry", watch=what, error=kubeclient.describe(exc),
                            failures=failures + 1)
                progressed = False
            if progressed:
                failures = 0
                continue
            failures += 1
            await asyncio.sleep(kubeclient.backoff(self.timing, failures))

    async def _watch(self, call: Callable[..., Any], cursor: _Cursor) -> bool:
        """One watch from the cursor until the server ends it; True when it made progress."""
        timing, loop = self.timing, asyncio.get_running_loop()
        started, events = loop.time(), cursor.events
        async with kubeclient.watch(call, cursor.version, timing, _watch_error) as resp:
            while True:
                line = await kubeclient.next_line(resp, timing.idle_timeout)
                if line is None:
                    return True
                if not line:  # the server ended it: progress, unless it did so at once and said nothing
                    return cursor.events > events or loop.time() - started >= 1.0
                if line.strip():
                    version, change = watch_event(orjson.loads(line))
                    cursor.version, cursor.events = version or cursor.version, cursor.events + 1
                    if change:
                        self._wake.set()

    async def _connect(self) -> Any:
        """An ApiClient (:meth:`egressd.kubeclient.ClientConfig.connect`), retried until the configuration loads."""
        failures = 0
        while True:
            try:
                return await self.config.connect(self.timing.request_timeout)
            except ClientConfigError as exc:
                failures += 1
                self._last_error = str(exc)
                log.error("allowlist_sync.error", reason="client", error=self._last_error)
                await asyncio.sleep(kubeclient.backoff(self.timing, failures))


class _Cursor:
    """Where one watch is: the resourceVersion it resumes from (None: the current state), the events it saw."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.events = 0


def _watch_error(status: int, body: bytes) -> ApiError:
    """The error of a watch request's status: Expired for 410 Gone (start again from the current state)."""
    return (Expired if status == kubeclient.GONE else ApiError)(status, body)
