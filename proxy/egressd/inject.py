"""The sidecar injection, pure: an AdmissionReview's bytes in, a decision and a JSON patch out.

:func:`review` answers one ``admission.k8s.io/v1`` AdmissionReview (:mod:`egressd.webhook` serves it). The
patch puts ``egressd init-iptables`` and egressd as a native sidecar (an init container with ``restartPolicy:
Always``) in front of the pod's own init containers, adds their volumes and marks the pod. They come from the
YAML templates in ``sidecar/`` (:func:`load_templates`): each file is parsed first, then its ``${name}``
placeholders are filled inside string values, so nothing a pod carries can add YAML structure.

Decisions, the first that applies:

1. not JSON, not a v1 AdmissionReview with a request uid, a Pod of the wrong shape: ``invalid`` (HTTP 400);
2. not a CREATE, not a Pod, a subresource: ``skipped`` (allowed, no patch);
3. in ``kube-system`` or egressd's namespace, labelled ``egressd.io/inject: "false"``, already injected,
   ``hostNetwork`` (with a warning: it has no network namespace of its own, nothing filters it): ``skipped``;
4. the pod or a container running as the proxy UID, a volume name the injection adds, a service name no
   allowlist can have, a bad exclusion annotation: ``refused`` (403, every problem in one message);
5. otherwise ``injected``.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from egressd import kube
from egressd.addresses import parse_cidr
from egressd.config import ConfigError
from egressd.policy.loader import SERVICE_NAME  # the allowlist files' rule for service names
from egressd.policy.model import IPNetwork
from egressd.sidecartemplates import TEMPLATE_FILES, TemplateError, Templates, compile_dir

API_VERSION = "admission.k8s.io/v1"
HOST_NETWORK_WARNING = ("egressd: hostNetwork pod: it shares the node's network namespace, so no sidecar was "
                        "injected and its egress is not filtered")
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


class Decision(enum.Enum):
    INJECTED = "injected"
    SKIPPED = "skipped"
    REFUSED = "refused"
    INVALID = "invalid"


class _Invalid(Exception):
    """Input that is not a usable AdmissionReview (HTTP 400)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The webhook's own configuration: the image, egressd's namespace, the cluster-wide exclusions."""

    image: str
    namespace: str = kube.NAMESPACE
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    exclude_ports: tuple[int, ...] = ()
    version: str = kube.VERSION

    def __post_init__(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"--image {self.image!r}: give the egressd image, e.g. egressd:{kube.VERSION}")


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """One review's answer and what its log line says."""

    decision: Decision
    reason: str  # a fixed word per rule (not_create, host_network, bad_service, ...)
    message: str = ""
    uid: str = ""
    namespace: str = ""
    pod: str = ""
    operation: str = ""
    kind: str = ""
    service: str | None = None
    patch: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()

    def response(self) -> dict[str, Any]:
        """The AdmissionReview the API server gets back."""
        if self.decision in (Decision.REFUSED, Decision.INVALID):
            return refusal(403 if self.decision is Decision.REFUSED else 400, self.message, self.uid)
        answer: dict[str, Any] = {"uid": self.uid, "allowed": True}
        if self.patch:
            answer["patchType"] = "JSONPatch"
            answer["patch"] = base64.b64encode(json.dumps(list(self.patch)).encode()).decode()
        if self.warnings:
            answer["warnings"] = list(self.warnings)
        return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": answer}

    def log_fields(self) -> dict[str, Any]:
        return {"uid": self.uid, "namespace": self.namespace, "pod": self.pod, "operation": self.operation,
                "kind": self.kind, "decision": self.decision.value, "reason": self.reason,
                "service": self.service, "message": self.message or None}


def refusal(code: int, message: str, uid: str = "") -> dict[str, Any]:
    """An AdmissionReview answer ``allowed: false`` with this status code and message."""
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": {"uid": uid, "allowed": False,
            "status": {"status": "Failure", "code": code, "message": message}}}


