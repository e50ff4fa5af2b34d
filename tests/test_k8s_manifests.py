"""The Kubernetes install under k8s/: built with the real kustomize, checked against the real schemas and egressd.kube.

Every directory under k8s/ whose kustomization builds on its own is built once per module
(``kubectl kustomize``). Every object validates against the strict OpenAPI schemas of the newest Kubernetes
release kubernetes-validate ships; custom resources (cert-manager, Prometheus operator) are checked for
their required fields by :data:`kube_tools.CRD_REQUIRED`. The two installs, ``k8s/overlays/sidecar`` and
``k8s/overlays/gateway``, are then read back field by field: the names agree with :mod:`egressd.kube`,
every pod meets the restricted Pod Security Standard, RBAC grants exactly the rules listed here, and
Services, PodDisruptionBudgets, the autoscaler and the webhook point at what exists.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

import pss
from egressd import kube
from egressd.cli import build_parser
from egressd.cli.run import config_from
from kube_tools import (
    K8S,
    REPO,
    BuildError,
    Obj,
    argv,
    build,
    containers,
    crd_problems,
    find,
    flag,
    kustomizations,
    of_kind,
    pod_labels,
    pod_spec,
    ref,
    schema_version,
    selects,
    validation_problems,
    workloads,
)

SIDECAR, GATEWAY = "k8s/overlays/sidecar", "k8s/overlays/gateway"
INSTALLS = (SIDECAR, GATEWAY)
DIRS = [str(path.relative_to(REPO)) for path in kustomizations()]
IMAGE = f"ghcr.io/egressd/egressd:{kube.VERSION}"
PART_OF = {"app.kubernetes.io/part-of": "egressd"}
INJECTOR_LABELS = {"app.kubernetes.io/name": "egressd-injector", "app.kubernetes.io/component": "injector"}
GATEWAY_LABELS = {"app.kubernetes.io/name": "egressd-gateway", "app.kubernetes.io/component": "gateway"}
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CLUSTER_SCOPED = frozenset({
    "Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration", "CustomResourceDefinition", "ClusterIssuer", "PriorityClass",
})


@pytest.fixture(scope="module")
def builds() -> dict[str, list[Obj] | BuildError]:
    """Every buildable directory under k8s/, built once: its objects, or the error kustomize gave."""
    out: dict[str, list[Obj] | BuildError] = {}
    for name in DIRS:
        try:
            out[name] = build(REPO / name)
        except BuildError as exc:
            out[name] = exc
    return out


def objects(builds: dict[str, list[Obj] | BuildError], name: str) -> list[Obj]:
    built = builds[name]
    if isinstance(built, BuildError):
        pytest.fail(str(built))
    return built


@pytest.fixture(scope="module")
def sidecar(builds: dict[str, list[Obj] | BuildError]) -> list[Obj]:
    return objects(builds, SIDECAR)


@pytest.fixture(scope="module")
def gateway(builds: dict[str, list[Obj] | BuildError]) -> list[Obj]:
    return objects(builds, GATEWAY)


def spec_of(obj: Obj) -> Obj:
    """The pod spec of a workload (fails the test for other kinds)."""
    spec = pod_spec(obj)
    assert spec is not None, f"{ref(obj)} has no pod spec"
    return spec


def install(request: pytest.FixtureRequest, name: str) -> list[Obj]:
    return request.getfixturevalue({SIDECAR: "sidecar", GATEWAY: "gateway"}[name])


def container(objs: list[Obj], deployment: str, name: str) -> Obj:
    spec = spec_of(find(objs, "Deployment", deployment))
    return next(c for c in containers(spec) if c["name"] == name)


def env(c: Obj) -> dict[str, Any]:
    """A container's env as name -> value (or the valueFrom mapping)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def is_egressd(c: Obj) -> bool:
    """Whether the container runs the egressd image (whatever registry, tag or digest)."""
    name = re.split(r"[@:]", c["image"].rsplit("/", 1)[-1])[0]
    return name == "egressd"


# --- every directory: builds, validates ---------------------------------------------------------------


def test_the_installs_are_among_the_built_directories() -> None:
    """Both installs and every workload directory are discovered as buildable kustomizations."""
    expected = {SIDECAR, GATEWAY, "k8s/base", "k8s/injector", "k8s/gateway", "k8s/networkpolicy/gateway",
                "k8s/networkpolicy/namespace"}
    assert expected <= set(DIRS)


@pytest.mark.parametrize("name", DIRS)
def test_kustomize_builds(builds: dict[str, list[Obj] | BuildError], name: str) -> None:
    """kubectl kustomize builds the directory into at least one object."""
    assert objects(builds, name)


@pytest.mark.parametrize("name", DIRS)
def test_objects_validate(builds: dict[str, list[Obj] | BuildError], name: str) -> None:
    """Every object validates strictly against the newest schemas; custom resources have their required fields."""
    assert validation_problems(objects(builds, name), schema_version()) == []


def test_schema_version_is_current() -> None:
    """The schemas the manifests are checked against are those of a current Kubernetes release (1.33 or later)."""
    major, minor, _ = (int(part) for part in schema_version().split("."))
    assert (major, minor) >= (1, 33)


