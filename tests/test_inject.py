"""The injection's pure part: every skip, refusal and malformed input as tables, the patch as golden files.

The golden files tests/golden/inject/NAME.json hold the decision and the decoded JSON patch that
:func:`egressd.inject.review` gives for the pod NAME of GOLDEN_PODS. After a deliberate change to the
templates in sidecar/, regenerate them with ``EGRESSD_UPDATE_GOLDEN=1 bash tests/run tests/test_inject.py``
and review the diff. Every patched pod is applied with the RFC 6902 ``add`` applier below, validated with
kubernetes-validate (strict, the newest Kubernetes it ships) and checked against the restricted Pod Security
Standard with only ``egressd-init`` exempt.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pss
from egressd import inject, iptables, kube
from egressd.addresses import parse_cidr
from egressd.cli import build_parser
from egressd.cli import iptables as cli_iptables
from egressd.cli import run as cli_run
from egressd.config import parse_hostport
from egressd.inject import Decision, Settings, TemplateError, load_templates

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "inject"
TEMPLATES = load_templates(ROOT / "sidecar")
IMAGE = "registry.example.com/egressd:0.1.0"
SETTINGS = Settings(image=IMAGE, exclude_cidrs=(parse_cidr("10.96.0.0/12"),), exclude_ports=(15090,))
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
K8S_VERSION = kubernetes_validate.utils.latest_version()


# --- helpers, also used by test_webhook.py ------------------------------------------------------------------


def restricted_container(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": f"registry.example.com/{name}:1", "securityContext": {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
        **extra}


def make_pod(spec: dict[str, Any] | None = None, labels: dict[str, str] | None = None,
             annotations: dict[str, str] | None = None, name: str = "app-7d9f8-") -> dict[str, Any]:
    """A Pod as a controller creates it (generateName, no namespace), meeting the restricted profile."""
    metadata: dict[str, Any] = {"generateName": name}
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    base = {"serviceAccountName": "payments-api", "containers": [restricted_container("app")],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {**base, **(spec or {})}}


def admission_review(pod: Any, uid: str = "3f0c6b1e-0000-4000-8000-000000000001", operation: str = "CREATE",
                     namespace: str = "payments", kind: dict[str, str] | None = None) -> dict[str, Any]:
    return copy.deepcopy({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": kind or POD_KIND, "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": operation, "namespace": namespace, "object": pod, "userInfo": {"username": "system:test"}}})


def apply_patch(document: Any, ops: list[dict[str, Any]]) -> Any:
    """Apply RFC 6902 ``add`` operations (the only kind the webhook sends) to a copy of document."""
    doc = copy.deepcopy(document)
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            assert 0 <= index <= len(target), f"{op['path']}: index out of range"
            target.insert(index, op["value"])
        else:
            assert isinstance(target, dict), f"{op['path']}: parent is not an object"
            target[last] = op["value"]
    return doc


def decoded_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    answer = response["response"]
    assert answer["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(answer["patch"]))


def check_patched(pod: dict[str, Any], patched: dict[str, Any]) -> None:
    """The injected pod: egressd's two init containers first, valid for Kubernetes, restricted but for the init step."""
    names = [c["name"] for c in patched["spec"]["initContainers"]]
    own = [c["name"] for c in pod["spec"].get("initContainers") or []]
    assert names == [kube.INIT_CONTAINER, kube.SIDECAR_CONTAINER, *own]
    assert patched["spec"]["containers"] == pod["spec"]["containers"]
    assert patched["metadata"]["annotations"][kube.INJECTED_ANNOTATION] == kube.VERSION
    assert patched["metadata"]["labels"][kube.SIDECAR_LABEL] == "true"
    for key in ("labels", "annotations"):
        assert (pod["metadata"].get(key) or {}).items() <= patched["metadata"][key].items()
    kubernetes_validate.validate(patched, K8S_VERSION, strict=True)
    assert pss.violations(patched["spec"], exempt={kube.INIT_CONTAINER}) == []
    assert pss.violations(patched["spec"]) != [], "the init step is the one exception"


def review(pod: Any, settings: Settings = SETTINGS, **request: Any) -> inject.Outcome:
    return inject.review(json.dumps(admission_review(pod, **request)).encode(), settings, TEMPLATES)


