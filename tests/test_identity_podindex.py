"""The pod-ip identity source: the table's rules as tables, then list+watch against a Kubernetes API on loopback.

The second half runs :class:`egressd.identity.podindex.PodIndex` (kubernetes_asyncio
underneath) against :class:`k8s_api.KubeApi` in a lab thread, and steers the
server: events, bookmarks, expired history, cut connections, errors, outages.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from egressd.identity import Identity
from egressd.identity.podindex import ClientConfigError, PodIndex, Timing
from egressd.identity.podtable import Expired, PodTable, WatchError
from harness import Clock
from k8s_api import KubeApi, flag, pod, with_ip, with_phase

# -- the table (pure) --------------------------------------------------------------------------------


def _without_pod_ips(obj: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(obj)
    del new["status"]["podIPs"]
    return new


def _without_uid(obj: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(obj)
    del new["metadata"]["uid"]
    return new


# name, pod, {address asked: (namespace, service account, pod) or None}
ENTRY_CASES = [
    ("a running pod: its IP", pod("web-1", "10.244.1.10", namespace="shop", serviceaccount="web"),
     {"10.244.1.10": ("shop", "web", "web-1"), "10.244.1.11": None}),
    ("dual stack: every address of podIPs", pod("db-0", ("10.244.2.3", "fd00:10:244::3"), namespace="data"),
     {"10.244.2.3": ("data", "default", "db-0"), "fd00:10:244::3": ("data", "default", "db-0")}),
    ("podIP when podIPs is absent", _without_pod_ips(pod("old-1", "10.244.1.12")),
     {"10.244.1.12": ("default", "default", "old-1")}),
    ("IPv6 written longhand or in capitals", pod("v6-1", "FD00:10:244:0:0:0:0:7"),
     {"fd00:10:244::7": ("default", "default", "v6-1")}),
    ("no serviceAccountName: the default account", pod("bare-1", "10.244.1.13", serviceaccount=None),
     {"10.244.1.13": ("default", "default", "bare-1")}),
    ("pending with an IP already", pod("start-1", "10.244.1.14", phase="Pending"),
     {"10.244.1.14": ("default", "default", "start-1")}),
    ("pending without an IP: nothing", pod("new-1", None, phase="Pending"), {}),
    ("hostNetwork: never, its IP is the node's", pod("exporter-1", host_network=True), {"192.168.49.2": None}),
    ("Succeeded: its IP is free again", pod("job-1", "10.244.1.15", phase="Succeeded"), {"10.244.1.15": None}),
    ("Failed: its IP is free again", pod("job-2", "10.244.1.16", phase="Failed"), {"10.244.1.16": None}),
    ("an address that is not an IP: ignored", pod("odd-1", "10.244.1.300"), {"10.244.1.300": None}),
    ("no uid: nothing (a pod is known by its uid)", _without_uid(pod("anon-1", "10.244.1.17")),
     {"10.244.1.17": None}),
]


@pytest.mark.parametrize("name, obj, expect", ENTRY_CASES, ids=[c[0] for c in ENTRY_CASES])
def test_entry_rules(name: str, obj: dict[str, Any], expect: dict[str, tuple[str, str, str] | None]) -> None:
    """A listed pod is identified by each of its own addresses exactly when it is live and not on the host network."""
    table = PodTable()
    table.replace([obj], "7")
    for ip, want in expect.items():
        got = table.lookup(ip)
        if want is None:
            assert got is None, ip
        else:
            namespace, serviceaccount, name = want
            assert got == Identity("pod-ip", namespace, serviceaccount, name, obj["metadata"]["uid"]), ip
    assert len(table) == (1 if any(expect.values()) else 0)
    assert table.resource_version == "7"


def _ev(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": {"kind": "Pod", "apiVersion": "v1", **obj}}


IP = "10.244.1.10"
A = pod("api-1", IP, namespace="shop", uid="uid-a")
B = pod("api-1", IP, namespace="blog", uid="uid-b")  # the same address, another namespace
A2 = pod("api-1", IP, namespace="shop", uid="uid-a2")  # re-created under the same name
C = pod("cache-1", "10.244.1.30", uid="uid-c")

# name, events, {address: uid of the pod it names, or None}
EVENT_CASES = [
    ("ADDED indexes", [_ev("ADDED", A)], {IP: "uid-a"}),
    ("MODIFIED with a new IP frees the old one", [_ev("ADDED", A), _ev("MODIFIED", with_ip(A, "10.244.1.11"))],
     {IP: None, "10.244.1.11": "uid-a"}),
    ("MODIFIED that loses the IP drops it", [_ev("ADDED", A), _ev("MODIFIED", with_ip(A, None))], {IP: None}),
    ("DELETED drops", [_ev("ADDED", A), _ev("DELETED", A)], {IP: None}),
    ("MODIFIED to Succeeded drops", [_ev("ADDED", A), _ev("MODIFIED", with_phase(A, "Succeeded"))], {IP: None}),
    ("an IP reused after a delete names the new pod", [_ev("ADDED", A), _ev("DELETED", A), _ev("ADDED", B)],
     {IP: "uid-b"}),
    ("an IP two live pods hold names neither", [_ev("ADDED", A), _ev("ADDED", B)], {IP: None}),
    ("the sharing ends when one is deleted", [_ev("ADDED", A), _ev("ADDED", B), _ev("DELETED", A)], {IP: "uid-b"}),
    ("the sharing ends when one has Failed",
     [_ev("ADDED", A), _ev("ADDED", B), _ev("MODIFIED", with_phase(B, "Failed"))], {IP: "uid-a"}),
    ("the sharing ends when one moves",
     [_ev("ADDED", A), _ev("ADDED", B), _ev("MODIFIED", with_ip(B, "10.244.1.12"))],
     {IP: "uid-a", "10.244.1.12": "uid-b"}),
    ("re-created under the same name: the new uid", [_ev("ADDED", A), _ev("DELETED", A), _ev("ADDED", A2)],
     {IP: "uid-a2"}),
    ("MODIFIED for a pod not seen yet adds it", [_ev("MODIFIED", A)], {IP: "uid-a"}),
    ("DELETED for a pod never indexed changes nothing", [_ev("ADDED", A), _ev("DELETED", C)], {IP: "uid-a"}),
    ("a hostNetwork pod on a pod's IP takes nothing from it",
     [_ev("ADDED", A), _ev("ADDED", pod("exporter-1", host_network=True, node_ip=IP, uid="uid-h"))], {IP: "uid-a"}),
    ("BOOKMARK changes no pod",
     [_ev("ADDED", A), {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {}}}],
     {IP: "uid-a"}),
]


@pytest.mark.parametrize("name, events, expect", EVENT_CASES, ids=[c[0] for c in EVENT_CASES])
def test_event_rules(name: str, events: list[dict[str, Any]], expect: dict[str, str | None]) -> None:
    """Watch events move the table to the pods that are live now, and every event moves the resourceVersion."""
    table = PodTable()
    table.replace([], "100")
    for version, event in enumerate(events, start=101):
        event = copy.deepcopy(event)
        event["object"]["metadata"]["resourceVersion"] = str(version)
        table.apply(event)
        assert table.resource_version == str(version)
    for ip, uid in expect.items():
        got = table.lookup(ip)
        assert (got.pod_uid if got else None) == uid, ip


def test_a_list_replaces_everything() -> None:
    """A list result forgets every pod it does not hold and takes the list's resourceVersion."""
    table = PodTable()
    table.replace([A, C], "5")
    table.replace([B], "9")
    assert table.lookup(IP).pod_uid == "uid-b"  # type: ignore[union-attr]
    assert table.lookup("10.244.1.30") is None
    assert (len(table), table.resource_version) == (1, "9")