def load_templates(directory: Path) -> Templates:
    """The templates of ``directory``, parsed (:func:`egressd.sidecartemplates.compile_dir`) and checked for what
    the webhook relies on; :class:`TemplateError` names the file, the line and the fix."""
    templates = compile_dir(directory)
    return dataclasses.replace(templates, volume_names=frozenset(_check(templates, directory)))


def _check(templates: Templates, directory: Path) -> list[str]:
    """The volume names, after checking what the webhook relies on: the container names, the native sidecar."""
    init, sidecar, volumes = templates.fill(_values(Settings("egressd:sample"), "sample", ["--exclude-port", "1"]))
    where = {k: directory / v for k, v in TEMPLATE_FILES.items()}
    for key, container, name in (("init", init, kube.INIT_CONTAINER), ("sidecar", sidecar, kube.SIDECAR_CONTAINER)):
        if not isinstance(container, dict) or container.get("name") != name:
            raise TemplateError(f"template {where[key]}: must be one container mapping with name: {name}")
    if sidecar.get("restartPolicy") != "Always":
        raise TemplateError(f"template {where['sidecar']}: set restartPolicy: Always (egressd is a native sidecar)")
    names = [v.get("name") for v in volumes if isinstance(v, dict)] if isinstance(volumes, list) else []
    if not names or len(names) != len(volumes) or len(set(names)) != len(names):
        raise TemplateError(f"template {where['volumes']}: must be a list of volumes, each with its own name")
    return names


def _values(settings: Settings, service: str, exclude_args: list[str]) -> dict[str, Any]:
    return {"image": settings.image, "version": settings.version, "service": service,
            "init_container": kube.INIT_CONTAINER, "sidecar_container": kube.SIDECAR_CONTAINER,
            "proxy_uid": kube.PROXY_UID, "admin_port": kube.ADMIN_PORT, "admin_port_name": kube.ADMIN_PORT_NAME,
            "transparent_port": kube.TRANSPARENT_PORT, "dns_port": kube.DNS_PORT,
            "allowlists_configmap": kube.ALLOWLISTS_CONFIGMAP, "allowlists_mount": kube.ALLOWLISTS_MOUNT,
            "exclude_args": exclude_args}


