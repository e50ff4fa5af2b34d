"""The allowlist sync: the plan as tables, then the loop against a Kubernetes API on loopback, then the CLI.

The loop runs :class:`egressd.allowlistsync.AllowlistSync` (kubernetes_asyncio
underneath) against :class:`k8s_api.KubeApi` in a lab thread, and changes the
cluster under it: namespaces labelled and unlabelled, the source edited and
deleted, copies edited by hand, outages, expired watches, a second replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from egressd import kube
from egressd.allowlistplan import (
    Action,
    ApiError,
    ConfigMap,
    Expired,
    Namespace,
    Reason,
    Verb,
    configmap_from,
    copy_body,
    done,
    namespace_from,
    plan,
    result_of,
    watch_event,
)
from egressd.allowlistsync import AllowlistSync, Timing
from egressd.cli import main as cli_main
from egressd.cli.sync import admin_for
from harness import http_get, stop_process
from k8s_api import KubeApi, configmap, namespace

NAME, SOURCE_NS = kube.ALLOWLISTS_CONFIGMAP, kube.NAMESPACE
REF = f"{SOURCE_NS}/{NAME}"
OWNED = {kube.MANAGED_BY_LABEL: kube.SYNC_MANAGER}
ENABLED = {kube.INJECT_LABEL: kube.INJECT_ENABLED}
DATA = {"checkout.yaml": "version: 1\nservice: checkout\nallow:\n  - host: api.stripe.com\n"}
BINARY = {"logo.png": "iVBORw0KGgo="}

# -- the plan (pure) ---------------------------------------------------------------------------------


def ns(name: str, labelled: bool = True, terminating: bool = False) -> Namespace:
    return Namespace(name, labelled, terminating)


def cm(namespace: str, data: dict[str, str] | None = None, *, managed: bool = True, copy_of: str | None = REF,
       binary: dict[str, str] | None = None, rv: str = "7") -> ConfigMap:
    """A ConfigMap of the copies' name as the plan reads it from the API's JSON."""
    obj = configmap(NAME, namespace, DATA if data is None else data, binary_data=binary,
                    labels=OWNED if managed else None,
                    annotations={kube.COPY_OF_ANNOTATION: copy_of} if copy_of else None)
    obj["metadata"]["resourceVersion"] = rv
    return configmap_from(obj)


SRC = cm(SOURCE_NS, managed=False, copy_of=None, rv="5")


def act(verb: Verb, namespace: str, reason: Reason, rv: str | None = "7") -> Action:
    return Action(verb, namespace, reason, None if verb is Verb.CREATE else rv)


# name, source, namespaces, copies (outside the source namespace), expected actions
PLAN_CASES = [
    ("a labelled namespace without a copy gets one", SRC, [ns("shop")], [],
     [act(Verb.CREATE, "shop", Reason.MISSING)]),
    ("a copy equal to the source: nothing to do", SRC, [ns("shop")], [cm("shop")], []),
    ("the source changed: the copy is updated", SRC, [ns("shop")], [cm("shop", {"checkout.yaml": "old"})],
     [act(Verb.UPDATE, "shop", Reason.DATA_DIFFERS)]),
    ("a copy with a key added by hand is updated", SRC, [ns("shop")], [cm("shop", {**DATA, "extra.yaml": "x"})],
     [act(Verb.UPDATE, "shop", Reason.DATA_DIFFERS)]),
    ("binaryData counts as data", cm(SOURCE_NS, binary=BINARY, managed=False, copy_of=None), [ns("shop")],
     [cm("shop")], [act(Verb.UPDATE, "shop", Reason.DATA_DIFFERS)]),
    ("a copy without the copy-of annotation is updated", SRC, [ns("shop")], [cm("shop", copy_of=None)],
     [act(Verb.UPDATE, "shop", Reason.METADATA_DIFFERS)]),
    ("a namespace whose label is not enabled loses its copy", SRC, [ns("shop", labelled=False)], [cm("shop")],
     [act(Verb.DELETE, "shop", Reason.NOT_LABELLED)]),
    ("a copy in a namespace not listed (label removed, or gone) is deleted", SRC, [], [cm("shop")],
     [act(Verb.DELETE, "shop", Reason.NOT_LABELLED)]),
    ("a user's ConfigMap of that name is left alone, reported", SRC, [ns("shop")],
     [cm("shop", {"mine": "1"}, managed=False, copy_of=None)], [act(Verb.SKIP, "shop", Reason.UNMANAGED)]),
    ("a user's ConfigMap in an unlabelled namespace is left alone too", SRC, [],
     [cm("blog", managed=False, copy_of=None)], [act(Verb.SKIP, "blog", Reason.UNMANAGED)]),
    ("a copy of another source is left alone, reported", SRC, [ns("shop")], [cm("shop", copy_of="platform/x")],
     [act(Verb.SKIP, "shop", Reason.OTHER_SOURCE)]),
    ("the source namespace is never written, even labelled", SRC, [ns(SOURCE_NS)], [], []),
    ("a terminating namespace gets no new copy", SRC, [ns("shop", terminating=True)], [], []),
    ("a terminating namespace's copy is left to go with it", SRC, [ns("shop", terminating=True)],
     [cm("shop", {"old": "1"})], []),
    ("source missing: nothing created, updated or deleted", None, [ns("new"), ns("shop")],
     [cm("shop", {"old": "1"}), cm("blog")], []),
    ("source missing: a user's ConfigMap is still reported", None, [ns("shop")],
     [cm("shop", managed=False, copy_of=None)], [act(Verb.SKIP, "shop", Reason.UNMANAGED)]),
    ("every namespace at once, sorted by namespace", SRC, [ns("c"), ns("a"), ns("b")],
     [cm("b", {"old": "1"}, rv="9"), cm("z")],
     [act(Verb.CREATE, "a", Reason.MISSING), act(Verb.UPDATE, "b", Reason.DATA_DIFFERS, "9"),
      act(Verb.CREATE, "c", Reason.MISSING), act(Verb.DELETE, "z", Reason.NOT_LABELLED)]),
]


@pytest.mark.parametrize("name, source, namespaces, copies, expect", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan(name, source, namespaces, copies, expect) -> None:
    """plan() makes every labelled namespace hold an exact copy and touches nothing that is not the sync's."""
    assert list(plan(source, REF, namespaces, copies)) == expect