@pytest.mark.parametrize("code, error", [(410, Expired), (500, WatchError)])
def test_error_events_end_the_watch(code: int, error: type[Exception]) -> None:
    """An ERROR event raises (Expired for 410: list again) and leaves the pods as they were."""
    table = PodTable()
    table.replace([A], "5")
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": "too old resource version: 5 (9)", "reason": "Expired", "code": code}
    with pytest.raises(error) as raised:
        table.apply({"type": "ERROR", "object": status})
    assert type(raised.value) is error and raised.value.code == code  # type: ignore[attr-defined]
    assert table.lookup(IP).pod_uid == "uid-a"  # type: ignore[union-attr]
    assert table.resource_version == "5"


@pytest.mark.parametrize("event", [{"type": "SYNC", "object": {}}, {"type": "ADDED"}])
def test_malformed_events_are_errors(event: dict[str, Any]) -> None:
    """An event of an unknown type, or without an object, is an error, not something to skip."""
    with pytest.raises(ValueError):
        PodTable().apply(event)


@pytest.mark.parametrize("asked, found", [
    ("::ffff:10.244.1.10", True), ("10.244.1.10", True), ("10.244.1.010", False), ("api.shop", False), ("", False),
])
def test_lookup_takes_the_address_as_a_socket_gives_it(asked: str, found: bool) -> None:
    """An IPv4-mapped IPv6 peer is its IPv4 address; anything that is not an IP literal names no one."""
    table = PodTable()
    table.replace([A], "5")
    assert (table.lookup(asked) is not None) is found