def review(body: bytes, settings: Settings, templates: Templates) -> Outcome:
    """Decide one AdmissionReview (the request body) and build the answer; never raises on bad input."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return Outcome(Decision.INVALID, "bad_json", f"the body is not JSON: send an {API_VERSION} AdmissionReview")
    request = data.get("request") if isinstance(data, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    base = Outcome(Decision.INVALID, "bad_review", uid=uid if isinstance(uid, str) else "")
    try:
        return _review(data, base, settings, templates)
    except _Invalid as exc:
        return dataclasses.replace(base, message=str(exc))


def _review(data: Any, base: Outcome, settings: Settings, templates: Templates) -> Outcome:
    if not isinstance(data, dict) or data.get("apiVersion") != API_VERSION or data.get("kind") != "AdmissionReview":
        got = f"apiVersion {str(data.get('apiVersion'))[:64]!r}, kind {str(data.get('kind'))[:64]!r}" \
            if isinstance(data, dict) else "JSON"
        raise _Invalid(f"{got} where an {API_VERSION} AdmissionReview was expected (set admissionReviewVersions: "
                       "[v1] in the MutatingWebhookConfiguration)")
    request = data.get("request")
    if not isinstance(request, dict) or not base.uid:
        raise _Invalid("the AdmissionReview has no request, or its request.uid is missing or empty")
    kind, operation = request.get("kind"), request.get("operation")
    if not isinstance(kind, dict) or not isinstance(operation, str):
        raise _Invalid("request.kind (group, version, kind) or request.operation is missing")
    base = dataclasses.replace(base, operation=operation, kind=str(kind.get("kind")))
    if operation != "CREATE":
        return dataclasses.replace(base, decision=Decision.SKIPPED, reason="not_create")
    if (kind.get("group"), kind.get("kind")) != ("", "Pod") or request.get("subResource"):
        return dataclasses.replace(base, decision=Decision.SKIPPED, reason="not_pod")
    meta, spec = _pod(request.get("object"))
    namespace = request.get("namespace") or meta.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise _Invalid("request.namespace is missing: a Pod is always in a namespace")
    pod = meta.get("name") or meta.get("generateName") or request.get("name") or ""
    base = dataclasses.replace(base, namespace=namespace, pod=str(pod))
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    skip = _skip_reason(namespace, settings, labels, annotations, spec)
    if skip:
        warnings = (HOST_NETWORK_WARNING,) if skip == "host_network" else ()
        return dataclasses.replace(base, decision=Decision.SKIPPED, reason=skip, warnings=warnings)
    service, problems = _service(annotations, spec)
    exclude_args, more = _exclusions(annotations, settings)
    problems = _conflicts(spec, templates) + problems + more
    if problems or service is None:
        return dataclasses.replace(base, decision=Decision.REFUSED, reason=problems[0][0], service=service,
                                   message="; ".join(text for _, text in problems))
    patch = _patch(meta, spec, *templates.fill(_values(settings, service, exclude_args)), settings.version)
    return dataclasses.replace(base, decision=Decision.INJECTED, reason="injected", service=service, patch=patch)


def _pod(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Pod's metadata and spec, after checking that every part the webhook reads has the right shape."""
    if not isinstance(obj, dict) or obj.get("kind", "Pod") != "Pod" or obj.get("apiVersion", "v1") != "v1":
        raise _Invalid("request.object is not a v1 Pod")
    meta, spec = obj.get("metadata"), obj.get("spec")
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise _Invalid("request.object has no metadata or spec object")
    for key in ("labels", "annotations"):
        values = meta.get(key) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise _Invalid(f"request.object.metadata.{key} is not a map of strings")
    if not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise _Invalid("request.object.spec.containers is missing or empty")
    for key in (*_CONTAINER_LISTS, "volumes"):
        items = spec.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                  for i in items):
            raise _Invalid(f"request.object.spec.{key} is not a list of objects with names")
    for c in [spec, *_containers(spec)]:
        if not isinstance(c.get("securityContext") or {}, dict):
            where = f" container {c['name']}" if "name" in c else ""
            raise _Invalid(f"request.object.spec{where}: securityContext is not an object")
    return meta, spec


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for key in _CONTAINER_LISTS for c in spec.get(key) or []]


def _skip_reason(namespace: str, settings: Settings, labels: dict[str, str], annotations: dict[str, str],
                 spec: dict[str, Any]) -> str | None:
    if namespace in kube.SKIPPED_NAMESPACES or namespace == settings.namespace:
        return "skipped_namespace"
    if labels.get(kube.INJECT_LABEL) == kube.INJECT_DISABLED:
        return "opted_out"
    names = {c["name"] for c in _containers(spec)}
    if kube.INJECTED_ANNOTATION in annotations or names & {kube.INIT_CONTAINER, kube.SIDECAR_CONTAINER}:
        return "already_injected"
    return "host_network" if spec.get("hostNetwork") is True else None


