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

The client is kubernetes_asyncio (aiohttp), set up by :mod:`egressd.kubeclient`
(a kubeconfig file, or in a pod the service account's token and CA with
``KUBERNETES_SERVICE_HOST``/``PORT``; the token is re-read as the kubelet
rotates it; files are read off the event loop), which also pages the list and
opens the watch of the generated ``list_pod_for_all_namespaces`` with the raw
response; the watch's JSON is read here line by line. Every request and every
read of the stream has a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
import structlog

from egressd import kubeclient
from egressd.identity import Identity
from egressd.identity.podtable import EXPIRED, Expired, PodTable, WatchError
from egressd.kubeclient import SERVICE_ACCOUNT, ClientConfig, ClientConfigError, Timing

log = structlog.get_logger("egressd")


class ApiError(Exception):
    """The API server answered a request with an error status (its ``Status`` message when it sent one)."""

    def __init__(self, status: int, message: str) -> None:
        hint = {
            401: " (the credentials were not accepted: the service account token, or the kubeconfig's user)",
            403: " (the service account needs list and watch on pods in every namespace: a ClusterRole)",
        }.get(status, "")
        super().__init__(f"HTTP {status}: {message}{hint}")
        self.status = status


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
        timing: Timing = kubeclient.DEFAULT_TIMING,
    ) -> None:
        """``kubeconfig`` (and ``context``): a kubeconfig file; None: in-cluster, from the token and ca.crt in
        ``service_account`` and ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` of ``environ``.

        ClientConfigError at once when those files or variables are missing (a start-up check; run() loads them)."""
        if max_stale <= 0:
            raise ValueError("max_stale must be positive")
        self.config = ClientConfig(kubeconfig, context, service_account, environ)
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
                        api = await self.config.connect(self.timing.request_timeout)
                    progressed = await self._cycle(api)
                except _FAILURES as exc:
                    progressed = False
                    self.counts["failures"] += 1
                    self._lost()
                    self._last_error = kubeclient.describe(exc)
                except Exception:
                    log.exception("pod_index.crashed")  # a bug: lookups fail closed once max_stale has passed
                    raise
                if progressed:
                    failures = 0
                    continue
                failures += 1
                pause = kubeclient.backoff(self.timing, failures)
                log.warning("pod_index.retry", error=self._last_error, failures=failures, retry_in=round(pause, 3))
                await asyncio.sleep(pause)
        finally:
            self._lost()
            if api is not None:
                await kubeclient.close(api)

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
            self._last_error = kubeclient.describe(exc)
            log.info("pod_index.expired", resource_version=self.resource_version, detail=str(exc))
            return not listed or self.counts["events"] > events  # at once after a fresh list: back off

    async def _list(self, api: Any) -> None:
        """Every page of the pods of all namespaces, then the table replaced in one step."""
        listing = await kubeclient.list_all(
            kubeclient.core(api).list_pod_for_all_namespaces, self.timing, "the list of pods", _status_error
        )
        self._table.replace(listing.items, listing.resource_version)
        self._synced, self._must_list, self._lost_at = True, False, None
        self.counts["lists"] += 1
        log.info("pod_index.listed", pods=len(listing.items), indexed=len(self._table), pages=listing.pages,
                 resource_version=listing.resource_version, shared_ips=len(self._table.shared()))

    async def _watch(self, api: Any) -> bool:
        """One watch from the current resourceVersion until the server ends it; True when it delivered.

        Raises Expired (410, either form) and the failures of :data:`_FAILURES`."""
        timing, call = self.timing, kubeclient.core(api).list_pod_for_all_namespaces
        started, events = asyncio.get_running_loop().time(), self.counts["events"]
        try:
            async with kubeclient.watch(call, self.resource_version, timing, _watch_error) as resp:
                if self._outage_exceeded():
                    return True  # connected again, but too late to trust the events since: list first
                self._lost_at = None
                while True:
                    line = await kubeclient.next_line(resp, timing.idle_timeout)
                    if line is None:
                        log.info("pod_index.watch_idle", seconds=timing.idle_timeout)
                        return True
                    if not line:  # the server ended it: progress, unless it did so at once and said nothing
                        return self.counts["events"] > events or asyncio.get_running_loop().time() - started >= 1.0
                    if line.strip():
                        self._table.apply(orjson.loads(line))
                        self.counts["events"] += 1
        finally:
            self._lost()


def _status_error(status: int, body: bytes) -> ApiError:
    """An error status, with the reason and message of its ``Status`` body when there is one."""
    reason, message = kubeclient.status_fields(body)
    return ApiError(status, f"{reason}: {message}" if reason else message)


def _watch_error(status: int, body: bytes) -> Exception:
    """The error of a watch request's status: Expired for 410 Gone (list again), else ApiError."""
    if status == EXPIRED:
        return Expired(EXPIRED, *kubeclient.status_fields(body))
    return _status_error(status, body)