# -- list+watch against the API server on loopback ---------------------------------------------------

FAST = Timing(request_timeout=2.0, watch_seconds=60, idle_timeout=30.0, backoff_min=0.02, backoff_max=0.1,
              page_size=2)
DEADLINE = 5.0





async def until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE,
                task: asyncio.Task | None = None, index: PodIndex | None = None) -> Any:
    """Poll predicate until it is truthy (its value); fail after timeout, or at once if ``task`` has ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if task is not None and task.done():
            raise AssertionError(f"run() ended while waiting for {what}: {task!r}")
        if time.monotonic() > deadline:
            state = f"; not_ready: {index.not_ready()}" if index is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{state}")
        await asyncio.sleep(0.01)


class Running:
    """A PodIndex whose run() is under way."""

    def __init__(self, index: PodIndex, task: asyncio.Task) -> None:
        self.index, self.task = index, task

    async def until(self, predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        return await until(predicate, what, timeout, self.task, self.index)

    def uid(self, ip: str) -> str | None:
        found = self.index.lookup(ip)
        return found.pod_uid if found else None


def scenario(index: Callable[[], PodIndex], body: Callable[[Running], Awaitable[None]]) -> None:
    """Run body with the index's run() going; then cancel run() and check that it stops at once."""

    async def main() -> None:
        made = index()
        task = asyncio.create_task(made.run())
        try:
            await body(Running(made, task))
        finally:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=DEADLINE)
            assert done, "run() did not stop within 5 s of being cancelled"
            assert task.cancelled(), task

    asyncio.run(main())


def kubeconfig_index(server: KubeApi, tmp_path: Path, **kw: Any) -> Callable[[], PodIndex]:
    kw.setdefault("timing", FAST)
    return lambda: PodIndex(server.kubeconfig(tmp_path / "kubeconfig"), **kw)


def uid(obj: dict[str, Any]) -> str:
    return obj["metadata"]["uid"]


def test_first_list_indexes_every_page(api, tmp_path):
    """After the first list (every page), each live pod is identified by its addresses, with its fields."""
    pods = [
        pod("web-5d8f-x1", "10.244.1.10", namespace="shop", serviceaccount="web"),
        pod("db-0", ("10.244.2.3", "fd00:10:244::3"), namespace="data", serviceaccount="db"),
        pod("node-exporter-q7", host_network=True, namespace="monitoring"),
        pod("migrate-29k", "10.244.1.20", phase="Succeeded"),
        pod("batch-0", None, phase="Pending"),
    ]
    server = api(pods)

    async def body(run: Running) -> None:
        index = run.index
        assert index.lookup("10.244.1.10") is None and not index.synced
        await run.until(lambda: index.synced, "the first list")
        assert index.not_ready() is None
        assert index.lookup("10.244.1.10") == Identity("pod-ip", "shop", "web", "web-5d8f-x1", uid(pods[0]))
        assert run.uid("10.244.2.3") == run.uid("fd00:10:244::3") == uid(pods[1])
        assert index.lookup("192.168.49.2") is None and index.lookup("10.244.1.20") is None
        assert index.resource_version == server.version
        pages = server.lists()
        assert [p.query.get("limit") for p in pages] == ["2", "2", "2"]
        assert pages[0].query.get("continue") is None and all(p.query.get("continue") for p in pages[1:])

    scenario(kubeconfig_index(server, tmp_path), body)