def _service(annotations: dict[str, str], spec: dict[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """The pod's service: its annotation, else its service account's name; a problem if no allowlist can have it."""
    if kube.SERVICE_ANNOTATION in annotations:
        where, value = f"annotation {kube.SERVICE_ANNOTATION}", annotations[kube.SERVICE_ANNOTATION]
    else:
        where, value = "service account name", spec.get("serviceAccountName") or "default"
    if isinstance(value, str) and SERVICE_NAME.match(value):
        return value, []
    return None, [("bad_service", f'{where} {value!r} is not an allowlist service name (lower-case letters, digits '
                   f'and "-", starting and ending with a letter or digit, at most 63 characters): set the pod\'s '
                   f'{kube.SERVICE_ANNOTATION} annotation to the service of its allowlist file, <service>.yaml')]


def _exclusions(annotations: dict[str, str], settings: Settings) -> tuple[list[str], list[tuple[str, str]]]:
    """The init step's --exclude-cidr/--exclude-port arguments: the webhook's, then the pod's annotations'."""
    problems: list[tuple[str, str]] = []
    cidrs, ports = list(settings.exclude_cidrs), list(settings.exclude_ports)
    for text in filter(None, map(str.strip, annotations.get(kube.EXCLUDE_CIDRS_ANNOTATION, "").split(","))):
        try:
            network = parse_cidr(text)
        except ValueError as exc:
            problems.append(("bad_exclude_cidrs", f"annotation {kube.EXCLUDE_CIDRS_ANNOTATION}: {exc} (a comma "
                             "list of CIDRs, e.g. 10.40.0.0/16,192.0.2.10)"))
            continue
        if network.prefixlen == 0:
            problems.append(("bad_exclude_cidrs", f"annotation {kube.EXCLUDE_CIDRS_ANNOTATION}: {network} would "
                             "leave every destination unfiltered; name only the ranges the pod needs unfiltered"))
        cidrs.append(network)
    for text in filter(None, map(str.strip, annotations.get(kube.EXCLUDE_PORTS_ANNOTATION, "").split(","))):
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
            problems.append(("bad_exclude_ports", f"annotation {kube.EXCLUDE_PORTS_ANNOTATION}: {text!r} is not a "
                             "port; write a comma list of ports 1-65535, e.g. 5432,6379"))
        else:
            ports.append(int(text))
    args = [a for n in dict.fromkeys(cidrs) for a in ("--exclude-cidr", str(n))]
    return args + [a for p in dict.fromkeys(ports) for a in ("--exclude-port", str(p))], problems


def _conflicts(spec: dict[str, Any], templates: Templates) -> list[tuple[str, str]]:
    """What the injection would collide with, or what would let the pod's traffic bypass the sidecar."""
    problems = []
    users = [f"container {c['name']}" if "name" in c else "the pod's securityContext"
             for c in [spec, *_containers(spec)] if (c.get("securityContext") or {}).get("runAsUser") == kube.PROXY_UID]
    if users:
        problems.append(("runs_as_proxy_uid", f"{', '.join(users)} sets runAsUser {kube.PROXY_UID}, the sidecar's "
                         "UID, whose traffic the pod's rules leave unfiltered: run the app as another UID"))
    clash = sorted({v["name"] for v in spec.get("volumes") or []} & templates.volume_names)
    if clash:
        problems.append(("volume_conflict", f"volume {clash[0]} is one egressd adds to the pod: rename the pod's "
                         "volume"))
    return problems


def _patch(meta: dict[str, Any], spec: dict[str, Any], init: dict[str, Any], sidecar: dict[str, Any],
           volumes: list[dict[str, Any]], version: str) -> tuple[dict[str, Any], ...]:
    """RFC 6902 ``add`` operations: the two init containers first, the volumes, the annotation and the label."""
    ops: list[dict[str, Any]] = []
    if spec.get("initContainers"):
        ops += [_add("/spec/initContainers/0", init), _add("/spec/initContainers/1", sidecar)]
    else:
        ops.append(_add("/spec/initContainers", [init, sidecar]))
    if spec.get("volumes"):
        ops += [_add("/spec/volumes/-", v) for v in volumes]
    else:
        ops.append(_add("/spec/volumes", volumes))
    marks = {"annotations": (kube.INJECTED_ANNOTATION, version), "labels": (kube.SIDECAR_LABEL, "true")}
    for key, (name, value) in marks.items():
        if isinstance(meta.get(key), dict):
            ops.append(_add(f"/metadata/{key}/{name.replace('~', '~0').replace('/', '~1')}", value))
        else:
            ops.append(_add(f"/metadata/{key}", {name: value}))
    return tuple(ops)


def _add(path: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": path, "value": value}