# name, Namespace object, expected
NAMESPACE_CASES = [
    ("labelled enabled", namespace("shop", ENABLED), ns("shop")),
    ("labelled otherwise", namespace("shop", {kube.INJECT_LABEL: kube.INJECT_DISABLED}), ns("shop", labelled=False)),
    ("not labelled", namespace("shop"), ns("shop", labelled=False)),
    ("terminating", namespace("shop", ENABLED, phase="Terminating"), ns("shop", terminating=True)),
]


@pytest.mark.parametrize("name, obj, expect", NAMESPACE_CASES, ids=[c[0] for c in NAMESPACE_CASES])
def test_namespace_from(name, obj, expect) -> None:
    """A Namespace is labelled only with exactly INJECT_LABEL=enabled, and terminating by its status phase."""
    assert namespace_from(obj) == expect


def test_copy_body_is_the_source_with_the_owner_label() -> None:
    """A copy carries the source's data and binaryData exactly, the owner label and the copy-of annotation; an
    update carries the copy's resourceVersion."""
    source = configmap_from(configmap(NAME, SOURCE_NS, DATA, binary_data=BINARY, labels={"team": "platform"}))
    body = copy_body(source, "shop")
    assert body == {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": NAME, "namespace": "shop", "labels": OWNED,
                                 "annotations": {kube.COPY_OF_ANNOTATION: REF}},
                    "data": DATA, "binaryData": BINARY}
    assert copy_body(source, "shop", "42")["metadata"]["resourceVersion"] == "42"
    assert "data" not in copy_body(configmap_from(configmap(NAME, SOURCE_NS)), "shop")


# name, status, verb, result, done
RESULT_CASES = [
    ("created", 201, Verb.CREATE, "success", True),
    ("create: AlreadyExists", 409, Verb.CREATE, "conflict", False),
    ("update: stale resourceVersion", 409, Verb.UPDATE, "conflict", False),
    ("update: the copy is gone", 404, Verb.UPDATE, "not_found", False),
    ("delete: already gone is done", 404, Verb.DELETE, "not_found", True),
    ("delete: precondition failed", 409, Verb.DELETE, "conflict", False),
    ("forbidden", 403, Verb.CREATE, "error", False),
    ("server error", 500, Verb.DELETE, "error", False),
]


@pytest.mark.parametrize("name, status, verb, result, is_done", RESULT_CASES, ids=[c[0] for c in RESULT_CASES])
def test_write_results(name, status, verb, result, is_done) -> None:
    """A write's status maps to its result, and only success (or a delete of what is gone) counts as done."""
    assert result_of(status) == result and done(verb, result) is is_done


def test_watch_events() -> None:
    """A watch line gives the version to resume from and whether it is a change; an ERROR raises, 410 as Expired."""
    assert watch_event({"type": "MODIFIED", "object": {"metadata": {"resourceVersion": "12"}}}) == ("12", True)
    assert watch_event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "13"}}}) == ("13", False)
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 1 (9)"}
    with pytest.raises(Expired, match="HTTP 410: Expired: too old resource version"):
        watch_event({"type": "ERROR", "object": gone})
    with pytest.raises(ApiError, match="HTTP 500") as caught:
        watch_event({"type": "ERROR", "object": {**gone, "code": 500, "reason": "InternalError"}})
    assert not isinstance(caught.value, Expired)