def test_not_synced_identifies_no_one(api, tmp_path):
    """Until the first list completes, lookup answers None and not_ready says so, with the last error."""
    web = pod("web-1", "10.244.1.10")
    server = api([web])
    server.fail(500)

    async def body(run: Running) -> None:
        await run.until(lambda: len(server.lists()) >= 2, "a retried list")
        assert run.index.lookup("10.244.1.10") is None and not run.index.synced
        why = run.index.not_ready()
        assert why is not None and why.startswith("the first list of Pods has not completed") and "HTTP 500" in why
        server.fail(None)
        await run.until(lambda: run.index.synced, "the first list")
        assert run.uid("10.244.1.10") == uid(web) and run.index.not_ready() is None

    scenario(kubeconfig_index(server, tmp_path), body)


def test_watch_events_keep_the_index_current(api, tmp_path):
    """ADDED, MODIFIED (a new IP) and DELETED through the watch change what each address names, with no re-list."""
    server = api([])
    web = pod("web-1", "10.244.1.10", namespace="shop")

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        server.add(web)
        await run.until(lambda: run.uid("10.244.1.10") == uid(web), "the ADDED pod")
        server.modify(with_ip(web, "10.244.1.11"))
        await run.until(lambda: run.uid("10.244.1.11") == uid(web), "the pod's new IP")
        assert run.index.lookup("10.244.1.10") is None
        server.delete(web)
        await run.until(lambda: run.index.resource_version == server.version, "the DELETED event")
        assert run.index.lookup("10.244.1.11") is None
        assert len(server.lists()) == 1 and len(server.watches()) == 1

    scenario(kubeconfig_index(server, tmp_path), body)


def test_a_reused_ip_names_the_new_pod_never_the_old(api, tmp_path):
    """A deleted pod's IP given to a pod in another namespace names the new pod, and never again the old one."""
    old = pod("api-7f9c-x1", "10.244.1.10", namespace="shop", serviceaccount="api")
    new = pod("worker-55c-k2", "10.244.1.10", namespace="batch", serviceaccount="worker")
    server = api([old])

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        assert run.uid("10.244.1.10") == uid(old)
        server.delete(old)
        server.add(new)
        seen: list[str | None] = []  # what the address named, poll by poll

        def probe(until_version: str | None = None) -> bool:
            seen.append(run.uid("10.244.1.10"))
            return run.index.resource_version == until_version if until_version else uid(new) in seen

        await run.until(probe, "the new pod")
        later = server.add(pod("web-1", "10.244.1.11", namespace="shop"))  # more events after it
        await run.until(lambda: probe(later["metadata"]["resourceVersion"]), "a later event")
        assert uid(old) not in seen[seen.index(uid(new)):]
        assert run.index.lookup("10.244.1.10") == Identity("pod-ip", "batch", "worker", "worker-55c-k2", uid(new))

    scenario(kubeconfig_index(server, tmp_path), body)


def test_a_pod_that_succeeded_is_dropped(api, tmp_path):
    """A pod reaching phase Succeeded names no one, and its IP is free for the next pod."""
    job = pod("report-28910-abc", "10.244.1.40", namespace="jobs")
    server = api([job])

    async def body(run: Running) -> None:
        await run.until(lambda: run.uid("10.244.1.40") == uid(job), "the job pod")
        server.modify(with_phase(job, "Succeeded"))
        await run.until(lambda: run.index.lookup("10.244.1.40") is None, "the job pod dropped")
        nxt = server.add(pod("web-2", "10.244.1.40", namespace="shop"))
        await run.until(lambda: run.uid("10.244.1.40") == uid(nxt), "the next pod on the IP")

    scenario(kubeconfig_index(server, tmp_path), body)


