"""What the allowlist sync must do, decided from what the API server lists: a pure function, no I/O.

:func:`plan` takes the source ConfigMap (or None when it is missing), the
namespaces labelled for injection and every ConfigMap of the source's name
outside the source's namespace, and returns the actions that make the copies
right, each with its namespace and a reason from a closed set. Rules, in order:

1. The source's own namespace is never written, whatever its labels.
2. A ConfigMap of that name without the owner label (``MANAGED_BY_LABEL:
   SYNC_MANAGER``) is a user's object: never touched, reported (``SKIP
   unmanaged``). A managed one whose ``COPY_OF_ANNOTATION`` names another
   source belongs to another install: never touched, reported (``SKIP
   other_source``).
3. Source missing: nothing is created, updated or deleted (running sidecars
   keep their last good policy).
4. A namespace labelled ``INJECT_LABEL=INJECT_ENABLED`` and not terminating
   without a copy: ``CREATE missing``; with a copy whose ``data`` or
   ``binaryData`` differ from the source's: ``UPDATE data_differs``; whose
   annotation is missing: ``UPDATE metadata_differs``. A terminating namespace
   gets no new copy and its copy is left to go with it.
5. A copy in a namespace that is not labelled ``enabled`` (or is gone):
   ``DELETE not_labelled``.

Every action is computed from the state as listed, so it is idempotent: the
loop of :mod:`egressd.allowlistsync` applies them with the copy's
resourceVersion as a precondition and plans again after a conflict.

The API server's answers are read here too, as values: :func:`result_of` turns
a write's status into its result, :func:`watch_event` a watch line into the
resourceVersion to resume from (or :class:`Expired`, or :class:`ApiError`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from egressd import kube
from egressd.kubeclient import status_fields

Pairs = tuple[tuple[str, str], ...]  # a ConfigMap's data or binaryData, sorted by key


class Verb(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    SKIP = "skip"  # an object of the copies' name the sync must not touch: reported, left alone


class Reason(enum.StrEnum):
    MISSING = "missing"  # a labelled namespace has no copy (new namespace, or the copy was deleted)
    DATA_DIFFERS = "data_differs"  # the source changed, or the copy was edited
    METADATA_DIFFERS = "metadata_differs"  # the copy lacks the annotation naming its source
    NOT_LABELLED = "not_labelled"  # the namespace lost its label (or has another value), or is gone
    UNMANAGED = "unmanaged"  # an object of that name without the owner label
    OTHER_SOURCE = "other_source"  # a managed copy of another source (another install)


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labelled: bool  # INJECT_LABEL is INJECT_ENABLED
    terminating: bool  # status.phase Terminating: being deleted


@dataclass(frozen=True, slots=True)
class ConfigMap:
    namespace: str
    name: str
    resource_version: str
    managed: bool  # carries MANAGED_BY_LABEL: SYNC_MANAGER
    copy_of: str | None  # COPY_OF_ANNOTATION
    data: Pairs = ()
    binary_data: Pairs = ()

    @property
    def ref(self) -> str:
        """``namespace/name``, as COPY_OF_ANNOTATION spells the source."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Action:
    verb: Verb
    namespace: str
    reason: Reason
    resource_version: str | None = None  # the copy's, as listed (update and delete preconditions)


def namespace_from(obj: Mapping[str, Any]) -> Namespace:
    """A Namespace of the API (JSON) as the plan reads it."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    phase = (obj.get("status") or {}).get("phase")
    return Namespace(str(meta["name"]), labels.get(kube.INJECT_LABEL) == kube.INJECT_ENABLED, phase == "Terminating")


def configmap_from(obj: Mapping[str, Any]) -> ConfigMap:
    """A ConfigMap of the API (JSON) as the plan reads it."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    return ConfigMap(
        namespace=str(meta["namespace"]), name=str(meta["name"]),
        resource_version=str(meta.get("resourceVersion", "")),
        managed=labels.get(kube.MANAGED_BY_LABEL) == kube.SYNC_MANAGER,
        copy_of=annotations.get(kube.COPY_OF_ANNOTATION),
        data=_pairs(obj.get("data")), binary_data=_pairs(obj.get("binaryData")),
    )


def _pairs(mapping: Mapping[str, Any] | None) -> Pairs:
    return tuple(sorted((str(k), str(v)) for k, v in (mapping or {}).items()))