# -- the mock's write and watch rules, as the sync relies on them --------------------------------------


def _request(server: KubeApi, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


CM_PATH = f"/api/v1/namespaces/shop/configmaps/{NAME}"
CM_BODY = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": NAME}, "data": DATA}
# name, method, path, body, status, reason, message
REFUSAL_CASES = [
    ("create what exists", "POST", "/api/v1/namespaces/shop/configmaps", CM_BODY, 409, "AlreadyExists",
     f'configmaps "{NAME}" already exists'),
    ("create in a namespace that does not exist", "POST", "/api/v1/namespaces/nowhere/configmaps", CM_BODY, 404,
     "NotFound", 'namespaces "nowhere" not found'),
    ("create in a terminating namespace", "POST", "/api/v1/namespaces/old/configmaps", CM_BODY, 403, "Forbidden",
     f'configmaps "{NAME}" is forbidden: unable to create new content in namespace old because it is being '
     "terminated"),
    ("replace what is absent", "PUT", f"/api/v1/namespaces/blog/configmaps/{NAME}", CM_BODY, 404, "NotFound",
     f'configmaps "{NAME}" not found'),
    ("replace with a stale resourceVersion", "PUT", CM_PATH,
     {**CM_BODY, "metadata": {"name": NAME, "resourceVersion": "1"}}, 409, "Conflict",
     f'Operation cannot be fulfilled on configmaps "{NAME}": the object has been modified; please apply your '
     "changes to the latest version and try again"),
    ("delete what is absent", "DELETE", f"/api/v1/namespaces/blog/configmaps/{NAME}", None, 404, "NotFound",
     f'configmaps "{NAME}" not found'),
    ("delete with a failed precondition", "DELETE", CM_PATH, {"preconditions": {"resourceVersion": "1"}}, 409,
     "Conflict", f'Operation cannot be fulfilled on configmaps "{NAME}": Precondition failed: ResourceVersion in '
     "precondition: 1, ResourceVersion in object meta: "),
    ("a label selector it cannot parse", "GET", "/api/v1/configmaps?labelSelector=a%20b", None, 400, "BadRequest",
     "unable to parse requirement: 'a b'"),
    ("a field selector on another field", "GET", "/api/v1/configmaps?fieldSelector=data.x%3D1", None, 400,
     "BadRequest", '"data.x" is not a known field selector: only "metadata.name", "metadata.namespace"'),
]


@pytest.mark.parametrize("name, method, path, body, status, reason, message", REFUSAL_CASES,
                         ids=[c[0] for c in REFUSAL_CASES])
def test_the_mock_refuses_as_the_api_server_does(api, name, method, path, body, status, reason, message):
    """The mock answers a request it must refuse with the status and the Status body the real API server sends."""
    server = api([namespace("shop"), namespace("blog"), namespace("old", phase="Terminating"),
                  configmap(NAME, "shop", DATA)])
    got_status, got = _request(server, method, path, body)
    assert (got_status, got["kind"], got["status"], got["code"], got["reason"]) == (
        status, "Status", "Failure", status, reason)
    assert got["message"].startswith(message)
    assert server.read("configmaps", NAME, "shop")["data"] == DATA


# name, labelSelector or fieldSelector, the namespaces listed
SELECTOR_CASES = [
    ("k=v", f"labelSelector={kube.INJECT_LABEL}=enabled", {"shop", "cart"}),
    ("k==v", f"labelSelector={kube.INJECT_LABEL}==enabled", {"shop", "cart"}),
    ("k!=v also holds without the label", f"labelSelector={kube.INJECT_LABEL}!=enabled", {"blog", "plain"}),
    ("k: the label is there", f"labelSelector={kube.INJECT_LABEL}", {"shop", "cart", "blog"}),
    ("!k: the label is not there", f"labelSelector=!{kube.INJECT_LABEL}", {"plain"}),
    ("a comma list: every requirement holds", f"labelSelector={kube.INJECT_LABEL}=enabled,team=cart", {"cart"}),
    ("metadata.name=", "fieldSelector=metadata.name=blog", {"blog"}),
    ("metadata.name!=", "fieldSelector=metadata.name!=blog", {"shop", "cart", "plain"}),
]


@pytest.mark.parametrize("name, query, expect", SELECTOR_CASES, ids=[c[0] for c in SELECTOR_CASES])
def test_the_mock_lists_by_selector(api, name, query, expect):
    """A list selects by equality-based label selectors and by metadata field selectors, as the API server does."""
    server = api([namespace("shop", ENABLED), namespace("cart", {**ENABLED, "team": "cart"}),
                  namespace("blog", {kube.INJECT_LABEL: kube.INJECT_DISABLED}), namespace("plain")])
    key, _, value = query.partition("=")
    status, got = _request(server, "GET", f"/api/v1/namespaces?{key}={urllib.parse.quote(value)}")
    assert status == 200 and got["kind"] == "NamespaceList"
    assert {item["metadata"]["name"] for item in got["items"]} == expect


def test_the_mock_writes_and_watches_by_selector(api):
    """Writes stamp the next resourceVersion; a label-selected watch gets ADDED when an object starts matching and
    DELETED (its previous content) when it stops, as the real watch cache sends them."""
    server = api([namespace("shop")])
    status, created = _request(server, "POST", "/api/v1/namespaces/shop/configmaps",
                               {**CM_BODY, "metadata": {"name": NAME, "labels": OWNED}})
    assert status == 201 and created["metadata"]["resourceVersion"] == server.version
    assert created["metadata"]["namespace"] == "shop" and created["metadata"]["uid"]
    since = server.version
    unowned = {**created, "metadata": {**created["metadata"], "labels": {}}}
    assert _request(server, "PUT", CM_PATH, unowned)[0] == 200
    assert _request(server, "PUT", CM_PATH, {**unowned, "metadata": {**unowned["metadata"], "labels": OWNED,
                                                                         "resourceVersion": None}})[0] == 200
    status, gone = _request(server, "DELETE", CM_PATH)
    assert status == 200 and (gone["status"], gone["details"]["name"]) == ("Success", NAME)
    selector = urllib.parse.quote(f"{kube.MANAGED_BY_LABEL}={kube.SYNC_MANAGER}")
    url = f"{server.url}/api/v1/configmaps?watch=1&resourceVersion={since}&timeoutSeconds=1&labelSelector={selector}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert [e["type"] for e in events] == ["DELETED", "ADDED", "DELETED"]
    assert events[0]["object"]["metadata"]["labels"] == OWNED  # the content before it stopped matching
    assert [e["object"]["metadata"]["resourceVersion"] for e in events] == [
        str(int(since) + n) for n in (1, 2, 3)]


# -- the loop against the API server ------------------------------------------------------------------

FAST = Timing(request_timeout=2.0, watch_seconds=60, idle_timeout=30.0, backoff_min=0.02, backoff_max=0.2,
              page_size=2)
DEADLINE = 10.0



def source(data: dict[str, str] | None = None, binary: dict[str, str] | None = None) -> dict[str, Any]:
    return configmap(NAME, SOURCE_NS, DATA if data is None else data, binary_data=binary,
                     labels={"app.kubernetes.io/part-of": "egressd"})


def labelled(name: str, **kw: Any) -> dict[str, Any]:
    return namespace(name, ENABLED, **kw)


def copies(server: KubeApi) -> dict[str, dict[str, str]]:
    """The data of every right copy (owner label, copy-of annotation), by namespace."""
    found = {}
    for obj in server.items("configmaps", fields=f"metadata.name={NAME}"):
        meta = obj["metadata"]
        if meta["namespace"] != SOURCE_NS and meta.get("labels") == OWNED and meta.get("annotations") == {
                kube.COPY_OF_ANNOTATION: REF}:
            found[meta["namespace"]] = {**obj.get("data", {}), **{f"binary:{k}": v for k, v in
                                                                  obj.get("binaryData", {}).items()}}
    return found


def nonzero(counts: dict[Any, int]) -> dict[Any, int]:
    return {k: v for k, v in counts.items() if v}


class Running:
    """Syncs whose run() is under way."""

    def __init__(self, syncs: list[AllowlistSync], tasks: list[asyncio.Task]) -> None:
        self.syncs, self.tasks = syncs, tasks
        self.sync = syncs[0]

    async def until(self, predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        """Poll predicate until it is truthy (its value); fail after timeout, or at once if a run() has ended."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            ended = [t for t in self.tasks if t.done()]
            if ended:
                raise AssertionError(f"run() ended while waiting for {what}: {ended[0]!r}")
            if time.monotonic() > deadline:
                why = [s.not_ready() for s in self.syncs]
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; not_ready: {why}")
            await asyncio.sleep(0.01)

    async def converged(self, server: KubeApi, want: dict[str, dict[str, str]], what: str) -> None:
        await self.until(lambda: copies(server) == want and all(s.not_ready() is None for s in self.syncs), what)

    async def caught_up(self, server: KubeApi) -> None:
        """Wait until every sync has completed a reconcile of the state as it is now (listed at or after the
        server's current resourceVersion)."""
        now = int(server.version)
        await self.until(lambda: all(int(s.listed_version or 0) >= now for s in self.syncs), "a reconcile of now")


def scenario(server: KubeApi, tmp_path: Path, body: Callable[[Running], Awaitable[None]], replicas: int = 1,
             **kw: Any) -> None:
    """Run body with ``replicas`` syncs running against server; then cancel them and check they stop at once."""
    kw.setdefault("timing", FAST)
    config = server.kubeconfig(tmp_path / "kubeconfig")

    async def main() -> None:
        syncs = [AllowlistSync(config, **kw) for _ in range(replicas)]
        tasks = [asyncio.create_task(s.run()) for s in syncs]
        try:
            await body(Running(syncs, tasks))
        finally:
            for task in tasks:
                task.cancel()
            done_, _ = await asyncio.wait(tasks, timeout=DEADLINE)
            assert len(done_) == len(tasks), "run() did not stop within the deadline of being cancelled"
            assert all(t.cancelled() for t in tasks), tasks

    asyncio.run(main())


def test_initial_sync_copies_into_labelled_namespaces_only(api, tmp_path):
    """The first reconcile copies the source (data and binaryData) into every labelled namespace, and into no
    other: not unlabelled ones, not those labelled otherwise, not a terminating one, not the source's own."""
    server = api([
        source(binary=BINARY), namespace(SOURCE_NS, ENABLED), labelled("shop"), labelled("blog"), labelled("cart"),
        namespace("legacy", {kube.INJECT_LABEL: kube.INJECT_DISABLED}), namespace("plain"),
        labelled("leaving", phase="Terminating"),
    ])
    want = {**DATA, **{f"binary:{k}": v for k, v in BINARY.items()}}
    before = server.read("configmaps", NAME, SOURCE_NS)

    async def body(run: Running) -> None:
        await run.converged(server, {"blog": want, "cart": want, "shop": want}, "the first copies")
        assert server.read("configmaps", NAME, SOURCE_NS) == before
        assert {o["metadata"]["namespace"] for o in server.items("configmaps")} == {SOURCE_NS, "blog", "cart", "shop"}
        assert run.sync.metrics.copies == 3
        assert nonzero(run.sync.metrics.actions) == {("create", "success"): 3}
        assert [r.query.get("limit") for r in server.lists()][:2] == ["2", "2"]  # paged lists

    scenario(server, tmp_path, body)


def test_a_source_change_reaches_every_copy(api, tmp_path):
    """An edit of the source reaches every copy through the watch, with no restart and no periodic resync."""
    server = api([source(), labelled("shop"), labelled("blog")])
    new = {"checkout.yaml": DATA["checkout.yaml"] + "  - host: api.adyen.com\n"}

    async def body(run: Running) -> None:
        await run.converged(server, {"blog": DATA, "shop": DATA}, "the first copies")
        server.modify(source(new))
        await run.converged(server, {"blog": new, "shop": new}, "the new data in every copy")
        await run.caught_up(server)
        assert nonzero(run.sync.metrics.actions) == {("create", "success"): 2, ("update", "success"): 2}

    scenario(server, tmp_path, body, resync_interval=3600)


@pytest.mark.parametrize("change", ["label removed", "label disabled", "label with another value"])
def test_a_namespace_that_loses_its_label_loses_its_copy(api, tmp_path, change):
    """A namespace no longer labelled inject=enabled loses its copy; the others keep theirs."""
    server = api([source(), labelled("shop"), labelled("blog")])
    value = {"label removed": None, "label disabled": kube.INJECT_DISABLED, "label with another value": "true"}[change]

    async def body(run: Running) -> None:
        await run.converged(server, {"blog": DATA, "shop": DATA}, "the first copies")
        server.modify(namespace("shop", {kube.INJECT_LABEL: value} if value else None))
        await run.converged(server, {"blog": DATA}, "the copy deleted")
        assert server.read("configmaps", NAME, "shop") is None
        await run.until(lambda: run.sync.metrics.copies == 1, "the gauge of copies at 1")

    scenario(server, tmp_path, body, resync_interval=3600)


@pytest.mark.parametrize("how", ["a new namespace", "an existing namespace labelled"])
def test_a_namespace_labelled_gets_a_copy(api, tmp_path, how):
    """A namespace that is created labelled, or gets the label, gets a copy at once."""
    server = api([source(), labelled("shop"), namespace("blog")])

    async def body(run: Running) -> None:
        await run.converged(server, {"shop": DATA}, "the first copy")
        server.add(labelled("cart")) if how == "a new namespace" else server.modify(labelled("blog"))
        other = "cart" if how == "a new namespace" else "blog"
        await run.converged(server, {"shop": DATA, other: DATA}, "the copy in the labelled namespace")

    scenario(server, tmp_path, body, resync_interval=3600)


@pytest.mark.parametrize("edit", ["data edited", "key added", "deleted", "annotation removed"])
def test_a_copy_changed_by_hand_is_restored(api, tmp_path, edit):
    """A copy edited, deleted or stripped of its annotation by hand is restored by the reconcile its event wakes."""
    server = api([source(), labelled("shop"), labelled("blog")])

    async def body(run: Running) -> None:
        await run.converged(server, {"blog": DATA, "shop": DATA}, "the first copies")
        copy = server.read("configmaps", NAME, "shop")
        assert copy is not None
        if edit == "deleted":
            server.delete(copy)
        elif edit == "annotation removed":
            server.modify({**copy, "metadata": {**copy["metadata"], "annotations": {}}})
        else:
            data = {"checkout.yaml": "allow: everything"} if edit == "data edited" else {**DATA, "x.yaml": "x"}
            server.modify({**copy, "data": data})
        assert copies(server) != {"blog": DATA, "shop": DATA}  # the edit, until the sync restores the copy
        await run.converged(server, {"blog": DATA, "shop": DATA}, "the copy restored")
        assert [r.method for r in server.writes()][2:] == ["POST" if edit == "deleted" else "PUT"]

    scenario(server, tmp_path, body, resync_interval=3600)


@pytest.mark.parametrize("how", ["there from the start", "the owner label removed by hand"])
def test_an_unmanaged_configmap_of_that_name_is_left_alone_and_reported(api, tmp_path, how):
    """A ConfigMap of the copies' name without the owner label is never written or deleted, and is counted."""
    mine = configmap(NAME, "shop", {"mine.yaml": "1"}, labels={"team": "shop"})
    server = api([source(), labelled("shop"), labelled("blog"), *([mine] if how == "there from the start" else [])])

    async def body(run: Running) -> None:
        if how != "there from the start":
            await run.converged(server, {"blog": DATA, "shop": DATA}, "the first copies")
            copy = server.read("configmaps", NAME, "shop")
            server.modify({**copy, "metadata": {**copy["metadata"], "labels": {"team": "shop"}}})
        await run.until(lambda: run.sync.metrics.errors["unmanaged"] >= 1, "the unmanaged ConfigMap reported")
        stored = server.read("configmaps", NAME, "shop")
        server.modify(labelled("shop"))  # wakes the sync: one more reconcile
        await run.caught_up(server)
        await run.converged(server, {"blog": DATA}, "the copy in the other namespace")
        assert server.read("configmaps", NAME, "shop") == stored
        shop_writes = [r for r in server.writes() if r.path.startswith("/api/v1/namespaces/shop/")]
        assert len(shop_writes) == (0 if how == "there from the start" else 1)  # the first copy, then none

    scenario(server, tmp_path, body, resync_interval=3600)


def test_the_source_missing_deletes_nothing_and_is_not_ready(api, tmp_path):
    """While the source is missing nothing is created or deleted and /readyz answers 503 saying why; when it is
    back the copies converge and /readyz answers 200."""
    server = api([source(), labelled("shop"), labelled("blog")])

    async def body(run: Running) -> None:
        admin = admin_for(run.sync)
        listener = await admin.start("127.0.0.1", 0)
        address = listener.sockets[0].getsockname()[:2]
        try:
            await run.converged(server, {"blog": DATA, "shop": DATA}, "the first copies")
            assert await asyncio.to_thread(http_get, address, "/readyz") == (200, "ready\n")
            writes = len(server.writes())
            server.delete(server.read("configmaps", NAME, SOURCE_NS))
            await run.until(lambda: run.sync.not_ready(), "not ready")
            server.modify(namespace("blog"))  # unlabelled: its copy would go
            server.add(labelled("cart"))  # labelled: it would get one
            await run.caught_up(server)
            status, text = await asyncio.to_thread(http_get, address, "/readyz")
            assert status == 503 and f"the source ConfigMap {REF} does not exist" in text
            assert copies(server) == {"blog": DATA, "shop": DATA}
            assert run.sync.metrics.errors["source_missing"] >= 1
            assert server.writes()[writes:] == [], "a write while the source was missing"
            new = {"checkout.yaml": "version: 1\nservice: checkout\n"}
            server.add(source(new))
            await run.converged(server, {"cart": new, "shop": new}, "the copies after the source came back")
            assert await asyncio.to_thread(http_get, address, "/readyz") == (200, "ready\n")
        finally:
            listener.close()
            admin.close()

    scenario(server, tmp_path, body, resync_interval=3600)


def test_no_source_from_the_start_creates_nothing(api, tmp_path):
    """Without a source at all the first reconcile completes, creates nothing and leaves the sync not ready."""
    server = api([labelled("shop")])

    async def body(run: Running) -> None:
        why = await run.until(lambda: "does not exist" in (run.sync.not_ready() or "") and run.sync.not_ready(),
                              "not ready for the missing source")
        assert why.startswith(f"the source ConfigMap {REF} does not exist")
        assert server.writes() == [] and copies(server) == {}

    scenario(server, tmp_path, body)


@pytest.mark.parametrize("outage", ["refused", "failing"])
def test_api_down_then_up_converges(api, tmp_path, outage):
    """While the API server is down or failing nothing stops the sync; once it is back the copies converge to
    what changed meanwhile."""
    server = api([source(), labelled("shop"), labelled("blog")])
    new = {"checkout.yaml": "version: 1\nservice: checkout\n"}

    async def body(run: Running) -> None:
        await run.converged(server, {"blog": DATA, "shop": DATA}, "the first copies")
        if outage == "refused":
            server.down()
        else:
            server.fail(500)
            server.cut()
        errors = run.sync.metrics.errors["watch"]
        await run.until(lambda: run.sync.metrics.errors["watch"] > errors + 3, "the watches retried")
        server.modify(source(new))
        server.add(labelled("cart"))
        server.modify(namespace("blog"))
        server.up() if outage == "refused" else server.fail(None)
        await run.converged(server, {"cart": new, "shop": new}, "the copies after the outage")

    scenario(server, tmp_path, body, resync_interval=3600)


@pytest.mark.parametrize("form", ["status", "event", "stream"])
def test_a_410_on_a_watch_relists(api, tmp_path, form):
    """A 410 Gone on the watches (the HTTP status, an ERROR event at the start, or one in an open stream) starts
    them again from the current state, and the reconcile lists and converges to what changed meanwhile."""
    server = api([source(), labelled("shop")])

    async def body(run: Running) -> None:
        await run.converged(server, {"shop": DATA}, "the first copy")
        await run.until(lambda: server.open_watches == 3, "the three watches")
        lists, watches = len(server.lists()), len(server.watches())
        server.pause()
        if form != "stream":
            server.cut()  # the watches resume from their versions, and wait (paused)
            await run.until(lambda: len(server.watches()) >= watches + 3, "the watches resumed")
        server.add(labelled("cart"))
        server.expire("status" if form == "stream" else form)
        if form == "stream":
            server.error_event(410)
        server.resume()
        await run.converged(server, {"cart": DATA, "shop": DATA}, "the copy after the relist")
        assert len(server.lists()) > lists
        fresh = [w for w in server.watches()[watches:] if not w.query.get("resourceVersion")]
        assert len(fresh) >= 3  # every watch started again from the current state

    scenario(server, tmp_path, body, resync_interval=3600)


@pytest.mark.parametrize("line", [[], 7, "text", False], ids=["list", "number", "string", "false"])
def test_a_watch_line_that_is_no_event_is_retried(api, tmp_path, line):
    """A watch line that is JSON but not an event object is counted as a watch failure and the watches start
    again; the sync keeps converging."""
    server = api([source(), labelled("shop")])

    async def body(run: Running) -> None:
        await run.converged(server, {"shop": DATA}, "the first copy")
        await run.until(lambda: server.open_watches == 3, "the three watches")
        server.stray(line)
        server.add(labelled("cart"))
        await run.converged(server, {"cart": DATA, "shop": DATA}, "the copy after the stray line")
        assert run.sync.metrics.errors["watch"] >= 1

    scenario(server, tmp_path, body, resync_interval=3600)


def test_two_sync_loops_at_once_converge(api, tmp_path):
    """Two replicas at once converge on the same copies, their conflicts re-planned, with no failed write and no
    write once converged."""
    server = api([source(), *(labelled(f"team-{i}") for i in range(6)), namespace("plain")])
    new = {"checkout.yaml": "version: 1\nservice: checkout\n"}

    async def body(run: Running) -> None:
        await run.converged(server, {f"team-{i}": DATA for i in range(6)}, "the first copies")
        server.modify(source(new))
        server.modify(labelled("plain"))
        server.modify(namespace("team-0"))
        want = {**{f"team-{i}": new for i in range(1, 6)}, "plain": new}
        await run.converged(server, want, "the copies after the changes")
        await run.caught_up(server)
        writes = len(server.writes())
        server.modify(labelled("plain"))  # wakes both: nothing to do
        await run.caught_up(server)
        assert server.writes()[writes:] == []
        for sync in run.syncs:
            assert sync.metrics.errors["write"] == 0 and sync.metrics.errors["list"] == 0
            assert not [k for k in nonzero(sync.metrics.actions) if k[1] == "error"]
        assert copies(server) == want

    scenario(server, tmp_path, body, replicas=2, resync_interval=3600)


def test_in_cluster_over_https_with_a_token(api, tmp_path):
    """In a pod the sync reaches the API server over HTTPS (verified against its CA) with the service account's
    bearer token."""
    server = api([source(), labelled("shop")], ca=trustme.CA(), token="eyJhbGciOiJSUzI1NiJ9.sync-token")
    environ = server.service_account(tmp_path / "sa")

    async def body(run: Running) -> None:
        await run.converged(server, {"shop": DATA}, "the copy")
        assert {r.authorization for r in server.requests} == {"Bearer eyJhbGciOiJSUzI1NiJ9.sync-token"}

    async def main() -> None:
        sync = AllowlistSync(service_account=str(tmp_path / "sa"), environ=environ, timing=FAST)
        task = asyncio.create_task(sync.run())
        try:
            await body(Running([sync], [task]))
        finally:
            task.cancel()
            await asyncio.wait([task], timeout=DEADLINE)

    asyncio.run(main())


def test_a_refused_token_is_reported_with_its_fix(api, tmp_path):
    """A 403 keeps the sync not ready, and not_ready names the permissions the service account needs."""
    server = api([source(), labelled("shop")])
    server.fail(403)

    async def body(run: Running) -> None:
        why = await run.until(lambda: "HTTP 403" in (run.sync.not_ready() or "") and run.sync.not_ready(),
                              "the refusal")
        assert "create, update and delete on configmaps in every namespace" in why

    scenario(server, tmp_path, body)


# -- the command ---------------------------------------------------------------------------------------

# name, argv, environment, message
FLAG_CASES = [
    ("resync interval zero", ["--resync-interval", "0"], {}, "--resync-interval must be a positive number"),
    ("a namespace with capitals", ["--namespace", "Egressd"], {}, "--namespace 'Egressd': a namespace name"),
    ("a ConfigMap name from the environment", [], {"EGRESSD_CONFIGMAP": "Allow_lists"},
     "--configmap 'Allow_lists': a ConfigMap name"),
    ("a kubeconfig that is not there", ["--kubeconfig", "/nonexistent/kubeconfig"], {},
     "the kubeconfig /nonexistent/kubeconfig is not a file"),
    ("not in a pod", [], {}, "not in a pod with a service account"),
    ("an admin address that is a name", ["--kubeconfig", __file__, "--admin-listen", "admin:15021"], {},
     "--admin-listen 'admin:15021': give an IP address"),
]


@pytest.mark.parametrize("name, argv, env, message", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flags_exit_2_with_the_fix(name, argv, env, message, monkeypatch, capsys):
    """A flag (or its EGRESSD_ variable) that cannot work stops the command at once with exit 2 and the fix."""
    for var in ("KUBERNETES_SERVICE_HOST", "EGRESSD_KUBECONFIG", "EGRESSD_NAMESPACE", "EGRESSD_CONFIGMAP"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert cli_main(["allowlist-sync", *argv]) == 2
    assert message in capsys.readouterr().err


class SyncProcess:
    """``egressd allowlist-sync`` as a process; its stderr JSON lines read by a thread, waited for with a deadline."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "egressd", "allowlist-sync", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.text: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for text in self.proc.stderr:
            self.text.append(text)
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(text))
        self.lines.put(None)

    def next(self, event: str) -> dict[str, Any]:
        """The next log line with this event name."""
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {event!r} line within {DEADLINE} s:\n{''.join(self.text)}") from None
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait(DEADLINE)}) before {event!r}:\n{''.join(self.text)}")
            if line.get("event") == event:
                return line

    def stop(self) -> int:
        return stop_process(self.proc, DEADLINE)


def test_the_command_converges_and_answers_readyz(api, tmp_path):
    """``egressd allowlist-sync`` as a process (its source named by EGRESSD_ variables) converges, logs one line
    per copy created, answers /readyz and /metrics, and exits 0 on SIGTERM."""
    server = api([configmap("allowlists", "platform", DATA), namespace("platform"), labelled("shop"),
                  labelled("blog")])
    env = {**os.environ, "EGRESSD_NAMESPACE": "platform", "EGRESSD_CONFIGMAP": "allowlists",
           "EGRESSD_RESYNC_INTERVAL": "30"}
    sync = SyncProcess(["--kubeconfig", server.kubeconfig(tmp_path / "kc"), "--admin-listen", "127.0.0.1:0"], env)
    try:
        started = sync.next("allowlist_sync.started")
        address = tuple(started["admin"][0])
        assert started["source"] == "platform/allowlists" and started["resync_interval"] == 30
        created = [sync.next("allowlist_sync.created") for _ in range(2)]
        assert sorted(c["namespace"] for c in created) == ["blog", "shop"]
        version = server.read("configmaps", "allowlists", "platform")["metadata"]["resourceVersion"]
        assert {(c["source_resource_version"], c["reason"]) for c in created} == {(version, "missing")}
        deadline = time.monotonic() + DEADLINE
        while http_get(address, "/readyz")[0] != 200:
            assert time.monotonic() < deadline and sync.proc.poll() is None, "the command never became ready"
            time.sleep(0.02)
        metrics = http_get(address, "/metrics")[1]
        assert "egressd_allowlist_copies 2.0" in metrics
        assert 'egressd_allowlist_sync_actions_total{action="create",result="success"} 2.0' in metrics
        assert 'egressd_allowlist_sync_errors_total{reason="source_missing"} 0.0' in metrics
        assert http_get(address, "/healthz") == (200, "ok\n")
        assert {o["metadata"]["namespace"] for o in server.items("configmaps", fields="metadata.name=allowlists")
                if o["metadata"].get("annotations") == {kube.COPY_OF_ANNOTATION: "platform/allowlists"}} == {
            "blog", "shop"}
        assert sync.stop() == 0
        sync.next("allowlist_sync.stopped")
    finally:
        sync.stop()