def test_a_host_network_pod_is_never_identified(api, tmp_path):
    """A hostNetwork pod, listed or added by the watch, never names its (the node's) address."""
    server = api([pod("kube-proxy-7x", host_network=True, namespace="kube-system", node_ip="192.168.49.2")])

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        assert run.index.lookup("192.168.49.2") is None
        server.add(pod("node-exporter-9z", host_network=True, namespace="monitoring", node_ip="192.168.49.3"))
        await run.until(lambda: run.index.resource_version == server.version, "the ADDED event")
        assert run.index.lookup("192.168.49.3") is None and run.index.lookup("192.168.49.2") is None

    scenario(kubeconfig_index(server, tmp_path), body)


def test_an_ip_two_live_pods_share_names_no_one_until_one_goes(api, tmp_path):
    """Two live pods on one IP make it name no one (the index stays ready); when one goes, it names the other."""
    first = pod("api-1", "10.244.1.10", namespace="shop")
    second = pod("api-1", "10.244.1.10", namespace="blog")
    server = api([first])

    async def body(run: Running) -> None:
        await run.until(lambda: run.uid("10.244.1.10") == uid(first), "the first pod")
        server.add(second)
        await run.until(lambda: run.index.lookup("10.244.1.10") is None, "the shared IP")
        assert run.index.not_ready() is None
        server.delete(first)
        await run.until(lambda: run.uid("10.244.1.10") == uid(second), "the remaining pod")

    scenario(kubeconfig_index(server, tmp_path), body)


def test_bookmarks_move_the_version_the_next_watch_starts_from(api, tmp_path):
    """Watches ask for bookmarks; a bookmark moves the resourceVersion, and the next watch starts from it."""
    server = api([pod("web-1", "10.244.1.10")])

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        first = server.watches()[0]
        assert flag(first.query.get("allowWatchBookmarks"))
        assert first.query.get("resourceVersion") == run.index.resource_version == server.version
        assert first.query.get("timeoutSeconds") == str(FAST.watch_seconds)
        version = server.advance(5)
        server.bookmark()
        await run.until(lambda: run.index.resource_version == version, "the bookmark's resourceVersion")
        server.cut()
        await run.until(lambda: len(server.watches()) == 2, "the next watch")
        assert server.watches()[1].query.get("resourceVersion") == version
        assert len(server.lists()) == 1

    scenario(kubeconfig_index(server, tmp_path), body)


@pytest.mark.parametrize("form", ["status", "event", "stream"])
def test_gone_forces_a_relist(api, tmp_path, form):
    """A 410 Gone (the watch request's HTTP status, an ERROR event at its start, or one in an open stream) makes
    the index list again, and it is right afterwards."""
    old = pod("api-1", "10.244.1.10", namespace="shop")
    server = api([old])
    new = pod("api-2", "10.244.1.10", namespace="blog")
    cache = pod("cache-1", "10.244.1.30", namespace="shop")

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        server.pause()
        if form != "stream":
            server.cut()  # the index watches again from its version, and waits (paused)
            await run.until(lambda: len(server.watches()) == 2, "the next watch request")
        server.delete(old)
        server.add(new)
        server.add(cache)
        server.expire("status" if form == "stream" else form)
        if form == "stream":
            server.error_event(410)
        server.resume()
        await run.until(lambda: len(server.lists()) == 2, "a second list")
        await run.until(lambda: run.uid("10.244.1.30") == uid(cache), "the index after the list")
        assert run.uid("10.244.1.10") == uid(new)
        assert run.index.counts["expired"] == 1 and run.index.counts["lists"] == 2
        await run.until(lambda: server.open_watches == 1, "the watch from the new list's version")

    scenario(kubeconfig_index(server, tmp_path), body)


def test_a_watch_the_server_ends_is_reopened_from_the_last_version(api, tmp_path):
    """When the API server ends a watch (timeoutSeconds), the index watches again from its last version, no list."""
    server = api([pod("web-1", "10.244.1.10")])
    timing = dataclasses.replace(FAST, watch_seconds=1)

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        added = server.add(pod("web-2", "10.244.1.11"))
        await run.until(lambda: len(server.watches()) >= 2, "the next watch")
        assert server.watches()[1].query.get("resourceVersion") == added["metadata"]["resourceVersion"]
        assert len(server.lists()) == 1 and run.index.not_ready() is None
        assert run.uid("10.244.1.11") == uid(added)

    scenario(kubeconfig_index(server, tmp_path, timing=timing), body)


