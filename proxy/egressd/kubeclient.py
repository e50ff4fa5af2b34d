"""The Kubernetes API client, set up and used the same way by egressd's two API-server loops.

Used by :mod:`egressd.identity.podindex` (list+watch of Pods, for the
``pod-ip`` identity) and :mod:`egressd.allowlistsync` (the allowlist ConfigMap's
copies); each keeps its own loop, its own errors and its own logging.

:class:`ClientConfig`
    Where the configuration comes from: a kubeconfig file (and context), or in
    a pod the service account's token and ``ca.crt`` with
    ``KUBERNETES_SERVICE_HOST``/``PORT``. Checked when it is made
    (:class:`ClientConfigError`, a start-up error); :meth:`ClientConfig.connect`
    loads it with kubernetes_asyncio's loaders in a thread (the token file is
    re-read there too, as the kubelet rotates it) and returns an ApiClient
    (:func:`core` gives its CoreV1Api, :func:`close` closes it in bounded time).
:func:`list_all`, :func:`watch`, :func:`next_line`
    The paged list (started over when its continue token expires), the watch
    from a resourceVersion with bookmarks, and its lines with an idle deadline,
    over the generated ``list_*`` calls with the raw response.
:func:`deadline`, :func:`backoff`, :func:`describe`, :func:`status_fields`
    Every request has a deadline whose error says what did not finish; failures
    are retried after a doubling, jittered, bounded pause (:class:`Timing`) and
    reported in one line; an error's ``Status`` body gives its reason and
    message (:mod:`egressd.allowlistplan` reads it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # token and ca.crt in a pod
CLOSE_TIMEOUT = 5.0  # seconds to close the HTTP client when a loop stops
LIST_RESTARTS = 3  # times a paged list starts over when its continue token expires, before it counts as failed
GONE = 410  # the resourceVersion (or continue token) asked for is no longer in the API server's history

# (status, body) -> the exception to raise for an answer that is not 200
ErrorFor = Callable[[int, bytes], Exception]


@dataclass(frozen=True, slots=True)
class Timing:
    """How long a loop waits for the API server, and how it backs off."""

    request_timeout: float = 30.0  # one request (a page of a list, a write), or the response head of a watch
    watch_seconds: int = 300  # timeoutSeconds of each watch: the API server ends it then, and it is re-opened
    idle_timeout: float = 120.0  # a watch silent this long (no event, no bookmark) is taken for dead and re-opened
    backoff_min: float = 0.5  # first pause after a failure (or a conflict); doubles per one in a row (jittered)
    backoff_max: float = 30.0  # longest pause
    page_size: int = 500  # objects per list page


DEFAULT_TIMING = Timing()  # the defaults, as an argument's default


class ClientConfigError(Exception):
    """The Kubernetes client configuration (kubeconfig, or the in-cluster files and environment) does not load."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """``kubeconfig`` (and ``context``): a kubeconfig file; None: in-cluster, from the token and ca.crt in
    ``service_account`` and ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` of ``environ`` (None: the
    process's). ClientConfigError at once when those files or variables are missing."""

    kubeconfig: str | None = None
    context: str | None = None
    service_account: str = SERVICE_ACCOUNT
    environ: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.kubeconfig is not None:
            if not os.path.isfile(self.kubeconfig):
                raise ClientConfigError(
                    f"the kubeconfig {self.kubeconfig} is not a file: give --kubeconfig an existing file")
            return
        environ = self._environ()
        missing = [v for v in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT") if not environ.get(v)]
        missing += [f for f in ("token", "ca.crt") if not os.path.isfile(os.path.join(self.service_account, f))]
        if missing:
            raise ClientConfigError(
                f"not in a pod with a service account ({', '.join(missing)} missing in the environment or "
                f"{self.service_account}): give --kubeconfig, or mount the service account token"
            )

    @property
    def where(self) -> str:
        """The configuration's origin, for messages."""
        if self.kubeconfig is not None:
            return f"kubeconfig {self.kubeconfig}"
        return f"in-cluster ({self.service_account})"

    async def connect(self, timeout: float) -> Any:
        """An ApiClient, its configuration loaded within ``timeout`` (files read in a thread); ClientConfigError
        for whatever the library raises."""
        from kubernetes_asyncio.client import ApiClient, Configuration

        cfg = Configuration()
        try:
            async with deadline(timeout, "loading the client configuration"):
                await self._load(cfg)
            _refresh_in_thread(cfg)
            return ApiClient(cfg)
        except Exception as exc:  # the library's many errors, mapped to one at this boundary
            raise ClientConfigError(f"the Kubernetes client configuration does not load ({self.where}): {exc}") from exc

    async def _load(self, cfg: Any) -> None:
        from kubernetes_asyncio.config import load_incluster_config, load_kube_config

        if self.kubeconfig is not None:  # (an exec credential plugin may run: its own loop, in the thread)
            load = load_kube_config(self.kubeconfig, self.context, cfg, persist_config=False)
            await asyncio.to_thread(asyncio.run, load)  # type: ignore[arg-type]
        else:
            sa = self.service_account
            await asyncio.to_thread(
                load_incluster_config, cfg, token_filename=os.path.join(sa, "token"),
                cert_filename=os.path.join(sa, "ca.crt"), environ=dict(self._environ()),
            )

    def _environ(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ


def _refresh_in_thread(cfg: Any) -> None:
    """The configuration's token hook (it re-reads the rotated token file) run in a thread, not on the loop."""
    reread = cfg.refresh_api_key_hook
    if reread is None:
        return

    async def refresh(config: Any) -> None:
        await asyncio.to_thread(reread, config)

    cfg.refresh_api_key_hook = refresh


def core(api: Any) -> Any:
    """The CoreV1Api (pods, namespaces, configmaps) of an ApiClient."""
    from kubernetes_asyncio.client import CoreV1Api

    return CoreV1Api(api)


async def close(api: Any) -> None:
    """Close an ApiClient, giving up after CLOSE_TIMEOUT."""
    with contextlib.suppress(TimeoutError):  # never in place of a cancellation under way
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await api.close()


@dataclass(frozen=True, slots=True)
class Listing:
    """Every item of a paged list, and the resourceVersion it is current at."""

    items: tuple[dict[str, Any], ...]
    resource_version: str | None
    pages: int


async def list_all(call: Callable[..., Any], timing: Timing, what: str, error: ErrorFor, **selectors: str) -> Listing:
    """Every page of ``call`` (a generated ``list_*``), ``what`` naming it in a timeout's message; started over when
    its continue token expires (at most LIST_RESTARTS times). ``error(status, body)`` is raised for any other
    status than 200, ValueError for a page that is not a JSON object."""
    items: list[dict[str, Any]] = []
    version, token, pages, restarts = None, None, 0, 0
    while True:
        async with deadline(timing.request_timeout, f"a page of {what}"):
            resp = await call(limit=timing.page_size, _continue=token, _preload_content=False, **selectors)
            try:
                body = await resp.read()
            finally:
                resp.release()
        if resp.status == GONE and token is not None and restarts < LIST_RESTARTS:
            # the continue token outlived the server's snapshot: list again from the first page
            items, version, token, pages, restarts = [], None, None, 0, restarts + 1
            continue
        if resp.status != 200:
            raise error(resp.status, body)
        page = orjson.loads(body)
        if not isinstance(page, dict):
            raise ValueError(f"the API server answered a list with {type(page).__name__}, not an object")
        meta = page.get("metadata") or {}
        items.extend(page.get("items") or ())
        version, token, pages = version or meta.get("resourceVersion"), meta.get("continue") or None, pages + 1
        if token is None:
            return Listing(tuple(items), version, pages)


@contextlib.asynccontextmanager
async def watch(call: Callable[..., Any], version: str | None, timing: Timing, error: ErrorFor) -> AsyncIterator[Any]:
    """The response of a watch of ``call`` from ``version`` (None: the current state), with bookmarks, whose head
    said 200; ``error(status, body)`` is raised for any other status. The response is closed on leaving."""
    async with deadline(timing.request_timeout, "the watch request"):
        resp = await call(watch=True, allow_watch_bookmarks=True, resource_version=version,
                          timeout_seconds=timing.watch_seconds, _preload_content=False)
    try:
        if resp.status != 200:
            async with deadline(timing.request_timeout, "the body of an error status"):
                body = await resp.content.read(65536)
            raise error(resp.status, body)
        yield resp
    finally:
        resp.close()


async def next_line(resp: Any, idle_timeout: float) -> bytes | None:
    """The next line of a watch: b"" when the server ended it, None when nothing came for ``idle_timeout``."""
    try:
        async with asyncio.timeout(idle_timeout):
            return await resp.content.readline()
    except TimeoutError:
        return None


@contextlib.asynccontextmanager
async def deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """asyncio.timeout whose TimeoutError says what did not finish in time."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise TimeoutError(f"no answer to {what} within {seconds:g} s") from None


def backoff(timing: Timing, failures: int) -> float:
    """The pause after ``failures`` in a row: doubling from backoff_min up to backoff_max, jittered down to half."""
    pause = min(timing.backoff_max, timing.backoff_min * 2 ** (failures - 1))
    return pause * random.uniform(0.5, 1.0)


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def status_fields(body: bytes) -> tuple[str, str]:
    """(reason, message) of a ``Status`` body; ("", the start of the body) when it is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return "", body[:200].decode("utf-8", "replace")
    return str(data.get("reason", "")), str(data.get("message", ""))