CERT = {
    "apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "c"},
    "spec": {"secretName": "s", "issuerRef": {"name": "i"}, "dnsNames": ["a.svc"]},
}
RULE = {
    "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "r"},
    "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0"}]}]},
}


def without(obj: Obj, path: str) -> Obj:
    """A copy of ``obj`` with the field at the dotted ``path`` (list indexes as numbers) removed."""
    copy = yaml.safe_load(yaml.safe_dump(obj))
    *parents, last = path.split(".")
    node: Any = copy
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[last]
    return copy


@pytest.mark.parametrize(("obj", "missing"), [
    pytest.param(CERT, None, id="certificate-complete"),
    pytest.param(without(CERT, "spec.secretName"), "spec.secretName", id="certificate-without-secret"),
    pytest.param(without(CERT, "spec.dnsNames"), "spec.dnsNames|commonName", id="certificate-without-names"),
    pytest.param({"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "i"},
                  "spec": {"selfSigned": {}}}, None, id="issuer-self-signed"),
    pytest.param({"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "i"}, "spec": {}},
                 "spec.selfSigned|ca|acme|vault|venafi", id="issuer-of-no-kind"),
    pytest.param({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "p"},
                  "spec": {"selector": {}, "podMetricsEndpoints": [{"path": "/metrics"}]}},
                 "spec.podMetricsEndpoints[].port|portNumber|targetPort", id="podmonitor-without-port"),
    pytest.param({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "s"},
                  "spec": {"selector": {}}}, "spec.endpoints", id="servicemonitor-without-endpoints"),
    pytest.param(RULE, None, id="prometheusrule-complete"),
    pytest.param({**RULE, "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0"},
                                                                     {"record": "r:up", "expr": "up"}]}]}},
                 None, id="prometheusrule-alert-and-record"),
    pytest.param({**RULE, "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0"},
                                                                     {"expr": "up"}]}]}},
                 "spec.groups[].rules[].alert|record", id="prometheusrule-rule-of-no-kind"),
    pytest.param(without(RULE, "spec.groups.0.rules.0.expr"), "spec.groups[].rules[].expr",
                 id="prometheusrule-without-expr"),
])
def test_crd_required_fields(obj: Obj, missing: str | None) -> None:
    """A custom resource without a field its CRD requires, or of a kind not in the table, is reported."""
    problems = crd_problems(obj)
    if missing is None:
        assert problems == []
    else:
        assert problems == [f"{ref(obj)}: {missing} is missing"]


