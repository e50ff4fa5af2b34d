"""The ``pod-ip`` identity source: a client's source address in an index of the cluster's Pods.

::

    API server ──list /api/v1/pods (pages)──▶ PodTable.replace ─┐
               ──watch from its resourceVersion──▶ PodTable.apply ├─▶ lookup(ip) -> Identity | None
                 ADDED/MODIFIED/DELETED/BOOKMARK, ERROR 410       ┘     (None until the first list, and while stale)

:class:`PodIndex` keeps a :class:`egressd.identity.podtable.PodTable` (the
pure rules: uid, phase, hostNetwork, shared addresses) current by list+watch,
the way client-go's reflector does:

* list every page (``limit``/``continue``), then watch from the list's
  ``resourceVersion`` with ``allowWatchBookmarks=true``; every event and
  bookmark moves the resourceVersion on;
* a watch the API server ends (it does after ``timeoutSeconds``) is re-opened
  at once from the last resourceVersion; a ``410 Gone`` (the HTTP status of a
  watch request, or an ERROR event with code 410 in the stream) means that
  version is gone from the server's history: list again;
* any other failure (connection refused or cut, timeout, 5xx, 401/403) is
  retried with a doubling, jittered, bounded pause.

Freshness: the connection works while a watch is open (its response head has
come, however quiet it is since) after a list that succeeded. It stops working
when a request fails or a watch ends; a watch that sends nothing, not even a
bookmark, for ``Timing.idle_timeout`` is taken for a dead connection and ended.
Once it has not worked for more than ``max_stale`` seconds,
:meth:`PodIndex.lookup` answers None (``pod-ip`` identifies no one) until a
list has completed again, and :meth:`PodIndex.not_ready` says why, for
``/readyz``. A connection that dies without a sound is noticed within
``idle_timeout``, so lookups stop at most ``idle_timeout + max_stale`` after it.

The client is kubernetes_asyncio (aiohttp): its configuration loaders (a
kubeconfig file, or in a pod the service account's token and CA with
``KUBERNETES_SERVICE_HOST``/``PORT``; the token is re-read as the kubelet
rotates it) and its generated ``list_pod_for_all_namespaces`` with the raw
response, whose JSON is read here line by line. Files are read off the event
loop; every request and every read of the stream has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog

from egressd.identity import Identity
from egressd.identity.podtable import EXPIRED, Expired, PodTable, WatchError

log = structlog.get_logger("egressd")

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # token and ca.crt in a pod
CLOSE_TIMEOUT = 5.0  # seconds to close the HTTP client when the index stops
LIST_RESTARTS = 3  # times a paged list starts over when its continue token expires, before it counts as failed


@dataclass(frozen=True, slots=True)
class Timing:
    """How long the index waits for the API server, and how it backs off."""

    request_timeout: float = 30.0  # one page of the list, or the response head of a watch
    watch_seconds: int = 300  # timeoutSeconds of each watch: the API server ends it then, and it is re-opened
    idle_timeout: float = 120.0  # a watch silent this long (no event, no bookmark) is taken for dead and re-opened
    backoff_min: float = 0.5  # first pause after a failure; doubles per failure in a row (jittered)
    backoff_max: float = 30.0  # longest pause
    page_size: int = 500  # pods per list page


class ApiError(Exception):
    """The API server answered a request with an error status (its ``Status`` message when it sent one)."""

    def __init__(self, status: int, message: str) -> None:
        hint = {
            401: " (the credentials were not accepted: the service account token, or the kubeconfig's user)",
            403: " (the service account needs list and watch on pods in every namespace: a ClusterRole)",
        }.get(status, "")
        super().__init__(f"HTTP {status}: {message}{hint}")
        self.status = status


class ClientConfigError(Exception):
    """The Kubernetes client configuration (kubeconfig, or the in-cluster files and environment) does not load."""


# What a failed attempt can raise (malformed JSON included); anything else is a bug and ends run().
_FAILURES: tuple[type[BaseException], ...] = (
    ApiError, WatchError, ClientConfigError, OSError, TimeoutError, aiohttp.ClientError,
    ValueError, TypeError, AttributeError,
)


class PodIndex:
    """The cluster's live pods by IP, kept by list+watch of ``/api/v1/pods``; ``run()`` must be running."""

    def __init__(
        self,
        kubeconfig: str | None = None,
        *,
        context: str | None = None,
        service_account: str = SERVICE_ACCOUNT,
        environ: Mapping[str, str] | None = None,
        max_stale: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        timing: Timing = Timing(),
    ) -> None:
        """``kubeconfig`` (and ``context``): a kubeconfig file; None: in-cluster, from the token and ca.crt in
        ``service_account`` and ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` of ``environ``.

        ClientConfigError at once when those files or variables are missing (a start-up check; run() loads them)."""
        if max_stale <= 0:
            raise ValueError("max_stale must be positive")
        self.kubeconfig, self.context = kubeconfig, context
        self.service_account = service_account
        self.environ = os.environ if environ is None else environ
        self._check_config()
        self.max_stale = max_stale
        self.timing = timing
        self._clock = clock
        self._table = PodTable()
        self._synced = False  # a list has completed once
        self._must_list = True  # no list yet, or the last watch ended with 410 Gone
        self._lost_at: float | None = None  # clock time the connection stopped working; None while it works
        self._last_error: str | None = None
        # since the start: lists completed, watch events applied (bookmarks too), 410s, failed attempts
        self.counts = dict.fromkeys(("lists", "events", "expired", "failures"), 0)

    # -- what the identify step and /readyz ask -------------------------------------------------------

    @property
    def synced(self) -> bool:
        """The first list of Pods has completed."""
        return self._synced

    @property
    def connected(self) -> bool:
        """A list has completed and a watch is open now."""
        return self._synced and self._lost_at is None

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion the index is current at (the next watch starts from it)."""
        return self._table.resource_version

    def lookup(self, ip: str) -> Identity | None:
        """The pod at ``ip``; None if no single live pod holds it, or the index is not synced or is stale."""
        if not self._synced or self._outage_exceeded():
            return None
        return self._table.lookup(ip)

    def not_ready(self) -> str | None:
        """Why ``pod-ip`` cannot identify anyone now, or None when it can."""
        why = None
        if not self._synced:
            why = "the first list of Pods has not completed"
        elif self._outage_exceeded():
            assert self._lost_at is not None
            why = (
                f"no working list/watch connection for {self._clock() - self._lost_at:.0f} s "
                f"(--pod-index-max-stale {self.max_stale:g} s)"
            )
        if why is not None and self._last_error:
            why += f"; last error: {self._last_error}"
        return why

    def _outage_exceeded(self) -> bool:
        lost = self._lost_at
        return lost is not None and self._clock() - lost > self.max_stale

    def _lost(self) -> None:
        if self._lost_at is None:
            self._lost_at = self._clock()

    # -- the list+watch loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled; failures are logged and retried with a bounded backoff."""
        api = None
        failures = 0
        try:
            while True:
                try:
                    if api is None:
                        api = await self._client()
                    progressed = await self._cycle(api)
                except _FAILURES as exc:
                    progressed = False
                    self.counts["failures"] += 1
                    self._lost()
                    self._last_error = _describe(exc)
                except Exception:
                    log.exception("pod_index.crashed")  # a bug: lookups fail closed once max_stale has passed
                    raise
                if progressed:
                    failures = 0
                    continue
                failures += 1
                pause = min(self.timing.backoff_max, self.timing.backoff_min * 2 ** (failures - 1))
                pause *= random.uniform(0.5, 1.0)
                log.warning("pod_index.retry", error=self._last_error, failures=failures, retry_in=round(pause, 3))
                await asyncio.sleep(pause)
        finally:
            self._lost()
            if api is not None:
                with contextlib.suppress(TimeoutError):  # never in place of the cancellation under way
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await api.close()

    async def _cycle(self, api: Any) -> bool:
        """A list when one is due, then one watch; True when the API server made progress (no backoff)."""
        listed, events = False, self.counts["events"]
        if self._must_list or self._outage_exceeded():
            await self._list(api)
            listed = True
        try:
            return await self._watch(api) or listed
        except Expired as exc:
            self._must_list = True
            self.counts["expired"] += 1
            self._last_error = _describe(exc)
            log.info("pod_index.expired", resource_version=self.resource_version, detail=str(exc))
            return not listed or self.counts["events"] > events  # at once after a fresh list: back off

    async def _list(self, api: Any) -> None:
        """Every page of the pods of all namespaces, then the table replaced in one step."""
        core = _core(api)
        items: list[Any] = []
        version, token, pages, restarts = None, None, 0, 0
        while True:
            async with _deadline(self.timing.request_timeout, "a page of the list of pods"):
                resp = await core.list_pod_for_all_namespaces(
                    limit=self.timing.page_size, _continue=token, _preload_content=False
                )
                try:
                    body = await resp.read()
                finally:
                    resp.release()
            if resp.status == EXPIRED and token is not None and restarts < LIST_RESTARTS:
                # the continue token outlived the server's snapshot: list again from the first page
                items, version, token, pages, restarts = [], None, None, 0, restarts + 1
                continue
            page = _json(resp.status, body)
            meta = page.get("metadata") or {}
            items.extend(page.get("items") or ())
            version = version or meta.get("resourceVersion")
            pages += 1
            token = meta.get("continue") or None
            if token is None:
                break
        self._table.replace(items, version)
        self._synced, self._must_list, self._lost_at = True, False, None
        self.counts["lists"] += 1
        log.info("pod_index.listed", pods=len(items), indexed=len(self._table), pages=pages,
                 resource_version=version, shared_ips=len(self._table.shared()))

    async def _watch(self, api: Any) -> bool:
        """One watch from the current resourceVersion until the server ends it; True when it delivered.

        Raises Expired (410, either form) and the failures of :data:`_FAILURES`."""
        timing = self.timing
        started, events = asyncio.get_running_loop().time(), self.counts["events"]
        try:
            async with _deadline(timing.request_timeout, "the watch request"):
                resp = await _core(api).list_pod_for_all_namespaces(
                    watch=True, allow_watch_bookmarks=True, resource_version=self.resource_version,
                    timeout_seconds=timing.watch_seconds, _preload_content=False,
                )
            try:
                if resp.status != 200:
                    async with _deadline(timing.request_timeout, "the body of an error status"):
                        body = await resp.content.read(65536)
                    if resp.status == EXPIRED:
                        raise Expired(EXPIRED, *_status_fields(body))
                    raise _status_error(resp.status, body)
                if self._outage_exceeded():
                    return True  # connected again, but too late to trust the events since: list first
                self._lost_at = None
                while True:
                    try:
                        async with asyncio.timeout(timing.idle_timeout):
                            line = await resp.content.readline()
                    except TimeoutError:
                        log.info("pod_index.watch_idle", seconds=timing.idle_timeout)
                        return True
                    if not line:  # the server ended it: progress, unless it did so at once and said nothing
                        return self.counts["events"] > events or asyncio.get_running_loop().time() - started >= 1.0
                    if line.strip():
                        self._table.apply(orjson.loads(line))
                        self.counts["events"] += 1
            finally:
                resp.close()
        finally:
            self._lost()

    def _check_config(self) -> None:
        if self.kubeconfig is not None:
            if not os.path.isfile(self.kubeconfig):
                raise ClientConfigError(f"the kubeconfig {self.kubeconfig} is not a file")
            return
        missing = [v for v in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT") if not self.environ.get(v)]
        missing += [f for f in ("token", "ca.crt") if not os.path.isfile(os.path.join(self.service_account, f))]
        if missing:
            raise ClientConfigError(
                f"not in a pod with a service account ({', '.join(missing)} missing in the environment or "
                f"{self.service_account}): give --kubeconfig, or mount the service account token"
            )

    async def _client(self) -> Any:
        """An ApiClient configured from the kubeconfig or in-cluster (the files read in a thread)."""
        from kubernetes_asyncio.client import ApiClient, Configuration
        from kubernetes_asyncio.config import load_incluster_config, load_kube_config

        cfg = Configuration()
        sa = self.service_account
        where = f"kubeconfig {self.kubeconfig}" if self.kubeconfig is not None else f"in-cluster ({sa})"
        try:
            async with _deadline(self.timing.request_timeout, "loading the client configuration"):
                if self.kubeconfig is not None:  # (an exec credential plugin may run: its own loop, in the thread)
                    load = load_kube_config(self.kubeconfig, self.context, cfg, persist_config=False)
                    await asyncio.to_thread(asyncio.run, load)  # type: ignore[arg-type]
                else:
                    await asyncio.to_thread(
                        load_incluster_config, cfg, token_filename=os.path.join(sa, "token"),
                        cert_filename=os.path.join(sa, "ca.crt"), environ=dict(self.environ),
                    )
                reread = cfg.refresh_api_key_hook
                if reread is not None:  # it re-reads the rotated token file: in a thread, not on the loop

                    async def refresh(config: Any) -> None:
                        await asyncio.to_thread(reread, config)

                    cfg.refresh_api_key_hook = refresh
            return ApiClient(cfg)
        except Exception as exc:  # the library's many errors, mapped to one at this boundary
            raise ClientConfigError(f"the Kubernetes client configuration does not load ({where}): {exc}") from exc


@contextlib.asynccontextmanager
async def _deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """asyncio.timeout whose TimeoutError says what did not finish in time."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise TimeoutError(f"no answer to {what} within {seconds:g} s") from None


def _core(api: Any) -> Any:
    from kubernetes_asyncio.client import CoreV1Api

    return CoreV1Api(api)


def _json(status: int, body: bytes) -> dict[str, Any]:
    """The JSON object of a 200 response; ApiError for any other status."""
    if status != 200:
        raise _status_error(status, body)
    data = orjson.loads(body)
    if not isinstance(data, dict):
        raise ValueError(f"the API server answered a list with {type(data).__name__}, not an object")
    return data


def _status_fields(body: bytes) -> tuple[str, str]:
    """(reason, message) of a ``Status`` body; ("", the start of the body) when it is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return "", body[:200].decode("utf-8", "replace")
    return str(data.get("reason", "")), str(data.get("message", ""))


def _status_error(status: int, body: bytes) -> ApiError:
    """An error status, with the reason and message of its ``Status`` body when there is one."""
    reason, message = _status_fields(body)
    return ApiError(status, f"{reason}: {message}" if reason else message)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
