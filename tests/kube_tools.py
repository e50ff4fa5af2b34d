"""Kubernetes manifests for tests: build with ``kubectl kustomize``, validate with kubernetes-validate, read pod specs.

:func:`build` runs the real kustomize (``kubectl kustomize``) on a directory and
returns its objects. :func:`schema_problem` checks one object against the
Kubernetes OpenAPI schemas of the newest release kubernetes-validate ships
(strict: unknown fields are errors); kinds it has no schema for (CRDs) are
checked by :func:`crd_problems` against a table of required fields of our own.
:func:`pod_spec` finds the pod spec of any workload kind.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
KUBECTL = shutil.which("kubectl")

Obj = dict[str, Any]


class BuildError(Exception):
    """``kubectl kustomize`` failed; the message is its stderr."""


def build(path: Path, *extra: str, timeout: float = 60) -> list[Obj]:
    """The objects ``kubectl kustomize PATH`` prints, in its order (``extra``: more kubectl flags)."""
    if KUBECTL is None:
        raise BuildError("kubectl is not installed (install.sh installs it)")
    done = subprocess.run(
        [KUBECTL, "kustomize", *extra, str(path)], capture_output=True, text=True, timeout=timeout, check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"kubectl kustomize {path} failed ({done.returncode}): {done.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def kustomizations(root: Path = K8S) -> list[Path]:
    """Every directory under ``root`` whose kustomization builds on its own (kind Kustomization, not Component)."""
    out = []
    for file in sorted(root.rglob("kustomization.yaml")):
        doc = yaml.safe_load(file.read_text()) or {}
        if doc.get("kind", "Kustomization") == "Kustomization":
            out.append(file.parent)
    return out


def ref(obj: Obj) -> str:
    """``Kind namespace/name`` (``Kind name`` when cluster-scoped), for messages and test ids."""
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    """The one object of this kind and name; fails the test when there is not exactly one."""
    found = [o for o in objs if o.get("kind") == kind and o["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o.get("kind") == kind]


# --- pod specs -----------------------------------------------------------------------------------------

# where each workload kind keeps its pod template
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def _dig(obj: Obj, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def pod_spec(obj: Obj) -> Obj | None:
    """The PodSpec of a workload of any kind (Pod, Deployment, CronJob, ...); None for other kinds."""
    path = POD_SPEC_PATHS.get(obj.get("kind", ""))
    return _dig(obj, path) if path else None


def pod_labels(obj: Obj) -> dict[str, str]:
    """The labels the workload's pods get (a Pod's own, or its template's)."""
    path = POD_SPEC_PATHS.get(obj.get("kind", ""))
    if not path:
        return {}
    meta_path = ("metadata",) if path == ("spec",) else (*path[:-1], "metadata")
    return dict((_dig(obj, meta_path) or {}).get("labels") or {})


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if pod_spec(o) is not None]


def containers(spec: Obj) -> Iterator[Obj]:
    """Every container of a pod spec: init, regular and ephemeral."""
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(kind) or []


def argv(container: Obj) -> list[str]:
    """The container's command line: ``command`` + ``args`` (the image's entrypoint, ``egressd``, when no command)."""
    return [*(container.get("command") or ["egressd"]), *(container.get("args") or [])]


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) selects these labels."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# --- schemas -------------------------------------------------------------------------------------------


def schema_version() -> str:
    """The newest Kubernetes release whose schemas kubernetes-validate ships (from its schema directory)."""
    root = resources.files(kubernetes_validate).joinpath("kubernetes-json-schema")
    found = []
    for entry in root.iterdir():
        match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", entry.name)
        if match:
            found.append(tuple(int(part) for part in match.groups()))
    assert found, f"no strict schemas in {root}"
    return ".".join(str(part) for part in max(found))


def schema_problem(obj: Obj, version: str) -> str | None:
    """Why ``obj`` does not validate against the strict OpenAPI schema of ``version``; None when it does.

    Raises :class:`kubernetes_validate.SchemaNotFoundError` for kinds the schemas do not know (CRDs).
    """
    try:
        kv_utils.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return f"{ref(obj)}: {path}: {exc.message}"
    return None


# The custom resources egressd's manifests use, with the fields their CRDs require (and that the operator
# needs to act on them): (apiVersion, kind) -> field paths. "x[].y" means y in every item of the list x;
# "x.a|b" means x.a or x.b (in each item, under a list).
CRD_REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {
    ("cert-manager.io/v1", "Certificate"): ("spec.secretName", "spec.issuerRef.name", "spec.dnsNames|commonName"),
    ("cert-manager.io/v1", "Issuer"): ("spec.selfSigned|ca|acme|vault|venafi",),
    ("cert-manager.io/v1", "ClusterIssuer"): ("spec.selfSigned|ca|acme|vault|venafi",),
    ("monitoring.coreos.com/v1", "PodMonitor"): (
        "spec.selector", "spec.podMetricsEndpoints", "spec.podMetricsEndpoints[].port|portNumber|targetPort",
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "spec.selector", "spec.endpoints", "spec.endpoints[].port|targetPort",
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        "spec.groups", "spec.groups[].name", "spec.groups[].rules", "spec.groups[].rules[].expr",
        "spec.groups[].rules[].alert|record",
    ),
}

# fields whose mere presence, even empty, is the setting (an Issuer's `selfSigned: {}`, a selector's `{}`)
_EMPTY_OK = frozenset({"selfSigned", "selector"})


def _filled(value: Any, key: str) -> bool:
    return value not in (None, "", [], {}) or (value == {} and key in _EMPTY_OK)


def _present(obj: Any, path: list[str]) -> bool:
    """Whether the field at ``path`` is set (not missing or empty) in ``obj``: in every item of a ``[]`` list,
    and one of the ``|`` alternatives of the last key."""
    key, rest = path[0], path[1:]
    if not rest:
        return isinstance(obj, dict) and any(k in obj and _filled(obj[k], k) for k in key.split("|"))
    many = key.endswith("[]")
    key = key.removesuffix("[]")
    if not isinstance(obj, dict) or key not in obj:
        return False
    value = obj[key]
    if many:
        return isinstance(value, list) and bool(value) and all(_present(item, rest) for item in value)
    return _present(value, rest)


def crd_problems(obj: Obj) -> list[str]:
    """The required fields ``obj`` lacks, by :data:`CRD_REQUIRED`; a kind missing from the table is a problem.

    A list that is missing is reported once, not again for the fields of its items."""
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    required = CRD_REQUIRED.get(key)
    if required is None:
        return [f"{ref(obj)}: no schema and no entry in CRD_REQUIRED for {key[0]} {key[1]}: add its required fields"]
    problems: list[str] = []
    missing: list[str] = []
    for field in ("metadata.name", *required):
        if _present(obj, field.split(".")):
            continue
        if not any(field.startswith(m.removesuffix("[]") + "[]") for m in missing):
            problems.append(f"{ref(obj)}: {field} is missing")
        missing.append(field)
    return problems


def validation_problems(objs: list[Obj], version: str) -> list[str]:
    """Every problem of every object: strict schema for built-in kinds, :data:`CRD_REQUIRED` for the others."""
    problems: list[str] = []
    for obj in objs:
        try:
            problem = schema_problem(obj, version)
        except kubernetes_validate.SchemaNotFoundError:
            problems += crd_problems(obj)
            continue
        if problem:
            problems.append(problem)
    return problems