@pytest.mark.parametrize("outage", ["refused", "hanging", "failing"])
def test_no_connection_past_max_stale_identifies_no_one_until_relisted(api, tmp_path, outage):
    """Without a working connection for longer than max_stale, lookup answers None and not_ready says why; once
    the API server is back, the index lists again and identifies the pods of the moment."""
    clock = Clock()
    old = pod("api-1", "10.244.1.10", namespace="shop")
    server = api([old])
    timing = dataclasses.replace(FAST, request_timeout=0.3)

    async def body(run: Running) -> None:
        index = run.index
        await run.until(lambda: server.open_watches == 1, "the watch")
        if outage == "refused":
            server.down()
        elif outage == "hanging":
            server.pause()
            server.cut()
        else:
            server.fail(500)
            server.cut()
        await run.until(lambda: not index.connected, "the lost connection")
        clock.now += 59
        assert run.uid("10.244.1.10") == uid(old) and index.not_ready() is None  # within max_stale
        clock.now += 2
        assert index.lookup("10.244.1.10") is None
        why = index.not_ready()
        assert why is not None
        assert why.startswith("no working list/watch connection for 61 s (--pod-index-max-stale 60 s); last error: ")
        server.delete(old)
        new = server.add(pod("api-2", "10.244.1.10", namespace="blog"))
        lists = len(server.lists())
        {"refused": server.up, "hanging": server.resume, "failing": lambda: server.fail(None)}[outage]()
        await run.until(lambda: run.uid("10.244.1.10") == uid(new), "the pod of the moment")
        assert len(server.lists()) > lists and index.not_ready() is None

    scenario(kubeconfig_index(server, tmp_path, clock=clock, timing=timing), body)


def test_a_short_outage_resumes_the_watch_without_a_list(api, tmp_path):
    """An outage shorter than max_stale keeps the index in use and resumes watching from its last version."""
    clock = Clock()
    server = api([pod("web-1", "10.244.1.10")])

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        listed = run.index.resource_version
        server.down()
        await run.until(lambda: not run.index.connected, "the lost connection")
        added = server.add(pod("web-2", "10.244.1.11"))
        clock.now += 30
        server.up()
        await run.until(lambda: run.uid("10.244.1.11") == uid(added), "the pod added during the outage")
        assert len(server.lists()) == 1 and server.watches()[-1].query.get("resourceVersion") == listed

    scenario(kubeconfig_index(server, tmp_path, clock=clock), body)


def test_a_quiet_connected_watch_is_not_stale(api, tmp_path):
    """An open watch on which nothing happens for far longer than max_stale keeps the index in use."""
    clock = Clock()
    web = pod("web-1", "10.244.1.10")
    server = api([web])

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1 and run.index.connected, "the watch")
        clock.now += 3600
        assert run.uid("10.244.1.10") == uid(web) and run.index.not_ready() is None
        later = server.add(pod("web-2", "10.244.1.11"))
        await run.until(lambda: run.uid("10.244.1.11") == uid(later), "an event on the same watch")
        assert len(server.watches()) == 1 and len(server.lists()) == 1

    scenario(kubeconfig_index(server, tmp_path, clock=clock), body)


def test_a_silent_watch_is_reopened_and_bookmarks_keep_it(api, tmp_path):
    """A watch that sends nothing, not even a bookmark, for idle_timeout is re-opened from the same version (no
    list); bookmarks count as life."""
    server = api([pod("web-1", "10.244.1.10")])
    timing = dataclasses.replace(FAST, idle_timeout=1.0)

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # bookmarks every 0.1 s for twice the idle timeout: the watch stays
            server.bookmark()
            await asyncio.sleep(0.1)
        assert len(server.watches()) == 1
        await run.until(lambda: len(server.watches()) == 2, "the silent watch re-opened")
        assert server.watches()[1].query.get("resourceVersion") == run.index.resource_version
        assert len(server.lists()) == 1

    scenario(kubeconfig_index(server, tmp_path, timing=timing), body)