def test_unknown_custom_resource_is_a_problem() -> None:
    """A kind with no schema and no CRD_REQUIRED entry fails, so a new custom resource gets its checks."""
    (problem,) = crd_problems({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert "no entry in CRD_REQUIRED for example.com/v1 Widget" in problem


# --- every pod: the restricted profile -------------------------------------------------------------------


def hardening_problems(spec: Obj) -> list[str]:
    """What the restricted profile leaves open and egressd's pods close all the same."""
    out = []
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        out.append("a host namespace is shared")
    if (spec.get("securityContext") or {}).get("runAsNonRoot") is not True:
        out.append("pod runAsNonRoot is not true")
    for c in containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{c['name']}: readOnlyRootFilesystem is not true")
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
            out.append(f"{c['name']}: capabilities are not exactly drop [ALL]")
    return out


@pytest.mark.parametrize("name", DIRS)
def test_pods_meet_restricted_profile(builds: dict[str, list[Obj] | BuildError], name: str) -> None:
    """Every pod template meets the restricted Pod Security Standard with no exemption, on a read-only root."""
    problems = []
    for obj in workloads(objects(builds, name)):
        spec = spec_of(obj)
        problems += [f"{ref(obj)}: {p}" for p in pss.violations(spec) + hardening_problems(spec)]
    assert problems == []


@pytest.mark.parametrize("name", DIRS)
def test_only_egressd_runs_as_the_proxy_uid(builds: dict[str, list[Obj] | BuildError], name: str) -> None:
    """No other container runs as the proxy's UID, whose traffic the sidecar's rules leave unfiltered."""
    for obj in workloads(objects(builds, name)):
        spec = spec_of(obj)
        pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
        for c in containers(spec):
            uid = (c.get("securityContext") or {}).get("runAsUser", pod_uid)
            assert is_egressd(c) or uid != kube.PROXY_UID, f"{ref(obj)} {c['name']} runs as {uid}"


@pytest.mark.parametrize("name", INSTALLS)
def test_egressd_pods_settings(request: pytest.FixtureRequest, name: str) -> None:
    """egressd's pods run as 1337 with RuntimeDefault seccomp, a /tmp emptyDir, requests and limits everywhere."""
    found = workloads(install(request, name))
    assert found
    for obj in found:
        spec = spec_of(obj)
        assert spec["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": kube.PROXY_UID, "runAsGroup": kube.PROXY_UID,
            "fsGroup": kube.PROXY_UID, "seccompProfile": {"type": "RuntimeDefault"},
        }, ref(obj)
        empty_dirs = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
        for c in containers(spec):
            assert is_egressd(c), f"{ref(obj)} {c['name']}: {c['image']}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in empty_dirs, f"{ref(obj)} {c['name']}: no /tmp emptyDir"
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, f"{ref(obj)} {c['name']} {kind}"


# --- the installs: complete, labelled, named as egressd.kube says ----------------------------------------

EXPECTED_OBJECTS = {
    SIDECAR: {
        ("Namespace", kube.NAMESPACE), ("ConfigMap", kube.ALLOWLISTS_CONFIGMAP),
        ("ServiceAccount", "egressd-injector"), ("ClusterRole", "egressd-allowlist-sync"),
        ("ClusterRoleBinding", "egressd-allowlist-sync"), ("Deployment", "egressd-injector"),
        ("PodDisruptionBudget", "egressd-injector"), ("Service", "egressd-injector"),
        ("Issuer", "egressd-selfsigned"), ("Certificate", "egressd-injector-ca"), ("Issuer", "egressd-injector-ca"),
        ("Certificate", "egressd-injector"), ("MutatingWebhookConfiguration", "egressd-sidecar-injector"),
    },
    GATEWAY: {
        ("Namespace", kube.NAMESPACE), ("ConfigMap", kube.ALLOWLISTS_CONFIGMAP),
        ("ServiceAccount", "egressd-gateway"), ("ClusterRole", "egressd-gateway-pods"),
        ("ClusterRoleBinding", "egressd-gateway-pods"), ("ClusterRoleBinding", "egressd-gateway-issuer-discovery"),
        ("Deployment", "egressd-gateway"), ("PodDisruptionBudget", "egressd-gateway"),
        ("HorizontalPodAutoscaler", "egressd-gateway"), ("Service", "egressd-gateway"),
        ("NetworkPolicy", "egressd-gateway"),
    },
}


@pytest.mark.parametrize("name", INSTALLS)
def test_install_is_complete(request: pytest.FixtureRequest, name: str) -> None:
    """Each overlay builds a whole install: namespace, allowlists, its workloads and all they need."""
    objs = install(request, name)
    assert EXPECTED_OBJECTS[name] <= {(o["kind"], o["metadata"]["name"]) for o in objs}


@pytest.mark.parametrize("name", INSTALLS)
def test_objects_labelled_and_namespaced(request: pytest.FixtureRequest, name: str) -> None:
    """Every object is part-of egressd, and every namespaced one lives in egressd's namespace."""
    for obj in install(request, name):
        meta = obj["metadata"]
        assert PART_OF.items() <= (meta.get("labels") or {}).items(), ref(obj)
        expected_ns = None if obj["kind"] in CLUSTER_SCOPED else kube.NAMESPACE
        assert meta.get("namespace") == expected_ns, ref(obj)


@pytest.mark.parametrize(("name", "deployment", "labels"), [
    pytest.param(SIDECAR, "egressd-injector", INJECTOR_LABELS, id="injector"),
    pytest.param(GATEWAY, "egressd-gateway", GATEWAY_LABELS, id="gateway"),
])
def test_workload_labels(request: pytest.FixtureRequest, name: str, deployment: str, labels: dict) -> None:
    """Each workload, its pods and its selector carry its name and component labels."""
    obj = find(install(request, name), "Deployment", deployment)
    assert labels.items() <= obj["metadata"]["labels"].items()
    assert (labels | PART_OF).items() <= pod_labels(obj).items()
    assert obj["spec"]["selector"] == {"matchLabels": labels}


def webhook(objs: list[Obj]) -> Obj:
    (hook,) = find(objs, "MutatingWebhookConfiguration", "egressd-sidecar-injector")["webhooks"]
    return hook


def port(c: Obj, port_name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port_name)


AGREE: list[Any] = [
    pytest.param(SIDECAR, lambda o: find(o, "Namespace", kube.NAMESPACE)["metadata"]["name"], kube.NAMESPACE,
                 id="namespace"),
    pytest.param(SIDECAR, lambda o: find(o, "ConfigMap", kube.ALLOWLISTS_CONFIGMAP)["metadata"]["namespace"],
                 kube.NAMESPACE, id="configmap-namespace"),
    pytest.param(SIDECAR, lambda o: webhook(o)["namespaceSelector"]["matchLabels"],
                 {kube.INJECT_LABEL: kube.INJECT_ENABLED}, id="webhook-namespace-label"),
    pytest.param(SIDECAR, lambda o: webhook(o)["namespaceSelector"]["matchExpressions"],
                 [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                   "values": sorted(kube.SKIPPED_NAMESPACES)}], id="webhook-skipped-namespaces"),
    pytest.param(SIDECAR, lambda o: webhook(o)["objectSelector"],
                 {"matchExpressions": [{"key": kube.INJECT_LABEL, "operator": "NotIn",
                                        "values": [kube.INJECT_DISABLED]}]}, id="webhook-pod-opt-out"),
    pytest.param(SIDECAR, lambda o: port(container(o, "egressd-injector", "webhook"), "webhook"), kube.WEBHOOK_PORT,
                 id="webhook-port"),
    pytest.param(SIDECAR, lambda o: flag(argv(container(o, "egressd-injector", "webhook")), "--listen"),
                 f":{kube.WEBHOOK_PORT}", id="webhook-listen"),
    pytest.param(SIDECAR, lambda o: flag(argv(container(o, "egressd-injector", "sync")), "--namespace"),
                 kube.NAMESPACE, id="sync-namespace"),
    pytest.param(SIDECAR, lambda o: flag(argv(container(o, "egressd-injector", "sync")), "--configmap"),
                 kube.ALLOWLISTS_CONFIGMAP, id="sync-configmap"),
    pytest.param(GATEWAY, lambda o: port(container(o, "egressd-gateway", "egressd"), kube.ADMIN_PORT_NAME),
                 kube.ADMIN_PORT, id="gateway-admin-port"),
    pytest.param(GATEWAY, lambda o: flag(argv(container(o, "egressd-gateway", "egressd")), "--admin-listen"),
                 f"0.0.0.0:{kube.ADMIN_PORT}", id="gateway-admin-listen"),
    pytest.param(GATEWAY, lambda o: port(container(o, "egressd-gateway", "egressd"), "proxy"), kube.GATEWAY_PORT,
                 id="gateway-proxy-port"),
    pytest.param(GATEWAY, lambda o: flag(argv(container(o, "egressd-gateway", "egressd")), "--listen"),
                 f"0.0.0.0:{kube.GATEWAY_PORT}", id="gateway-listen"),
    pytest.param(GATEWAY, lambda o: [p["port"] for p in find(o, "Service", "egressd-gateway")["spec"]["ports"]],
                 [kube.GATEWAY_PORT], id="gateway-service-port"),
    pytest.param(GATEWAY, lambda o: flag(argv(container(o, "egressd-gateway", "egressd")), "--allowlists"),
                 kube.ALLOWLISTS_MOUNT, id="gateway-allowlists-flag"),
    pytest.param(GATEWAY, lambda o: {(m["name"], m["mountPath"]) for m in
                                     container(o, "egressd-gateway", "egressd")["volumeMounts"]
                                     if m["name"] == "allowlists"},
                 {("allowlists", kube.ALLOWLISTS_MOUNT)}, id="gateway-allowlists-mount"),
    pytest.param(GATEWAY, lambda o: next(v["configMap"]["name"] for v in
                                         spec_of(find(o, "Deployment", "egressd-gateway"))["volumes"]
                                         if v["name"] == "allowlists"),
                 kube.ALLOWLISTS_CONFIGMAP, id="gateway-allowlists-configmap"),
]


@pytest.mark.parametrize(("name", "read", "expected"), AGREE)
def test_names_agree_with_egressd_kube(request: pytest.FixtureRequest, name: str, read: Callable,
                                      expected: Any) -> None:
    """The manifests spell the names, labels and ports of egressd.kube."""
    assert read(install(request, name)) == expected


def test_namespace_enforces_restricted(sidecar: list[Obj]) -> None:
    """egressd's namespace enforces, audits and warns on the restricted Pod Security Standard."""
    labels = find(sidecar, "Namespace", kube.NAMESPACE)["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


# --- the allowlist ConfigMap -----------------------------------------------------------------------------

ALLOWLISTS = REPO / "allowlists"


def allowlist_files() -> list[Path]:
    return sorted(p for p in ALLOWLISTS.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("name", INSTALLS)
def test_allowlists_configmap_is_the_directory(request: pytest.FixtureRequest, name: str) -> None:
    """The ConfigMap has its fixed name (no hash suffix) and holds the allowlist files byte for byte."""
    found = [o for o in install(request, name)
             if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(kube.ALLOWLISTS_CONFIGMAP)]
    assert [o["metadata"]["name"] for o in found] == [kube.ALLOWLISTS_CONFIGMAP]
    cm = found[0]
    assert "binaryData" not in cm
    assert {k: v.encode() for k, v in cm["data"].items()} == {p.name: p.read_bytes() for p in allowlist_files()}


def test_generator_lists_every_allowlist_file() -> None:
    """Every allowlists/*.yaml is listed in the ConfigMap generator, and nothing else is."""
    doc = yaml.safe_load((ALLOWLISTS / "kustomization.yaml").read_text())
    (gen,) = doc["configMapGenerator"]
    assert gen["name"] == kube.ALLOWLISTS_CONFIGMAP and gen["namespace"] == kube.NAMESPACE
    assert doc["generatorOptions"]["disableNameSuffixHash"] is True
    assert sorted(gen["files"]) == [p.name for p in allowlist_files()]


def test_allowlists_still_validate() -> None:
    """egressd validate accepts allowlists/ with the generator's kustomization.yaml in it."""
    done = subprocess.run([sys.executable, "-m", "egressd", "validate", str(ALLOWLISTS)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the injector ----------------------------------------------------------------------------------------

WEBHOOK_FIELDS = [
    pytest.param("name", "sidecar.egressd.io", id="name"),
    pytest.param("clientConfig", {"service": {"name": "egressd-injector", "namespace": kube.NAMESPACE,
                                              "path": "/inject", "port": 443}}, id="client-config"),
    pytest.param("rules", [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                            "resources": ["pods"], "scope": "Namespaced"}], id="rules"),
    pytest.param("failurePolicy", "Fail", id="fails-closed"),
    pytest.param("sideEffects", "None", id="side-effects"),
    pytest.param("reinvocationPolicy", "IfNeeded", id="reinvocation"),
    pytest.param("timeoutSeconds", 10, id="timeout"),
    pytest.param("admissionReviewVersions", ["v1"], id="review-versions"),
    pytest.param("matchPolicy", "Equivalent", id="match-policy"),
]


@pytest.mark.parametrize(("field", "expected"), WEBHOOK_FIELDS)
def test_webhook_configuration(sidecar: list[Obj], field: str, expected: Any) -> None:
    """The webhook is called for new pods only, fails closed, and has no side effects."""
    assert webhook(sidecar)[field] == expected


def test_webhook_certificate_chain(sidecar: list[Obj]) -> None:
    """cert-manager's certificate covers the Service's names, fills the mounted Secret and the caBundle."""
    cert = find(sidecar, "Certificate", "egressd-injector")
    annotations = find(sidecar, "MutatingWebhookConfiguration", "egressd-sidecar-injector")["metadata"]["annotations"]
    assert annotations["cert-manager.io/inject-ca-from"] == f"{kube.NAMESPACE}/egressd-injector"
    service = webhook(sidecar)["clientConfig"]["service"]
    names = f"{service['name']}.{service['namespace']}.svc"
    assert cert["spec"]["dnsNames"] == [names, f"{names}.cluster.local"]
    spec = spec_of(find(sidecar, "Deployment", "egressd-injector"))
    (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == cert["spec"]["secretName"] == "egressd-injector-tls"
    hook = container(sidecar, "egressd-injector", "webhook")
    (mount,) = [m for m in hook["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    args = argv(hook)
    tls_dir = mount["mountPath"]
    assert (flag(args, "--cert"), flag(args, "--key")) == (f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key")
    issuer = find(sidecar, "Issuer", cert["spec"]["issuerRef"]["name"])
    ca = find(sidecar, "Certificate", "egressd-injector-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"] and ca["spec"]["isCA"] is True
    assert find(sidecar, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"] == {"selfSigned": {}}
    for c in (cert, ca):
        assert {"duration", "renewBefore"} <= set(c["spec"]), ref(c)


def test_injector_deployment(sidecar: list[Obj]) -> None:
    """Two replicas, preferably on two nodes; the webhook and the sync have their command lines, env and probes."""
    obj = find(sidecar, "Deployment", "egressd-injector")
    spec = spec_of(obj)
    assert obj["spec"]["replicas"] == 2
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["podAffinityTerm"]["labelSelector"], pod_labels(obj))
    hook, sync = container(sidecar, "egressd-injector", "webhook"), container(sidecar, "egressd-injector", "sync")
    assert argv(hook) == ["egressd", "inject-webhook", "--listen", ":8443", "--cert", "/etc/egressd/tls/tls.crt",
                          "--key", "/etc/egressd/tls/tls.key"]
    assert argv(sync) == ["egressd", "allowlist-sync", "--namespace", kube.NAMESPACE, "--configmap",
                          kube.ALLOWLISTS_CONFIGMAP, "--admin-listen", "0.0.0.0:15021"]
    variables = env(hook)
    assert variables["EGRESSD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert variables["EGRESSD_IMAGE"] == hook["image"]
    for cidr in variables["EGRESSD_EXCLUDE_CIDR"].split(","):
        ipaddress.ip_network(cidr)
    for probe in ("readinessProbe", "livenessProbe"):
        assert hook[probe]["httpGet"] == {"path": "/healthz", "port": "webhook", "scheme": "HTTPS"}
    assert port(sync, "sync-admin") == 15021
    assert "readinessProbe" not in sync  # a sync waiting for its source must not make the webhook unready
    assert sync["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "sync-admin"}


def test_api_token_only_where_the_api_is_used(sidecar: list[Obj], gateway: list[Obj]) -> None:
    """No token is mounted by default; the sync container and the gateway, which call the API, get one."""
    for sa in of_kind(sidecar, "ServiceAccount") + of_kind(gateway, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False, ref(sa)
    injector = spec_of(find(sidecar, "Deployment", "egressd-injector"))
    assert injector["automountServiceAccountToken"] is False
    token_volumes = {v["name"] for v in injector["volumes"]
                     if any("serviceAccountToken" in s for s in (v.get("projected") or {}).get("sources", []))}
    mounted = {c["name"] for c in containers(injector)
               if any(m["name"] in token_volumes and m["mountPath"] == SA_DIR for m in c.get("volumeMounts") or [])}
    assert mounted == {"sync"}
    gateway_spec = spec_of(find(gateway, "Deployment", "egressd-gateway"))
    assert gateway_spec["automountServiceAccountToken"] is True


# --- RBAC: exactly these rules ---------------------------------------------------------------------------

ROLE_RULES = {
    "egressd-allowlist-sync": [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch", "create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [kube.ALLOWLISTS_CONFIGMAP],
         "verbs": ["update", "delete"]},
    ],
    "egressd-gateway-pods": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    ],
}
BINDINGS = {  # binding -> (role kind, role name, service account in egressd's namespace)
    "egressd-allowlist-sync": ("ClusterRole", "egressd-allowlist-sync", "egressd-injector"),
    "egressd-gateway-pods": ("ClusterRole", "egressd-gateway-pods", "egressd-gateway"),
    "egressd-gateway-issuer-discovery": ("ClusterRole", "system:service-account-issuer-discovery", "egressd-gateway"),
}


@pytest.mark.parametrize("name", INSTALLS)
def test_rbac_is_least_privilege(request: pytest.FixtureRequest, name: str) -> None:
    """Every role grants exactly its listed rules and every binding gives one role to one workload's account."""
    objs = install(request, name)
    for role in of_kind(objs, "ClusterRole") + of_kind(objs, "Role"):
        assert role["rules"] == ROLE_RULES.get(role["metadata"]["name"]), ref(role)
    used = {spec_of(w).get("serviceAccountName") for w in workloads(objs)}
    for binding in of_kind(objs, "ClusterRoleBinding") + of_kind(objs, "RoleBinding"):
        kind, role, account = BINDINGS[binding["metadata"]["name"]]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": kube.NAMESPACE}]
        assert account in used, f"{ref(binding)}: no workload runs as {account}"


# --- the gateway -----------------------------------------------------------------------------------------


def gateway_args(gateway: list[Obj]) -> list[str]:
    return argv(container(gateway, "egressd-gateway", "egressd"))


def test_gateway_grace_exceeds_drain(gateway: list[Obj]) -> None:
    """Kubernetes waits longer than the gateway's drain timeout before it kills a terminating pod."""
    spec = spec_of(find(gateway, "Deployment", "egressd-gateway"))
    drain = flag(gateway_args(gateway), "--drain-timeout")
    assert drain is not None and spec["terminationGracePeriodSeconds"] > float(drain)


@pytest.mark.parametrize(("name", "expected"), [
    pytest.param("--identity", "token,pod-ip", id="identity"),
    pytest.param("--token-issuer", "https://kubernetes.default.svc.cluster.local", id="issuer"),
    pytest.param("--token-audience", "egressd", id="audience"),
    pytest.param("--jwks-url", "https://kubernetes.default.svc/openid/v1/jwks", id="jwks-url"),
    pytest.param("--jwks-ca", f"{SA_DIR}/ca.crt", id="jwks-ca"),
    pytest.param("--jwks-token-file", f"{SA_DIR}/token", id="jwks-token"),
])
def test_gateway_identity_settings(gateway: list[Obj], name: str, expected: str) -> None:
    """The gateway verifies tokens for the egressd audience with the API server's keys, then tries the pod IP."""
    assert flag(gateway_args(gateway), name) == expected


def test_gateway_deployment(gateway: list[Obj]) -> None:
    """Three replicas spread over zones and nodes, probes on the admin port, workers within the CPU limit."""
    obj = find(gateway, "Deployment", "egressd-gateway")
    spec = spec_of(obj)
    assert obj["spec"]["replicas"] == 3
    labels = pod_labels(obj)
    spread = {t["topologyKey"]: t for t in spec["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for t in spread.values():
        assert t["whenUnsatisfiable"] == "ScheduleAnyway" and selects(t["labelSelector"], labels)
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert selects(term["podAffinityTerm"]["labelSelector"], labels)
    c = container(gateway, "egressd-gateway", "egressd")
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {
        ("proxy", kube.GATEWAY_PORT), (kube.ADMIN_PORT_NAME, kube.ADMIN_PORT)}
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert c[probe]["httpGet"] == {"path": path, "port": kube.ADMIN_PORT_NAME}, probe
    workers = flag(argv(c), "--workers")
    assert workers is not None and int(workers) <= float(c["resources"]["limits"]["cpu"])


def test_gateway_inspection_ca_is_an_optional_secret_readable_by_egressd_alone(gateway: list[Obj]) -> None:
    """Inspect mode's CA comes from the Secret egressd-inspect-ca, mounted read-only where the flags point, its
    files readable by egressd's group and no one else (egressd refuses a CA key others may read); optional, so a
    gateway without inspect: rules starts without it (and refuses inspected names if a rule comes)."""
    spec = spec_of(find(gateway, "Deployment", "egressd-gateway"))
    c = container(gateway, "egressd-gateway", "egressd")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "inspect-ca"]
    assert volume["secret"]["secretName"] == "egressd-inspect-ca" and volume["secret"]["optional"] is True
    mode = volume["secret"]["defaultMode"]
    assert mode & 0o007 == 0 and mode & 0o040 and spec["securityContext"]["fsGroup"] == kube.PROXY_UID
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "inspect-ca"]
    assert mount["readOnly"] is True
    args = gateway_args(gateway)
    assert flag(args, "--inspect-ca-cert") == f"{mount['mountPath']}/tls.crt"
    assert flag(args, "--inspect-ca-key") == f"{mount['mountPath']}/tls.key"


def test_hpa_scales_the_gateway(gateway: list[Obj]) -> None:
    """The autoscaler scales the gateway Deployment on CPU, from its replica count up to 12."""
    hpa = find(gateway, "HorizontalPodAutoscaler", "egressd-gateway")
    deployment = find(gateway, "Deployment", "egressd-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "egressd-gateway"}
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (deployment["spec"]["replicas"], 12)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


@pytest.mark.parametrize(("name", "pdb", "deployment", "budget"), [
    pytest.param(SIDECAR, "egressd-injector", "egressd-injector", {"minAvailable": 1}, id="injector"),
    pytest.param(GATEWAY, "egressd-gateway", "egressd-gateway", {"maxUnavailable": 1}, id="gateway"),
])
def test_pdb_selects_its_pods(request: pytest.FixtureRequest, name: str, pdb: str, deployment: str,
                              budget: dict) -> None:
    """Each PodDisruptionBudget selects the pods of its Deployment, and only those."""
    objs = install(request, name)
    budget_obj = find(objs, "PodDisruptionBudget", pdb)
    selected = [ref(w) for w in workloads(objs) if selects(budget_obj["spec"]["selector"], pod_labels(w))]
    assert selected == [f"Deployment {kube.NAMESPACE}/{deployment}"]
    assert {k: v for k, v in budget_obj["spec"].items() if k != "selector"} == budget


@pytest.mark.parametrize("name", INSTALLS)
def test_services_reach_pods(request: pytest.FixtureRequest, name: str) -> None:
    """Every Service selects existing pods, and every target port is a port of those pods' containers."""
    objs = install(request, name)
    for service in of_kind(objs, "Service"):
        backends = [w for w in workloads(objs) if w["metadata"]["namespace"] == service["metadata"]["namespace"]
                    and selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))]
        assert backends, f"{ref(service)} selects no pods"
        for backend in backends:
            spec = spec_of(backend)
            ports = [p for c in containers(spec) for p in c.get("ports") or []]
            for sp in service["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                key = "name" if isinstance(target, str) else "containerPort"
                assert any(p.get(key) == target for p in ports), f"{ref(service)}: no container port {target}"


# --- NetworkPolicies -------------------------------------------------------------------------------------


def peers_and_ports(rules: list[Obj], direction: str) -> set[tuple[str, str, int]]:
    """A policy's rules as (peer, protocol, port) triples, the peer written as YAML for comparison."""
    out = set()
    for rule in rules:
        for peer in rule.get(direction) or [{}]:
            for p in rule.get("ports") or [{}]:
                out.add((yaml.safe_dump(peer, sort_keys=True).strip(), p.get("protocol", "TCP"), p.get("port")))
    return out


DNS_PEER = yaml.safe_dump({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                           "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}, sort_keys=True).strip()
DNS = {(DNS_PEER, "UDP", 53), (DNS_PEER, "TCP", 53)}
ANYWHERE = [yaml.safe_dump({"ipBlock": {"cidr": c}}).strip() for c in ("0.0.0.0/0", "::/0")]
ALL_NAMESPACES = yaml.safe_dump({"namespaceSelector": {}}).strip()


def test_gateway_networkpolicy(gateway: list[Obj]) -> None:
    """The gateway reaches the internet on 443 and 80 and the cluster DNS, and is reached on 3128 and 15020."""
    policy = find(gateway, "NetworkPolicy", "egressd-gateway")
    assert selects(policy["spec"]["podSelector"], pod_labels(find(gateway, "Deployment", "egressd-gateway")))
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert peers_and_ports(policy["spec"]["egress"], "to") == {
        (peer, "TCP", p) for peer in ANYWHERE for p in (443, 80)} | DNS
    assert peers_and_ports(policy["spec"]["ingress"], "from") == {
        (ALL_NAMESPACES, "TCP", kube.GATEWAY_PORT), (ALL_NAMESPACES, "TCP", kube.ADMIN_PORT)}


@pytest.fixture(scope="module")
def client_policies(builds: dict[str, list[Obj] | BuildError]) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects(builds, "k8s/networkpolicy/namespace")}


def test_client_namespace_default_deny(client_policies: dict[str, Obj]) -> None:
    """A client namespace's pods may send nothing but DNS to the cluster DNS and TCP 3128 to the gateway."""
    assert set(client_policies) == {"egressd-default-deny-egress", "egressd-allow-dns", "egressd-allow-gateway"}
    for policy in client_policies.values():
        assert "namespace" not in policy["metadata"], "the namespace is given when applied"
        assert policy["spec"]["podSelector"] == {} and policy["spec"]["policyTypes"] == ["Egress"]
    assert not client_policies["egressd-default-deny-egress"]["spec"].get("egress")
    assert peers_and_ports(client_policies["egressd-allow-dns"]["spec"]["egress"], "to") == DNS


def test_client_namespace_reaches_the_gateway_pods(client_policies: dict[str, Obj], gateway: list[Obj]) -> None:
    """The client namespaces' gateway rule selects the gateway's namespace and pods, on the proxy port."""
    ((rule,),) = [client_policies["egressd-allow-gateway"]["spec"]["egress"]]
    (peer,) = rule["to"]
    namespace = find(gateway, "Namespace", kube.NAMESPACE)
    ns_labels = {**namespace["metadata"].get("labels", {}), "kubernetes.io/metadata.name": kube.NAMESPACE}
    assert selects(peer["namespaceSelector"], ns_labels)
    assert selects(peer["podSelector"], pod_labels(find(gateway, "Deployment", "egressd-gateway")))
    assert rule["ports"] == [{"protocol": "TCP", "port": kube.GATEWAY_PORT}]


# --- images ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INSTALLS)
def test_overlays_set_the_image(request: pytest.FixtureRequest, name: str) -> None:
    """Each install runs the released image of this version, and the webhook injects that same image."""
    objs = install(request, name)
    images = {c["image"] for w in workloads(objs) for c in containers(spec_of(w))}
    assert images == {IMAGE}
    if name == SIDECAR:
        assert env(container(objs, "egressd-injector", "webhook"))["EGRESSD_IMAGE"] == IMAGE


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(("entry", "expected"), [
    pytest.param({"newTag": "9.9.9"}, "ghcr.io/egressd/egressd:9.9.9", id="new-tag"),
    pytest.param({"newName": "registry.example/mirror/egressd"}, f"registry.example/mirror/egressd:{kube.VERSION}",
                 id="new-registry"),
    pytest.param({"newName": "registry.example/egressd", "digest": DIGEST}, f"registry.example/egressd@{DIGEST}",
                 id="digest"),
])
def test_image_override_downstream(tmp_path: Path, entry: dict, expected: str) -> None:
    """An images: entry in a kustomization built on the sidecar overlay changes the injected image too."""
    overlay = os.path.relpath(K8S / "overlays" / "sidecar", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [overlay],
        "images": [{"name": "ghcr.io/egressd/egressd", **entry}],
    }))
    objs = build(tmp_path)
    hook = container(objs, "egressd-injector", "webhook")
    assert env(hook)["EGRESSD_IMAGE"] == expected
    assert {c["image"] for c in containers(spec_of(find(objs, "Deployment", "egressd-injector")))} == {expected}


def test_manual_certificate_overlay_from_readme(tmp_path: Path) -> None:
    """The README's overlay without cert-manager builds, drops every cert-manager object and sets the caBundle."""
    readme = (K8S / "injector" / "README.md").read_text()
    match = re.search(r"```yaml\n(\s*# my-egressd/kustomization\.yaml\n.*?)```", readme, re.DOTALL)
    assert match, "k8s/injector/README.md has no my-egressd/kustomization.yaml block"
    ca_pem = trustme.CA().cert_pem.bytes()
    bundle = base64.b64encode(ca_pem).decode()
    doc = yaml.safe_load(textwrap.dedent(match.group(1)).replace("LS0tLS1CRUdJTi...", bundle))
    assert doc["resources"] == ["../egressd/k8s/overlays/sidecar"]
    doc["resources"] = [os.path.relpath(K8S / "overlays" / "sidecar", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    objs = build(tmp_path)
    assert [ref(o) for o in objs if o["apiVersion"].startswith("cert-manager.io/")] == []
    hook_config = find(objs, "MutatingWebhookConfiguration", "egressd-sidecar-injector")
    assert "cert-manager.io/inject-ca-from" not in (hook_config["metadata"].get("annotations") or {})
    assert base64.b64decode(webhook(objs)["clientConfig"]["caBundle"]) == ca_pem
    assert validation_problems(objs, schema_version()) == []


# --- the command lines parse -----------------------------------------------------------------------------


def _takes_flags(command: str) -> bool:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return any(a.option_strings and a.dest != "help" for a in sub.choices[command]._actions)


@pytest.mark.parametrize(("name", "deployment", "name_in_pod"), [
    pytest.param(GATEWAY, "egressd-gateway", "egressd", id="gateway"),
    pytest.param(SIDECAR, "egressd-injector", "webhook", id="webhook"),
    pytest.param(SIDECAR, "egressd-injector", "sync", id="sync"),
])
def test_container_args_parse(request: pytest.FixtureRequest, name: str, deployment: str, name_in_pod: str) -> None:
    """Each container's command line is one egressd's own argument parser accepts, and for the proxy a valid one."""
    args = argv(container(install(request, name), deployment, name_in_pod))
    assert args[0] == "egressd"
    if not _takes_flags(args[1]):
        pytest.skip(f"egressd {args[1]} takes no flags yet")
    try:
        parsed = build_parser().parse_args(args[1:])
    except SystemExit as exc:
        pytest.fail(f"egressd rejects {' '.join(args)} ({exc})")
    if args[1] in ("run", "sidecar"):
        config_from(parsed)  # the flags together make a valid configuration (ConfigError otherwise)