def plan(
    source: ConfigMap | None, source_ref: str, namespaces: Iterable[Namespace], copies: Iterable[ConfigMap]
) -> tuple[Action, ...]:
    """The actions that make every copy of ``source_ref`` (``namespace/name``) right, sorted by namespace.

    ``copies``: every ConfigMap of the source's name outside its namespace, managed or not."""
    source_ns = source_ref.split("/", 1)[0]
    wanted = {n.name: n for n in namespaces if n.labelled and n.name != source_ns}
    actions: list[Action] = []
    seen: set[str] = set()
    for copy in copies:
        if copy.namespace == source_ns:
            continue
        seen.add(copy.namespace)
        if not copy.managed:
            actions.append(Action(Verb.SKIP, copy.namespace, Reason.UNMANAGED, copy.resource_version))
            continue
        if copy.copy_of not in (None, source_ref):
            actions.append(Action(Verb.SKIP, copy.namespace, Reason.OTHER_SOURCE, copy.resource_version))
            continue
        if source is None:
            continue
        namespace = wanted.get(copy.namespace)
        if namespace is None:
            actions.append(Action(Verb.DELETE, copy.namespace, Reason.NOT_LABELLED, copy.resource_version))
        elif namespace.terminating:
            continue
        elif (copy.data, copy.binary_data) != (source.data, source.binary_data):
            actions.append(Action(Verb.UPDATE, copy.namespace, Reason.DATA_DIFFERS, copy.resource_version))
        elif copy.copy_of is None:
            actions.append(Action(Verb.UPDATE, copy.namespace, Reason.METADATA_DIFFERS, copy.resource_version))
    if source is not None:
        actions.extend(Action(Verb.CREATE, name, Reason.MISSING) for name, namespace in wanted.items()
                       if name not in seen and not namespace.terminating)
    return tuple(sorted(actions, key=lambda a: (a.namespace, a.verb)))


def skip_detail(action: Action, name: str, source_ref: str) -> str:
    """What a SKIP means and how to fix it, for the log."""
    where = f"{action.namespace}/{name}"
    if action.reason is Reason.UNMANAGED:
        return (f"ConfigMap {where} is not the allowlist sync's (no {kube.MANAGED_BY_LABEL}={kube.SYNC_MANAGER} "
                "label): it is left alone, so the pods there do not get the allowlists; rename or delete it, or give "
                "it that label to hand it to the sync")
    return (f"ConfigMap {where} is a copy of another source, not of {source_ref}: it is left alone; run one "
            "allowlist sync per cluster, or delete the copy")


def source_missing(source_ref: str) -> str:
    return (f"the source ConfigMap {source_ref} does not exist: no copy is created and none is deleted; create it "
            "(kubectl apply -k with the allowlists), or fix --namespace/--configmap")


def copy_body(source: ConfigMap, namespace: str, resource_version: str | None = None) -> dict[str, Any]:
    """The copy of ``source`` in ``namespace`` as the API takes it (a replace: with the copy's resourceVersion)."""
    meta: dict[str, Any] = {
        "name": source.name, "namespace": namespace,
        "labels": {kube.MANAGED_BY_LABEL: kube.SYNC_MANAGER},
        "annotations": {kube.COPY_OF_ANNOTATION: source.ref},
    }
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    if source.data:
        body["data"] = dict(source.data)
    if source.binary_data:
        body["binaryData"] = dict(source.binary_data)
    return body


# -- the API server's answers -----------------------------------------------------------------------

RBAC_HINT = ("the service account needs list and watch on namespaces, and list, watch, create, update and delete "
             "on configmaps in every namespace: a ClusterRole")


class ApiError(Exception):
    """The API server answered with an error status (its ``Status`` reason and message)."""

    def __init__(self, status: int, body: bytes) -> None:
        reason, message = status_fields(body)
        hint = {
            401: " (the credentials were not accepted: the service account token, or the kubeconfig's user)",
            403: f" ({RBAC_HINT})",
        }.get(status, "")
        super().__init__(f"HTTP {status}: {reason + ': ' if reason else ''}{message}{hint}")
        self.status = status


class Expired(ApiError):
    """410 Gone: the resourceVersion a watch asked for is no longer in the API server's history."""


def result_of(status: int) -> str:
    """A write's result from its HTTP status: success, conflict (409), not_found (404) or error."""
    if 200 <= status < 300:
        return "success"
    return {409: "conflict", 404: "not_found"}.get(status, "error")


def done(verb: Verb, result: str) -> bool:
    """The write left the copy as planned (a delete answered 404: another replica, or a person, deleted it)."""
    return result == "success" or (result == "not_found" and verb is Verb.DELETE)


def watch_event(event: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(the resourceVersion to resume from, whether the event is a change); Expired or ApiError for an ERROR."""
    obj = event.get("object") or {}
    if event.get("type") == "ERROR":
        code = int(obj.get("code") or 500)
        raise (Expired if code == 410 else ApiError)(code, orjson.dumps(obj))
    return (obj.get("metadata") or {}).get("resourceVersion"), event.get("type") != "BOOKMARK"
