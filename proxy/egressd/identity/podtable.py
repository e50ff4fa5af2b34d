"""The pod index's pure part: Pod objects and watch events as the API server sends them in, IP -> Identity out.

No sockets, no await, no clock: :class:`PodTable` takes a list result
(:meth:`PodTable.replace`) and then watch events (:meth:`PodTable.apply`) in
the order the API server sent them, and answers :meth:`PodTable.lookup`.
:mod:`egressd.identity.podindex` feeds it from list+watch.

The rules (each one a way to name the wrong pod if it were missing):

* a pod is known by its ``metadata.uid``; a pod re-created under the same name
  is another pod;
* a pod is indexed only while it can send traffic from its own address: not
  ``hostNetwork: true`` (its IP is the node's, shared by every such pod and by
  the node itself), not in phase ``Succeeded``/``Failed`` (its IP is free to be
  given to the next pod), and with an IP (``status.podIPs``, IPv4 and IPv6;
  ``status.podIP`` when ``podIPs`` is absent);
* an address that two indexed pods hold at once names neither: ``lookup``
  answers None for it while the sharing lasts (a stale pod whose deletion has
  not reached us yet and the new pod that got its IP);
* a pod whose IP changes is indexed under its new IPs only; a DELETED event,
  or a list without the pod, drops it (a terminating pod, with a
  ``deletionTimestamp``, still runs and holds its IP until then).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from egressd.identity import Identity

SOURCE = "pod-ip"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
EXPIRED = 410  # the resourceVersion asked for is older than the history the API server keeps


class WatchError(Exception):
    """An ERROR event in a watch stream (a ``Status`` object): the watch must end."""

    def __init__(self, code: int | None, reason: str, message: str) -> None:
        super().__init__(f"the API server ended the watch: {code} {reason}: {message}")
        self.code, self.reason = code, reason


class Expired(WatchError):
    """``410 Gone``: the resourceVersion is too old for a watch; list again."""


@dataclass(frozen=True, slots=True)
class PodEntry:
    """What the index keeps of one live pod that has its own addresses."""

    uid: str
    ips: tuple[str, ...]
    identity: Identity


def canonical_ip(text: str) -> str | None:
    """The canonical form of an IP literal (IPv4-mapped IPv6 as IPv4, zone dropped), or None if it is not one."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    """``status.podIPs`` (every family), else ``status.podIP``; canonical, duplicates and non-IPs dropped."""
    listed = status.get("podIPs") or ()
    raw = [item.get("ip") for item in listed if isinstance(item, Mapping)] or [status.get("podIP")]
    ips = (canonical_ip(ip) for ip in raw if isinstance(ip, str) and ip)
    return tuple(dict.fromkeys(ip for ip in ips if ip is not None))


def entry_for(pod: Mapping[str, Any]) -> PodEntry | None:
    """The entry for a Pod object, or None when it must not identify anyone (see the module docstring)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    uid = meta.get("uid")
    if not uid or spec.get("hostNetwork") is True or status.get("phase") in TERMINAL_PHASES:
        return None
    ips = pod_ips(status)
    if not ips:
        return None
    identity = Identity(
        SOURCE,
        namespace=meta.get("namespace"),
        serviceaccount=spec.get("serviceAccountName") or "default",
        pod=meta.get("name"),
        pod_uid=uid,
    )
    return PodEntry(uid, ips, identity)


class PodTable:
    """Live pods by uid and by address, and the resourceVersion they are current at.

    Invariant: ``_by_ip[ip]`` holds exactly the uids of the entries in ``_pods``
    whose ``ips`` contain ``ip``; no key maps to an empty set.
    """

    def __init__(self) -> None:
        self._pods: dict[str, PodEntry] = {}
        self._by_ip: dict[str, set[str]] = {}
        self.resource_version: str | None = None

    def __len__(self) -> int:
        return len(self._pods)

    def lookup(self, ip: str) -> Identity | None:
        """The identity of the one live pod that holds ``ip``; None if no pod or more than one holds it."""
        uids = self._by_ip.get(ip)
        if uids is None:
            key = canonical_ip(ip)
            uids = self._by_ip.get(key) if key is not None and key != ip else None
        if uids is None or len(uids) != 1:
            return None
        (uid,) = uids
        return self._pods[uid].identity

    def shared(self) -> dict[str, int]:
        """Addresses that more than one live pod holds now, with how many (those identify no one)."""
        return {ip: len(uids) for ip, uids in self._by_ip.items() if len(uids) > 1}

    def replace(self, pods: Iterable[Mapping[str, Any]], resource_version: str | None) -> None:
        """Forget everything and index a list result (the items of every page) current at ``resource_version``."""
        self._pods.clear()
        self._by_ip.clear()
        for pod in pods:
            self._put(pod)
        self.resource_version = resource_version

    def apply(self, event: Mapping[str, Any]) -> None:
        """Apply one watch event: ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``.

        Raises :class:`Expired` for an ERROR with code 410, :class:`WatchError`
        for any other ERROR, ValueError for an event that is not one of these."""
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, Mapping):
            raise ValueError(f"a watch event without an object: {str(event)[:200]}")
        if kind == "ERROR":
            code = obj.get("code")
            error = Expired if code == EXPIRED else WatchError
            raise error(code, str(obj.get("reason", "")), str(obj.get("message", "")))
        if kind in ("ADDED", "MODIFIED"):
            self._put(obj)
        elif kind == "DELETED":
            self._drop((obj.get("metadata") or {}).get("uid"))
        elif kind != "BOOKMARK":
            raise ValueError(f"unknown watch event type {kind!r}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = version

    def _put(self, pod: Mapping[str, Any]) -> None:
        uid = (pod.get("metadata") or {}).get("uid")
        self._drop(uid)
        entry = entry_for(pod)
        if entry is None:
            return
        self._pods[entry.uid] = entry
        for ip in entry.ips:
            self._by_ip.setdefault(ip, set()).add(entry.uid)

    def _drop(self, uid: str | None) -> None:
        entry = self._pods.pop(uid, None) if uid else None
        if entry is None:
            return
        for ip in entry.ips:
            holders = self._by_ip[ip]
            holders.discard(uid)
            if not holders:
                del self._by_ip[ip]