@pytest.mark.parametrize("config", ["in-cluster", "kubeconfig"])
def test_https_with_a_bearer_token(api, tmp_path, config):
    """The index reaches the API server over HTTPS (verified against its CA) with a bearer token, in a pod (the
    service account's files) and from a kubeconfig."""
    web = pod("web-1", "10.244.1.10")
    server = api([web], ca=trustme.CA(), token="eyJhbGciOiJSUzI1NiJ9.sa-token")
    environ = server.service_account(tmp_path / "sa")

    async def body(run: Running) -> None:
        await run.until(lambda: server.open_watches == 1, "the watch")
        assert run.uid("10.244.1.10") == uid(web)
        assert {r.authorization for r in server.requests} == {"Bearer eyJhbGciOiJSUzI1NiJ9.sa-token"}

    if config == "in-cluster":
        scenario(lambda: PodIndex(service_account=str(tmp_path / "sa"), environ=environ, timing=FAST), body)
    else:
        scenario(kubeconfig_index(server, tmp_path), body)


@pytest.mark.parametrize("status, fix", [(401, "the service account token"), (403, "a ClusterRole")])
def test_a_refusal_is_reported_with_its_fix(api, tmp_path, status, fix):
    """A refused token (401) or a missing permission (403) keeps the index unsynced; not_ready says which, and
    what to do."""
    server = api([pod("web-1", "10.244.1.10")], ca=trustme.CA(), token="the-right-token")
    environ = server.service_account(tmp_path / "sa")
    if status == 401:
        (tmp_path / "sa" / "token").write_text("a-revoked-token")
    else:
        server.fail(403)

    async def body(run: Running) -> None:
        why = await run.until(lambda: f"HTTP {status}" in (run.index.not_ready() or "") and run.index.not_ready(),
                              "the refusal")
        assert fix in why and why.startswith("the first list of Pods has not completed; last error: ApiError")

    scenario(lambda: PodIndex(service_account=str(tmp_path / "sa"), environ=environ, timing=FAST), body)


@pytest.mark.parametrize("missing", ["kubeconfig", "KUBERNETES_SERVICE_HOST", "token", "ca.crt"])
def test_a_missing_configuration_is_refused_at_once(tmp_path, missing):
    """A kubeconfig that is not there, or an in-cluster configuration without its variables or files, is refused
    when the index is made, naming what is missing."""
    sa = tmp_path / "sa"
    sa.mkdir()
    for name in ("token", "ca.crt"):
        if name != missing:
            (sa / name).write_text("x")
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    environ.pop(missing, None)
    with pytest.raises(ClientConfigError, match="kubeconfig" if missing == "kubeconfig" else missing):
        if missing == "kubeconfig":
            PodIndex(str(tmp_path / "no-such-kubeconfig"))
        else:
            PodIndex(service_account=str(sa), environ=environ)


def test_a_configuration_that_does_not_load_is_reported(tmp_path):
    """A kubeconfig that does not parse leaves the index unsynced, retrying, and not_ready says what is wrong."""
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: [{name: lab, cluster: {server: ")

    async def body(run: Running) -> None:
        why = await run.until(lambda: "does not load" in (run.index.not_ready() or "") and run.index.not_ready(),
                              "the configuration error")
        assert why.startswith("the first list of Pods has not completed; last error: ClientConfigError")
        assert str(broken) in why

    scenario(lambda: PodIndex(str(broken), timing=FAST), body)


def test_cancelling_run_closes_the_watch(api, tmp_path):
    """Cancelling run() ends it at once and closes its watch connection."""
    server = api([pod("web-1", "10.244.1.10")])

    async def main() -> None:
        index = PodIndex(server.kubeconfig(tmp_path / "kubeconfig"), timing=FAST)
        task = asyncio.create_task(index.run())
        run = Running(index, task)
        await run.until(lambda: server.open_watches == 1, "the watch")
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=DEADLINE)
        assert done and task.cancelled()
        await until(lambda: server.open_watches == 0, "the watch closed on the server's side")

    asyncio.run(main())


def test_max_stale_must_be_positive():
    """A max_stale of zero or less is refused when the index is made."""
    with pytest.raises(ValueError, match="max_stale"):
        PodIndex("/dev/null", max_stale=0)
