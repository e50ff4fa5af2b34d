"""The object store behind :class:`k8s_api.KubeApi`: Pods, Namespaces and ConfigMaps, with the API server's rules.

Pure state, no I/O: every write takes the next resourceVersion (one counter
for every kind, as etcd's revision is) and is kept in a history of
:class:`Change` records, each with the object before and after, so that a
:class:`Filter` (a watch's resource, namespace, label and field selectors) can
turn it into the event the real API server sends that watch: ADDED when the
object starts matching, MODIFIED while it matches, DELETED (the previous
content at the new resourceVersion) when it stops matching or is deleted.

Requests that break the server's rules raise :class:`ApiStatus`, which the
HTTP layer answers with the ``Status`` body the real server words: 404
NotFound, 409 AlreadyExists on a create, 409 Conflict for a stale
``metadata.resourceVersion`` on a replace or a failed delete precondition,
400 BadRequest for a selector it cannot parse or a name that does not match
the URL, 403 Forbidden for a create in a namespace being terminated.

The objects as the API server returns them: :func:`pod` (with :func:`with_ip`
and :func:`with_phase`), :func:`namespace`, :func:`configmap`.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CREATED_AT = "2026-11-02T09:14:03Z"


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    namespaced: bool


RESOURCES = {
    "pods": Resource("Pod", True),
    "namespaces": Resource("Namespace", False),
    "configmaps": Resource("ConfigMap", True),
}
BY_KIND = {r.kind: plural for plural, r in RESOURCES.items()}
FIELDS = ("metadata.name", "metadata.namespace")  # the field selectors every resource supports


class ApiStatus(Exception):
    """A request the API server refuses: the code, reason and message of its ``Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def status_object(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details is not None:
        body["details"] = details
    return body


def not_found(resource: str, name: str) -> ApiStatus:
    return ApiStatus(404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource})


def conflict(resource: str, name: str, why: str) -> ApiStatus:
    return ApiStatus(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": {why}',
                     {"name": name, "kind": resource})


def resource_of(obj: Mapping[str, Any]) -> str:
    """The resource (plural) of an object by its ``kind``; an object without one is a Pod (as list items are)."""
    kind = obj.get("kind", "Pod")
    if kind not in BY_KIND:
        raise ValueError(f"the store keeps {', '.join(BY_KIND)}, not {kind}")
    return BY_KIND[kind]