# --- patches --------------------------------------------------------------------------------------------------

GOLDEN_PODS = {
    # no init containers, volumes, labels or annotations: every array and map is created
    "minimal": make_pod(),
    # the pod's own init container runs after egressd's two; volumes, labels and annotations are appended to
    "own-init-and-volumes": make_pod(
        {"initContainers": [restricted_container("migrate")], "volumes": [{"name": "tmp", "emptyDir": {}}],
         "containers": [restricted_container("app", volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}])]},
        labels={"app.kubernetes.io/name": "payments-api"}, annotations={"team": "payments"}),
    # the service from the annotation; the pod's exclusions after the webhook's, duplicates dropped
    "annotations": make_pod(annotations={
        kube.SERVICE_ANNOTATION: "checkout-web",
        kube.EXCLUDE_CIDRS_ANNOTATION: " 10.40.0.0/16,2001:db8::/32,10.96.0.0/12",
        kube.EXCLUDE_PORTS_ANNOTATION: "5432, 6379,15090,"}),
    # no service account name set: the service is "default"
    "default-service-account": {**make_pod(), "spec": {k: v for k, v in make_pod()["spec"].items()
                                                       if k != "serviceAccountName"}},
}


@pytest.mark.parametrize("name", list(GOLDEN_PODS))
def test_patch_matches_the_golden_file(name):
    """The decision and the decoded patch for each representative pod are exactly its reviewed golden file."""
    outcome = review(GOLDEN_PODS[name])
    assert outcome.decision is Decision.INJECTED, outcome.message
    text = json.dumps({"service": outcome.service, "patch": decoded_patch(outcome.response())}, indent=2) + "\n"
    path = GOLDEN / f"{name}.json"
    if os.environ.get("EGRESSD_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs: EGRESSD_UPDATE_GOLDEN=1 rewrites it (then review the diff)"


@pytest.mark.parametrize("name", list(GOLDEN_PODS))
def test_patched_pod_is_valid_and_restricted(name):
    """Each patched pod validates against the Kubernetes schema and is restricted but for egressd-init."""
    pod = GOLDEN_PODS[name]
    outcome = review(pod)
    response = outcome.response()["response"]
    assert response["allowed"] is True and response["uid"] == admission_review(pod)["request"]["uid"]
    check_patched(pod, apply_patch(pod, decoded_patch(outcome.response())))


def test_pod_without_metadata_maps_gets_them_created():
    """A pod with metadata but no labels or annotations gets both maps created with egressd's marks."""
    ops = list(review(make_pod()).patch)
    assert {"op": "add", "path": "/metadata/annotations", "value": {kube.INJECTED_ANNOTATION: kube.VERSION}} in ops
    assert {"op": "add", "path": "/metadata/labels", "value": {kube.SIDECAR_LABEL: "true"}} in ops


def test_existing_maps_get_keys_with_escaped_slashes():
    """Existing labels and annotations get egressd's keys added one by one, '/' escaped as '~1'."""
    paths = [op["path"] for op in review(make_pod(labels={"a": "b"}, annotations={"c": "d"})).patch]
    assert "/metadata/annotations/egressd.io~1injected" in paths
    assert "/metadata/labels/egressd.io~1sidecar" in paths


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage, which the injected containers inherit."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in line[4:].split())
    return env


def parse_as_egressd(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                     service_links: dict[str, str] | None = None):
    """The container's command line as egressd parses it, with the image's environment, the variables Kubernetes
    makes for the namespace's Services, and the container's own (which win), in that order."""
    for name in [n for n in os.environ if n.startswith("EGRESSD_")]:
        monkeypatch.delenv(name)
    own = {e["name"]: e["value"] for e in container.get("env", [])}
    for name, value in {**image_env(), **(service_links or {}), **own}.items():
        monkeypatch.setenv(name, value)
    assert container["command"] == ["egressd"]
    return build_parser().parse_args(container["args"])


def test_sidecar_arguments_give_a_loopback_only_proxy(monkeypatch):
    """The sidecar's arguments over the image's environment: its service, the mount, loopback listeners but admin."""
    init, sidecar, _ = TEMPLATES.fill(inject._values(SETTINGS, "payments-api", []))
    config = cli_run.config_from(parse_as_egressd(sidecar, monkeypatch))
    assert (config.service, str(config.allowlists)) == ("payments-api", kube.ALLOWLISTS_MOUNT)
    assert config.listen == parse_hostport(cli_run.SIDECAR.listen, "sidecar") == ("127.0.0.1", 3128)
    assert config.admin_listen == ("0.0.0.0", kube.ADMIN_PORT)
    assert config.transparent_listen == (("127.0.0.1", kube.TRANSPARENT_PORT), ("::1", kube.TRANSPARENT_PORT))
    assert config.dns_listen == (("127.0.0.1", kube.DNS_PORT), ("::1", kube.DNS_PORT))


def test_init_arguments_give_the_rules_with_the_exclusions(monkeypatch):
    """The init step's arguments parse as egressd init-iptables with UID 1337 and the merged exclusions."""
    outcome = review(GOLDEN_PODS["annotations"])
    init = outcome.patch[0]["value"][0]
    rules = cli_iptables.rules_from(parse_as_egressd(init, monkeypatch))
    assert rules == iptables.PodRules(
        proxy_uid=kube.PROXY_UID,
        exclude_cidrs=tuple(parse_cidr(c) for c in ("10.96.0.0/12", "10.40.0.0/16", "2001:db8::/32")),
        exclude_ports=(15090, 5432, 6379))


def test_service_link_variables_cannot_change_the_init_steps_rules(monkeypatch):
    """Services named egressd-dns, egressd-transparent or egressd-exclude in the pod's namespace cannot move the
    redirect ports or add exclusions: the init container sets those variables itself."""
    links = {"EGRESSD_DNS_PORT": "tcp://10.96.0.20:53", "EGRESSD_TRANSPARENT_PORT": "tcp://10.96.0.21:80",
             "EGRESSD_EXCLUDE_PORT": "tcp://10.96.0.22:443"}
    init = review(GOLDEN_PODS["minimal"]).patch[0]["value"][0]
    rules = cli_iptables.rules_from(parse_as_egressd(init, monkeypatch, service_links=links))
    assert rules == iptables.PodRules(proxy_uid=kube.PROXY_UID, exclude_cidrs=(parse_cidr("10.96.0.0/12"),),
                                      exclude_ports=(15090,))


# --- skips ----------------------------------------------------------------------------------------------------

SKIPS = {
    "update": (make_pod(), {"operation": "UPDATE"}, "not_create"),
    "delete": (None, {"operation": "DELETE"}, "not_create"),
    "connect": ({"kind": "PodExecOptions"}, {"operation": "CONNECT"}, "not_create"),
    "deployment": ({"kind": "Deployment"}, {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
                   "not_pod"),
    "other-group-pod": (make_pod(), {"kind": {"group": "example.com", "version": "v1", "kind": "Pod"}}, "not_pod"),
    "kube-system": (make_pod(), {"namespace": "kube-system"}, "skipped_namespace"),
    "egressd-namespace": (make_pod(), {"namespace": kube.NAMESPACE}, "skipped_namespace"),
    "opted-out": (make_pod(labels={kube.INJECT_LABEL: kube.INJECT_DISABLED}), {}, "opted_out"),
    "annotated-injected": (make_pod(annotations={kube.INJECTED_ANNOTATION: "0.0.9"}), {}, "already_injected"),
    "has-sidecar": (make_pod({"initContainers": [restricted_container(kube.SIDECAR_CONTAINER)]}), {},
                    "already_injected"),
    "has-init": (make_pod({"containers": [restricted_container(kube.INIT_CONTAINER)]}), {}, "already_injected"),
    "host-network": (make_pod({"hostNetwork": True}), {}, "host_network"),
}


@pytest.mark.parametrize("name", list(SKIPS))
def test_skipped_pods_are_allowed_unchanged(name):
    """Each skip is allowed with no patch, for its own logged reason; only hostNetwork carries a warning."""
    pod, request, reason = SKIPS[name]
    outcome = review(pod, **request)
    assert (outcome.decision, outcome.reason) == (Decision.SKIPPED, reason)
    response = outcome.response()["response"]
    assert response["allowed"] is True and "patch" not in response and "status" not in response
    if reason == "host_network":
        assert response["warnings"] == [inject.HOST_NETWORK_WARNING]
        assert "not filtered" in response["warnings"][0] and len(response["warnings"][0]) < 256
    else:
        assert "warnings" not in response


def test_own_namespace_flag_is_skipped():
    """The namespace given as egressd's own (--namespace) is never injected."""
    settings = Settings(image=IMAGE, namespace="egress")
    assert review(make_pod(), settings, namespace="egress").reason == "skipped_namespace"
    assert review(make_pod(), settings, namespace=kube.NAMESPACE).reason == "skipped_namespace"


def test_opt_out_needs_the_exact_label_value():
    """Only the label value "false" opts out; an annotation of that name, or another value, does not."""
    assert review(make_pod(labels={kube.INJECT_LABEL: "no"})).decision is Decision.INJECTED
    assert review(make_pod(annotations={kube.INJECT_LABEL: "false"})).decision is Decision.INJECTED


# --- refusals -------------------------------------------------------------------------------------------------

REFUSALS = {
    "pod-runs-as-1337": (make_pod({"securityContext": {"runAsNonRoot": True, "runAsUser": 1337}}),
                         "runs_as_proxy_uid", ["the pod's securityContext", "runAsUser 1337", "another UID"]),
    "container-runs-as-1337": (make_pod({"containers": [restricted_container("app"), {
        "name": "helper", "image": "h", "securityContext": {"runAsUser": 1337}}]}),
        "runs_as_proxy_uid", ["container helper", "unfiltered"]),
    "init-runs-as-1337": (make_pod({"initContainers": [{"name": "setup", "image": "s",
                                                        "securityContext": {"runAsUser": 1337}}]}),
                          "runs_as_proxy_uid", ["container setup"]),
    "volume-clash": (make_pod({"volumes": [{"name": "egressd-tmp", "emptyDir": {}}]}), "volume_conflict",
                     ["volume egressd-tmp", "rename"]),
    "service-upper-case": (make_pod(annotations={kube.SERVICE_ANNOTATION: "Payments"}), "bad_service",
                           [f"annotation {kube.SERVICE_ANNOTATION} 'Payments'", "<service>.yaml"]),
    "service-empty": (make_pod(annotations={kube.SERVICE_ANNOTATION: ""}), "bad_service", ["''"]),
    "service-too-long": (make_pod(annotations={kube.SERVICE_ANNOTATION: "a" * 64}), "bad_service", ["at most 63"]),
    "service-yaml": (make_pod(annotations={kube.SERVICE_ANNOTATION: "x\n- --allowlists\n- /"}), "bad_service", []),
    "service-account-dots": (make_pod({"serviceAccountName": "ci.runner"}), "bad_service",
                             ["service account name 'ci.runner'", kube.SERVICE_ANNOTATION]),
    "cidr-not-cidr": (make_pod(annotations={kube.EXCLUDE_CIDRS_ANNOTATION: "10.0.0.0/8,db.internal"}),
                      "bad_exclude_cidrs", [kube.EXCLUDE_CIDRS_ANNOTATION, "db.internal", "e.g. 10.40.0.0/16"]),
    "cidr-host-bits": (make_pod(annotations={kube.EXCLUDE_CIDRS_ANNOTATION: "10.1.2.3/8"}), "bad_exclude_cidrs",
                       ["did you mean 10.0.0.0/8"]),
    "cidr-everything": (make_pod(annotations={kube.EXCLUDE_CIDRS_ANNOTATION: "0.0.0.0/0"}), "bad_exclude_cidrs",
                        ["0.0.0.0/0 would leave every destination unfiltered"]),
    "cidr-everything-v6": (make_pod(annotations={kube.EXCLUDE_CIDRS_ANNOTATION: "::/0"}), "bad_exclude_cidrs",
                           ["::/0"]),
    "port-zero": (make_pod(annotations={kube.EXCLUDE_PORTS_ANNOTATION: "0"}), "bad_exclude_ports",
                  [kube.EXCLUDE_PORTS_ANNOTATION, "'0'", "1-65535"]),
    "port-too-big": (make_pod(annotations={kube.EXCLUDE_PORTS_ANNOTATION: "65536"}), "bad_exclude_ports", ["65536"]),
    "port-name": (make_pod(annotations={kube.EXCLUDE_PORTS_ANNOTATION: "postgres"}), "bad_exclude_ports",
                  ["postgres"]),
    "port-range": (make_pod(annotations={kube.EXCLUDE_PORTS_ANNOTATION: "5000-5010"}), "bad_exclude_ports", []),
    "port-arabic-digit": (make_pod(annotations={kube.EXCLUDE_PORTS_ANNOTATION: "\u0665\u0664"}),
                          "bad_exclude_ports", []),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_pods_get_403_naming_the_fix(name):
    """Each refusal is allowed: false with code 403 and a message naming the field, the value and the fix."""
    pod, reason, phrases = REFUSALS[name]
    outcome = review(pod)
    assert (outcome.decision, outcome.reason) == (Decision.REFUSED, reason)
    response = outcome.response()["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 403
    for phrase in phrases:
        assert phrase in response["status"]["message"]


def test_every_problem_is_in_one_refusal():
    """A pod with several problems gets one refusal listing all of them, the first one's reason logged."""
    pod = make_pod({"securityContext": {"runAsUser": 1337}}, annotations={
        kube.SERVICE_ANNOTATION: "Bad", kube.EXCLUDE_PORTS_ANNOTATION: "x", kube.EXCLUDE_CIDRS_ANNOTATION: "y"})
    outcome = review(pod)
    assert outcome.reason == "runs_as_proxy_uid"
    for phrase in ("1337", kube.SERVICE_ANNOTATION, kube.EXCLUDE_PORTS_ANNOTATION, kube.EXCLUDE_CIDRS_ANNOTATION):
        assert phrase in outcome.message


# --- malformed input ------------------------------------------------------------------------------------------


def _review_with(**changes: Any) -> bytes:
    body = admission_review(make_pod())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = body
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return json.dumps(body).encode()


_DELETE = object()
UID = admission_review(None)["request"]["uid"]
INVALID = {
    "not-json": (b"{not json", "bad_json", "not JSON", ""),
    "not-utf8": (b'{"a": "\xff"}', "bad_json", "not JSON", ""),
    "deeply-nested": (b"[" * 100_000, "bad_json", "not JSON", ""),
    "json-array": (b"[]", "bad_review", "AdmissionReview", ""),
    "json-string": (b'"AdmissionReview"', "bad_review", "AdmissionReview", ""),
    "v1beta1": (_review_with(apiVersion="admission.k8s.io/v1beta1"), "bad_review", "admissionReviewVersions", UID),
    "wrong-kind": (_review_with(kind="AdmissionResponse"), "bad_review", "'AdmissionResponse'", UID),
    "no-request": (_review_with(request=_DELETE), "bad_review", "no request", ""),
    "request-null": (_review_with(request=None), "bad_review", "no request", ""),
    "no-uid": (_review_with(request__uid=_DELETE), "bad_review", "request.uid", ""),
    "empty-uid": (_review_with(request__uid=""), "bad_review", "request.uid", ""),
    "uid-number": (_review_with(request__uid=7), "bad_review", "request.uid", ""),
    "no-operation": (_review_with(request__operation=_DELETE), "bad_review", "request.operation", UID),
    "kind-string": (_review_with(request__kind="Pod"), "bad_review", "request.kind", UID),
    "no-object": (_review_with(request__object=_DELETE), "bad_review", "not a v1 Pod", UID),
    "object-list": (_review_with(request__object=[]), "bad_review", "not a v1 Pod", UID),
    "object-deployment": (_review_with(request__object__kind="Deployment"), "bad_review", "not a v1 Pod", UID),
    "no-metadata": (_review_with(request__object__metadata=_DELETE), "bad_review", "metadata", UID),
    "no-spec": (_review_with(request__object__spec=_DELETE), "bad_review", "spec", UID),
    "no-containers": (_review_with(request__object__spec__containers=[]), "bad_review", "containers", UID),
    "containers-object": (_review_with(request__object__spec__containers={"name": "a"}), "bad_review",
                          "spec.containers", UID),
    "container-no-name": (_review_with(request__object__spec__containers=[{"image": "a"}]), "bad_review",
                          "spec.containers", UID),
    "volumes-strings": (_review_with(request__object__spec__volumes=["a"]), "bad_review", "spec.volumes", UID),
    "labels-list": (_review_with(request__object__metadata__labels=["a"]), "bad_review", "metadata.labels", UID),
    "annotation-number": (_review_with(request__object__metadata__annotations={"a": 1}), "bad_review",
                          "metadata.annotations", UID),
    "security-context-string": (_review_with(request__object__spec__securityContext="root"), "bad_review",
                                "securityContext", UID),
    "no-namespace": (_review_with(request__namespace=_DELETE), "bad_review", "namespace", UID),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_malformed_input_is_refused_with_400(name):
    """Each malformed review gets allowed: false, code 400, a message saying what was wrong and the uid echoed."""
    body, reason, phrase, uid = INVALID[name]
    outcome = inject.review(body, SETTINGS, TEMPLATES)
    assert (outcome.decision, outcome.reason) == (Decision.INVALID, reason)
    response = outcome.response()
    assert response["apiVersion"] == "admission.k8s.io/v1" and response["kind"] == "AdmissionReview"
    assert response["response"]["uid"] == uid
    assert response["response"]["allowed"] is False
    assert response["response"]["status"]["code"] == 400
    assert phrase in response["response"]["status"]["message"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
FULL_POD = make_pod({"initContainers": [restricted_container("migrate")], "volumes": [{"name": "v", "emptyDir": {}}]},
                    labels={"a": "b"}, annotations={kube.SERVICE_ANNOTATION: "svc", kube.EXCLUDE_PORTS_ANNOTATION: "1"})
FUZZ_PATHS = [
    (), ("apiVersion",), ("request",), ("request", "uid"), ("request", "kind"), ("request", "kind", "kind"),
    ("request", "operation"), ("request", "namespace"), ("request", "subResource"), ("request", "object"),
    ("request", "object", "kind"), ("request", "object", "metadata"), ("request", "object", "metadata", "name"),
    ("request", "object", "metadata", "labels"), ("request", "object", "metadata", "annotations"),
    ("request", "object", "spec"), ("request", "object", "spec", "containers"),
    ("request", "object", "spec", "containers", 0), ("request", "object", "spec", "containers", 0, "securityContext"),
    ("request", "object", "spec", "containers", 0, "securityContext", "runAsUser"),
    ("request", "object", "spec", "containers", 0, "ports"), ("request", "object", "spec", "initContainers"),
    ("request", "object", "spec", "initContainers", 0, "name"), ("request", "object", "spec", "volumes"),
    ("request", "object", "spec", "volumes", 0), ("request", "object", "spec", "securityContext"),
    ("request", "object", "spec", "serviceAccountName"), ("request", "object", "spec", "hostNetwork"),
]
ANNOTATIONS = [kube.SERVICE_ANNOTATION, kube.EXCLUDE_CIDRS_ANNOTATION, kube.EXCLUDE_PORTS_ANNOTATION]


def _answer_is_consistent(body: Any) -> None:
    outcome = inject.review(json.dumps(body).encode(), SETTINGS, TEMPLATES)
    response = json.loads(json.dumps(outcome.response()))["response"]
    assert response["allowed"] is (outcome.decision in (Decision.INJECTED, Decision.SKIPPED))
    assert ("patch" in response) is (outcome.decision is Decision.INJECTED)
    if not response["allowed"]:
        assert response["status"]["code"] in (400, 403) and response["status"]["message"]


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(FUZZ_PATHS), value=JSON_VALUES)
def test_any_value_anywhere_gets_an_answer(path, value):
    """Whatever JSON value stands anywhere in a review, the answer is a consistent AdmissionReview, never an error."""
    body: Any = admission_review(FULL_POD)
    if not path:
        body = value
    else:
        target = body
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    _answer_is_consistent(body)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(ANNOTATIONS), text=st.text(max_size=40))
def test_any_annotation_text_gets_an_answer(name, text):
    """Any text in egressd's annotations is injected or refused, never an error."""
    pod = make_pod(annotations={name: text})
    outcome = review(pod)
    assert outcome.decision in (Decision.INJECTED, Decision.REFUSED)
    _answer_is_consistent(admission_review(pod))


def test_log_fields_name_the_pod_and_the_decision():
    """The log line's fields say which review, which pod, what was decided and why."""
    fields = review(make_pod(), uid="u-1").log_fields()
    assert fields == {"uid": "u-1", "namespace": "payments", "pod": "app-7d9f8-", "operation": "CREATE",
                      "kind": "Pod", "decision": "injected", "reason": "injected", "service": "payments-api",
                      "message": None}


# --- templates ------------------------------------------------------------------------------------------------


def test_placeholders_keep_their_type_and_never_add_structure():
    """A whole plain placeholder keeps its type, a quoted one is a string, and YAML in a value stays one string."""
    evil = "x\n- --allowlists\n- /\nsecurityContext: {privileged: true}"
    init, sidecar, volumes = TEMPLATES.fill(inject._values(SETTINGS, evil, ["--exclude-port", "1"]))
    assert sidecar["args"][:3] == ["sidecar", "--service", evil] and len(sidecar["args"]) == 5
    assert sidecar["securityContext"]["runAsUser"] == kube.PROXY_UID
    assert sidecar["ports"][0]["containerPort"] == kube.ADMIN_PORT
    assert init["args"] == ["init-iptables", "--proxy-uid", str(kube.PROXY_UID), "--exclude-port", "1"]
    assert volumes[0]["configMap"]["name"] == kube.ALLOWLISTS_CONFIGMAP


def _broken(tmp_path: Path, file: str, old: str, new: str) -> Path:
    directory = tmp_path / "sidecar"
    shutil.copytree(ROOT / "sidecar", directory)
    path = directory / file
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return directory


BROKEN_TEMPLATES = {
    "unknown-placeholder": ("sidecar-container.yaml", "- ${service}", "- ${servce}",
                            "sidecar-container.yaml:16: unknown placeholder ${servce}"),
    "unclosed-placeholder": ("sidecar-container.yaml", "image: ${image}", "image: ${image", "an unclosed ${"),
    "list-in-string": ("init-container.yaml", "- ${exclude_args}", '- "x${exclude_args}"', "write it alone"),
    "list-as-value": ("init-container.yaml", "image: ${image}", "image: ${exclude_args}", "write it alone"),
    "placeholder-key": ("volumes.yaml", "configMap:", "${image}:", "keys as plain strings"),
    "duplicate-key": ("init-container.yaml", "imagePullPolicy: IfNotPresent", "imagePullPolicy: IfNotPresent\n"
                      "imagePullPolicy: Always", "duplicate key 'imagePullPolicy'"),
    "bad-yaml": ("volumes.yaml", "- name: egressd-run", "- name: [egressd-run", "volumes.yaml"),
    "wrong-init-name": ("init-container.yaml", "name: ${init_container}", "name: iptables",
                        "name: egressd-init"),
    "not-native-sidecar": ("sidecar-container.yaml", "\nrestartPolicy: Always", "\nrestartPolicy: OnFailure",
                           "restartPolicy: Always"),
    "volume-twice": ("volumes.yaml", "- name: egressd-run", "- name: egressd-tmp", "its own name"),
}


@pytest.mark.parametrize("name", list(BROKEN_TEMPLATES))
def test_broken_templates_fail_at_load(name, tmp_path):
    """A template the webhook could not fill safely fails at start with the file, the line and the fix."""
    file, old, new, phrase = BROKEN_TEMPLATES[name]
    with pytest.raises(TemplateError) as caught:
        load_templates(_broken(tmp_path, file, old, new))
    assert phrase in str(caught.value)


def test_missing_template_names_the_directory(tmp_path):
    """A directory without the templates fails naming the file and the --templates flag."""
    with pytest.raises(TemplateError, match="--templates"):
        load_templates(tmp_path)


def test_empty_template_file_fails(tmp_path):
    """An empty template file fails at load, naming it."""
    directory = tmp_path / "sidecar"
    shutil.copytree(ROOT / "sidecar", directory)
    (directory / "volumes.yaml").write_text("# nothing\n")
    with pytest.raises(TemplateError, match="volumes.yaml is empty"):
        load_templates(directory)