def typed(resource: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object with its kind and apiVersion first, as a GET, a write or a watch event returns it."""
    return {"kind": RESOURCES[resource].kind, "apiVersion": "v1", **copy.deepcopy(dict(obj))}


# -- selectors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def holds(self, values: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in values
        if self.op == "!exists":
            return self.key not in values
        if self.op == "=":
            return values.get(self.key) == self.value
        return values.get(self.key) != self.value  # "!=" also matches an object without the key, as the server's


def parse_labels(text: str) -> tuple[Requirement, ...]:
    """An equality-based label selector: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, comma-separated."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "!=" in part:
            key, value = (s.strip() for s in part.split("!=", 1))
            found.append(Requirement(key, "!=", value))
        elif "=" in part:
            key, value = (s.strip() for s in part.replace("==", "=", 1).split("=", 1))
            found.append(Requirement(key, "=", value))
        elif part.startswith("!"):
            found.append(Requirement(part[1:].strip(), "!exists"))
        else:
            found.append(Requirement(part, "exists"))
        if not found[-1].key or " " in found[-1].key or "=" in found[-1].value or " " in found[-1].value:
            raise ApiStatus(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return tuple(found)


def parse_fields(text: str) -> tuple[Requirement, ...]:
    """A field selector over ``metadata.name`` and ``metadata.namespace``: ``f=v``, ``f==v``, ``f!=v``."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        op = "!=" if "!=" in part else "="
        if op not in part and "=" not in part:
            raise ApiStatus(400, "BadRequest", f"invalid selector: '{text}'; can't understand '{part}'")
        key, value = (s.strip() for s in part.replace("==", "=", 1).split(op, 1))
        if key not in FIELDS:
            raise ApiStatus(400, "BadRequest", f'"{key}" is not a known field selector: only '
                            + ", ".join(f'"{f}"' for f in FIELDS))
        found.append(Requirement(key, op, value))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Filter:
    """What one list or watch selects: a resource, a namespace (None: all), label and field requirements."""

    resource: str
    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        fields = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", "")}
        labels = meta.get("labels") or {}
        return all(r.holds(labels) for r in self.labels) and all(r.holds(fields) for r in self.fields)

    def view(self, change: Change) -> dict[str, Any] | None:
        """The event this filter's watch gets for ``change``, or None (as the API server's watch cache decides)."""
        if change.resource != self.resource:
            return None
        now = change.type != "DELETED" and self.matches(change.obj)
        before = change.prev is not None and self.matches(change.prev)
        if now:
            return {"type": "MODIFIED" if before else "ADDED", "object": typed(self.resource, change.obj)}
        if before:
            assert change.prev is not None
            gone = typed(self.resource, change.prev)  # the previous content, at the change's resourceVersion
            gone["metadata"]["resourceVersion"] = str(change.version)
            return {"type": "DELETED", "object": gone}
        return None


# -- the store ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One write: the object after it (its last state for a delete) and before it (None for a create)."""

    version: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    prev: dict[str, Any] | None


Key = tuple[str, str, str]  # resource, namespace ("" for cluster-scoped objects), name


class Store:
    """Every object by resource, namespace and name, the history of changes, paged-list snapshots."""

    def __init__(self, version: int = 1000) -> None:
        self.version = version
        self.objects: dict[Key, dict[str, Any]] = {}
        self.history: list[Change] = []
        self.oldest = 0  # a watch from an older resourceVersion is answered 410 Gone
        self.snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # continue token -> (version, rest)

    def forget(self) -> None:
        """Drop the history and the paged-list snapshots: older resourceVersions are gone."""
        self.oldest = self.version
        self.history.clear()
        self.snapshots.clear()

    def find(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.objects.get((resource, namespace or "", name))

    def select(self, selection: Filter) -> list[dict[str, Any]]:
        return [o for (r, _, _), o in sorted(self.objects.items()) if r == selection.resource
                and selection.matches(o)]

    def commit(self, resource: str, kind: str, obj: dict[str, Any]) -> Change:
        """Apply one change (ADDED, MODIFIED, DELETED) with the next resourceVersion; ValueError if it cannot be."""
        meta = obj["metadata"]
        key = (resource, meta.get("namespace", "") if RESOURCES[resource].namespaced else "", meta["name"])
        prev = self.objects.get(key)
        if kind == "ADDED" and prev is not None:
            raise ValueError(f"{resource} {key[1:]} exists already")
        if kind != "ADDED" and prev is None:
            raise ValueError(f"no {resource} {key[1:]}")
        if resource == "namespaces" and kind == "DELETED":  # its objects go first, as the namespace controller does
            for inside in [k for k in self.objects if k[0] != "namespaces" and k[1] == meta["name"]]:
                self.commit(inside[0], "DELETED", self.objects[inside])
        self.version += 1
        stored = copy.deepcopy(prev if kind == "DELETED" else obj)
        assert stored is not None
        stored.pop("kind", None)
        stored.pop("apiVersion", None)
        stored["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            del self.objects[key]
        else:
            self.objects[key] = stored
        change = Change(self.version, resource, kind, stored, copy.deepcopy(prev))
        self.history.append(change)
        return change

    def since(self, version: int) -> list[Change]:
        return [c for c in self.history if c.version > version]

    # -- the API's verbs: ApiStatus when the server would refuse --------------------------------------

    def page(self, selection: Filter, limit: int, token: str | None) -> tuple[int, list[dict[str, Any]], str | None]:
        """One page of a list: (resourceVersion, items, continue token or None)."""
        if token:
            if token not in self.snapshots:
                raise ApiStatus(410, "Expired", "The provided continue parameter is too old to display a "
                                "consistent list result. You can start a new list without the continue parameter.")
            version, items = self.snapshots.pop(token)
        else:
            version, items = self.version, [copy.deepcopy(o) for o in self.select(selection)]
        limit = limit or len(items) or 1
        page, rest = items[:limit], items[limit:]
        if not rest:
            return version, page, None
        token = secrets.token_urlsafe(12)
        self.snapshots[token] = (version, rest)
        return version, page, token

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any]:
        found = self.find(resource, namespace, name)
        if found is None:
            raise not_found(resource, name)
        return typed(resource, found)

    def create(self, resource: str, namespace: str | None, body: dict[str, Any]) -> Change:
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if not name:
            raise ApiStatus(422, "Invalid", f"{RESOURCES[resource].kind} \"\" is invalid: metadata.name: Required "
                            "value: name or generateName is required")
        if meta.get("resourceVersion"):
            raise ApiStatus(500, "InternalError", "resourceVersion should not be set on objects to be created")
        self._check_namespace(resource, namespace, meta, name)
        if namespace is not None:
            ns = self.find("namespaces", None, namespace)
            if ns is None:
                raise not_found("namespaces", namespace)
            if (ns.get("status") or {}).get("phase") == "Terminating":
                raise ApiStatus(403, "Forbidden", f'{resource} "{name}" is forbidden: unable to create new content '
                                f"in namespace {namespace} because it is being terminated",
                                {"name": name, "kind": resource})
        if self.find(resource, namespace, name) is not None:
            raise ApiStatus(409, "AlreadyExists", f'{resource} "{name}" already exists',
                            {"name": name, "kind": resource})
        obj = copy.deepcopy(body)
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=CREATED_AT)
        if namespace is not None:
            obj["metadata"]["namespace"] = namespace
        return self.commit(resource, "ADDED", obj)

    def replace(self, resource: str, namespace: str | None, name: str, body: dict[str, Any]) -> Change:
        meta = body.get("metadata") or {}
        if meta.get("name") != name:
            raise ApiStatus(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the name "
                            f"on the URL ({name})")
        self._check_namespace(resource, namespace, meta, name)
        current = self.find(resource, namespace, name)
        if current is None:
            raise not_found(resource, name)
        wanted = meta.get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise conflict(resource, name, "the object has been modified; please apply your changes to the latest "
                           "version and try again")
        obj = copy.deepcopy(body)
        for field in ("uid", "creationTimestamp", "namespace"):
            if field in current["metadata"]:
                obj["metadata"][field] = current["metadata"][field]
        return self.commit(resource, "MODIFIED", obj)

    def delete(self, resource: str, namespace: str | None, name: str, options: Mapping[str, Any]) -> Change:
        current = self.find(resource, namespace, name)
        if current is None:
            raise not_found(resource, name)
        pre = options.get("preconditions") or {}
        meta = current["metadata"]
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if pre.get(field) and pre[field] != meta.get(field):
                raise conflict(resource, name, f"Precondition failed: {label} in precondition: {pre[field]}, "
                               f"{label} in object meta: {meta.get(field)}")
        return self.commit(resource, "DELETED", current)

    @staticmethod
    def _check_namespace(resource: str, namespace: str | None, meta: Mapping[str, Any], name: str) -> None:
        if namespace is not None and meta.get("namespace") not in (None, "", namespace):
            raise ApiStatus(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                            "sent on the request")


# -- objects as the API server returns them ---------------------------------------------------------


def namespace(name: str, labels: Mapping[str, str] | None = None, *, phase: str = "Active") -> dict[str, Any]:
    """A Namespace (its ``kubernetes.io/metadata.name`` label set, as the server sets it)."""
    return {
        "kind": "Namespace", "apiVersion": "v1",
        "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": "0", "creationTimestamp": CREATED_AT,
                     "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": phase},
    }


def configmap(
    name: str,
    namespace: str,
    data: Mapping[str, str] | None = None,
    *,
    binary_data: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A ConfigMap; ``binary_data`` values are base64 text, as in the API."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "resourceVersion": "0",
                            "creationTimestamp": CREATED_AT}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    obj: dict[str, Any] = {"kind": "ConfigMap", "apiVersion": "v1", "metadata": meta}
    if data is not None:
        obj["data"] = dict(data)
    if binary_data is not None:
        obj["binaryData"] = dict(binary_data)
    return obj


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
