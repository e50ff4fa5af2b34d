"""egressd inject-webhook as a real process over HTTPS: the examples' pods, malformed input, rotation, logs.

The webhook runs as ``python -m egressd inject-webhook`` on an ephemeral loopback port with trustme
certificates; httpx and curl verify its certificate against the test CA. The pods come from ``kubectl
kustomize k8s/examples``: each workload's pod template becomes the Pod its controller would create, and the
answer's patch is applied and checked as in test_inject.py (schema, order, restricted profile).
"""

from __future__ import annotations

import copy
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import trustme
import yaml

import pss
from egressd import kube
from harness import stop_process
from test_inject import K8S_VERSION, admission_review, apply_patch, check_patched, decoded_patch, make_pod

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/egressd:0.1.0"
DEADLINE = 15.0
SERVICE_DNS = "egressd-webhook.egressd-system.svc"


def issue(ca: trustme.CA, directory: Path, tag: str) -> tuple[Path, Path, bytes]:
    """A serving pair for the webhook's Service name and 127.0.0.1; returns the files and the leaf's DER."""
    leaf = ca.issue_cert(SERVICE_DNS, "127.0.0.1", common_name=f"egressd-webhook-{tag}")
    cert, key = directory / f"{tag}.crt", directory / f"{tag}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key, ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


class Webhook:
    """``egressd inject-webhook`` in a subprocess; its JSON log lines (stdout) are collected as they come."""

    def __init__(self, cert: Path, key: Path, *extra: str, env: dict[str, str] | None = None,
                 flags: bool = True) -> None:
        args = ["--listen", "127.0.0.1:0", "--cert", str(cert), "--key", str(key), "--image", IMAGE] if flags else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "egressd", "inject-webhook", *args, *extra], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._new: queue.Queue[None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr or ()), daemon=True).start()
        try:
            self.started = self.wait_log(lambda e: e.get("event") == "inject-webhook.started", "the started line")
        except BaseException:
            self.stop()
            raise
        self.address = next(tuple(a) for a in self.started["listen"] if a[0] in ("127.0.0.1", "0.0.0.0"))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = {"unparsed": line}
            self.lines.append(parsed)
            self._new.put(None)
        self._new.put(None)

    def logs(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if e.get("event") == event and fields.items() <= e.items()]

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        end = time.monotonic() + DEADLINE
        while True:
            found = [e for e in list(self.lines) if predicate(e)]
            if found:
                return found[0]
            if self.proc.poll() is not None and self._new.empty():
                raise AssertionError(f"the webhook exited ({self.proc.returncode}) before {what}: {self.stderr}")
            if time.monotonic() > end:
                raise AssertionError(f"no log line for {what} within {DEADLINE}s: {self.lines}")
            try:
                self._new.get(timeout=0.1)
            except queue.Empty:
                pass

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.address[1]}{path}"

    def stop(self) -> int:
        return stop_process(self.proc, DEADLINE)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert, key, der = issue(ca, directory, "serving")
    return {"ca": ca, "ca_file": ca_file, "cert": cert, "key": key, "der": der, "dir": directory}


@pytest.fixture(scope="module")
def webhook(pki: dict[str, Any]) -> Iterator[Webhook]:
    proc = Webhook(pki["cert"], pki["key"])
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(pki: dict[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki["ca_file"])), timeout=10) as c:
        yield c


def post_review(client: httpx.Client, webhook: Webhook, body: Any) -> httpx.Response:
    return client.post(webhook.url("/inject"), json=body)


# --- the examples' pods ---------------------------------------------------------------------------------------


def example_objects() -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "examples")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def pod_from(workload: dict[str, Any]) -> dict[str, Any]:
    """The Pod the workload's controller creates: its template, the controller's labels and name, no namespace."""
    kind, name = workload["kind"], workload["metadata"]["name"]
    spec = workload["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else workload["spec"]
    template = copy.deepcopy(spec["template"])
    meta, pod_spec = template.get("metadata") or {}, template["spec"]
    labels = dict(meta.get("labels") or {})
    if kind == "Deployment":
        labels["pod-template-hash"] = "5d8f7c9b6"
        identity = {"generateName": f"{name}-5d8f7c9b6-"}
    elif kind == "StatefulSet":
        identity = {"name": f"{name}-0"}
        labels.update({"statefulset.kubernetes.io/pod-name": f"{name}-0", "apps.kubernetes.io/pod-index": "0"})
        pod_spec.update(hostname=f"{name}-0", subdomain=spec["serviceName"])
        pod_spec.setdefault("volumes", []).extend(
            {"name": c["metadata"]["name"], "persistentVolumeClaim": {"claimName": f"{c['metadata']['name']}-{name}-0"}}
            for c in spec.get("volumeClaimTemplates") or [])
    else:
        job = f"{name}-29123456" if kind == "CronJob" else name
        labels.update({"job-name": job, "batch.kubernetes.io/job-name": job})
        identity = {"generateName": f"{job}-"}
    metadata = {**identity, "labels": labels, **({"annotations": meta["annotations"]} if "annotations" in meta else {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


WORKLOADS = ("Deployment", "StatefulSet", "CronJob", "Job")
EXAMPLES = {  # workload: (service, the init step's exclusion arguments)
    "payments-api": ("payments-api", ["--exclude-port", "5432"]),
    "checkout-web": ("checkout-web", []),
    "payments-settlement": ("payments-api", []),
    "payments-ledger": ("payments-api", ["--exclude-cidr", "10.40.0.0/16"]),
}


def test_examples_are_restricted_workloads_in_an_injected_namespace():
    """k8s/examples builds valid objects: a namespace labelled for injection, workloads with restricted pods."""
    objects = example_objects()
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    namespace = next(o for o in objects if o["kind"] == "Namespace")
    assert namespace["metadata"]["labels"][kube.INJECT_LABEL] == kube.INJECT_ENABLED
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}
    assert set(workloads) == set(EXAMPLES)
    assert {o["kind"] for o in workloads.values()} == {"Deployment", "StatefulSet", "CronJob"}
    assert all(o["metadata"].get("namespace") == "payments" for o in objects if o["kind"] != "Namespace")
    for name, workload in workloads.items():
        assert pss.violations(pod_from(workload)["spec"]) == [], name


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_pods_are_injected(name, webhook, client):
    """Each example's pod, sent as an AdmissionReview, comes back allowed with a patch that makes a valid pod."""
    workload = next(o for o in example_objects() if o["metadata"]["name"] == name and o["kind"] in WORKLOADS)
    pod = pod_from(workload)
    uid = f"example-{name}"
    response = post_review(client, webhook, admission_review(pod, uid=uid))
    assert response.status_code == 200
    answer = response.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == uid and answer["response"]["allowed"] is True
    patched = apply_patch(pod, decoded_patch(answer))
    check_patched(pod, patched)
    service, exclusions = EXAMPLES[name]
    init, sidecar = patched["spec"]["initContainers"][:2]
    assert sidecar["args"][:3] == ["sidecar", "--service", service]
    assert init["args"] == ["init-iptables", "--proxy-uid", str(kube.PROXY_UID), *exclusions]
    assert init["image"] == sidecar["image"] == IMAGE
    line = webhook.wait_log(lambda e: e.get("uid") == uid, f"the review of {name}")
    assert (line["decision"], line["service"], line["namespace"]) == ("injected", service, "payments")


# --- malformed and unexpected requests ------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
GOOD = json.dumps(admission_review(make_pod(), uid="too-large")).encode()
MALFORMED = {
    "not-json": ("POST", "/inject", JSON, b"{oops", 400),
    "json-array": ("POST", "/inject", JSON, b"[]", 400),
    "v1beta1": ("POST", "/inject", JSON, json.dumps({**admission_review(make_pod()),
                                                     "apiVersion": "admission.k8s.io/v1beta1"}).encode(), 400),
    "no-uid": ("POST", "/inject", JSON, json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                                    "request": {"operation": "CREATE"}}).encode(), 400),
    "object-not-a-pod": ("POST", "/inject", JSON, json.dumps(admission_review(["a"])).encode(), 400),
    "unknown-path": ("POST", "/mutate", JSON, GOOD, 404),
    "root": ("GET", "/", {}, b"", 404),
    "get-inject": ("GET", "/inject", {}, b"", 405),
    "put-inject": ("PUT", "/inject", JSON, GOOD, 405),
    "post-healthz": ("POST", "/healthz", JSON, GOOD, 405),
    "text-plain": ("POST", "/inject", {"content-type": "text/plain"}, GOOD, 415),
    "no-content-type": ("POST", "/inject", {}, GOOD, 415),
    "too-large": ("POST", "/inject", JSON, GOOD + b" " * (3 * 1024 * 1024), 413),
    "too-large-chunked": ("POST", "/inject", JSON, None, 413),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_an_admission_refusal_and_the_webhook_serves_on(name, webhook, client):
    """Each malformed or unexpected request gets its status and an AdmissionReview allowed: false; serving goes on."""
    method, path, headers, body, status = MALFORMED[name]
    content = body if body is not None else iter([GOOD, *(b" " * 65536 for _ in range(64))])  # sent chunked
    response = client.request(method, webhook.url(path), headers=headers, content=content)
    assert response.status_code == status
    answer = response.json()
    assert answer["kind"] == "AdmissionReview" and answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == status
    assert answer["response"]["status"]["message"]
    assert client.get(webhook.url("/healthz")).status_code == 200
    assert webhook.proc.poll() is None
    assert not [e for e in webhook.lines if "unparsed" in e or e.get("level") == "error"]


def test_healthz_answers_curl_verifying_the_ca(webhook, pki):
    """GET /healthz answers 200 over HTTPS to curl checking the certificate against the CA."""
    out = subprocess.run(["curl", "-sS", "--cacert", str(pki["ca_file"]), "--resolve",
                          f"{SERVICE_DNS}:{webhook.address[1]}:127.0.0.1",
                          f"https://{SERVICE_DNS}:{webhook.address[1]}/healthz", "-w", " %{http_code}"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "ok\n 200", out.stderr


def test_every_decision_is_one_log_line(webhook, client):
    """Each review, whatever its decision, is logged as exactly one inject.review line with its uid and reason."""
    cases = {
        "log-injected": (admission_review(make_pod(), uid="log-injected"), "injected", "injected", 200),
        "log-skipped": (admission_review(make_pod(), uid="log-skipped", namespace="kube-system"), "skipped",
                        "skipped_namespace", 200),
        "log-host-network": (admission_review(make_pod({"hostNetwork": True}), uid="log-host-network"), "skipped",
                             "host_network", 200),
        "log-refused": (admission_review(make_pod(annotations={kube.SERVICE_ANNOTATION: "Nope"}), uid="log-refused"),
                        "refused", "bad_service", 200),
        "log-invalid": ({**admission_review(make_pod(), uid="log-invalid"), "apiVersion": "v1"}, "invalid",
                        "bad_review", 400),
    }
    for uid, (body, _, _, status) in cases.items():
        response = post_review(client, webhook, body)
        assert response.status_code == status and response.json()["response"]["uid"] == uid
    for uid, (_, decision, reason, _) in cases.items():
        webhook.wait_log(lambda e, uid=uid: e.get("uid") == uid, f"the review {uid}")
        lines = webhook.logs("inject.review", uid=uid)
        assert len(lines) == 1, lines
        assert (lines[0]["decision"], lines[0]["reason"]) == (decision, reason)
        assert lines[0]["level"] == "info" and lines[0]["timestamp"]
        if decision != "invalid":  # an invalid review's fields are not trusted, so not logged
            assert (lines[0]["operation"], lines[0]["kind"], lines[0]["pod"]) == ("CREATE", "Pod", "app-7d9f8-")


# --- certificates ---------------------------------------------------------------------------------------------


def served_certificate(address: tuple[str, int], cafiles: list[Path]) -> bytes:
    """The leaf certificate a new handshake gets (verified against the given CAs), DER."""
    context = ssl.create_default_context()
    for cafile in cafiles:
        context.load_verify_locations(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", address[1]), timeout=5) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def wait_served(address: tuple[str, int], cafiles: list[Path], der: bytes, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while served_certificate(address, cafiles) != der:
        if time.monotonic() > end:
            raise AssertionError(f"the webhook did not serve {what} within {DEADLINE}s")
        time.sleep(0.05)


def secret_volume(directory: Path, cert: Path, key: Path) -> tuple[Path, Path]:
    """Point directory/tls.crt and tls.key at a new version the way the kubelet updates a Secret volume: the
    files live in a directory that ``..data`` links to, and a new version is swapped in by one rename."""
    version = directory / f"..{time.monotonic_ns()}"
    version.mkdir()
    (version / "tls.crt").write_bytes(cert.read_bytes())
    (version / "tls.key").write_bytes(key.read_bytes())
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    return directory / "tls.crt", directory / "tls.key"


def test_certificates_are_reloaded_when_the_files_change(tmp_path):
    """New handshakes get a changed pair; a pair that does not load is logged once and the last good one serves on."""
    ca_old, ca_new = trustme.CA(), trustme.CA()
    cafiles = [tmp_path / "old-ca.pem", tmp_path / "new-ca.pem"]
    ca_old.cert_pem.write_to_path(str(cafiles[0]))
    ca_new.cert_pem.write_to_path(str(cafiles[1]))
    volume = tmp_path / "secret"
    volume.mkdir()
    first_cert, first_key, first = issue(ca_old, tmp_path, "first")
    cert, key = secret_volume(volume, first_cert, first_key)
    proc = Webhook(cert, key)
    try:
        assert served_certificate(proc.address, cafiles) == first
        # 1. the Secret changes: both files at once, by the rename of ..data
        second_cert, second_key, second = issue(ca_new, tmp_path, "second")
        secret_volume(volume, second_cert, second_key)
        wait_served(proc.address, cafiles, second, "the renamed-in pair")
        # 2. a certificate whose key is not the one beside it: logged once, the last good pair serves on
        secret_volume(volume, issue(ca_new, tmp_path, "mismatched")[0], second_key)
        failed = proc.wait_log(lambda e: e.get("event") == "inject-webhook.cert_reload_failed", "the failed reload")
        assert str(cert) in failed["error"] and failed["level"] == "error"
        end = time.monotonic() + 2.5  # two and a half looks at the files: still the old pair, still one line
        while time.monotonic() < end:
            assert served_certificate(proc.address, cafiles) == second
        assert len(proc.logs("inject-webhook.cert_reload_failed")) == 1
        # 3. both files rewritten in place, one after the other: served once both halves are there
        third_cert, third_key, third = issue(ca_old, tmp_path, "third")
        key.write_bytes(third_key.read_bytes())
        cert.write_bytes(third_cert.read_bytes())
        wait_served(proc.address, cafiles, third, "the pair rewritten in place")
        assert proc.proc.poll() is None
    finally:
        proc.stop()


# --- flags ----------------------------------------------------------------------------------------------------


def test_listen_on_every_address_with_flags_from_the_environment(pki, client):
    """:PORT binds every address, and each flag can come from its EGRESSD_ variable instead."""
    env = {"EGRESSD_LISTEN": ":0", "EGRESSD_CERT": str(pki["cert"]), "EGRESSD_KEY": str(pki["key"]),
           "EGRESSD_IMAGE": "egressd:from-env", "EGRESSD_EXCLUDE_CIDR": "10.96.0.0/12,10.244.0.0/16"}
    proc = Webhook(pki["cert"], pki["key"], env=env, flags=False)
    try:
        assert proc.address[0] == "0.0.0.0"
        assert proc.started["image"] == "egressd:from-env"
        assert proc.started["exclude_cidrs"] == ["10.96.0.0/12", "10.244.0.0/16"]
        response = client.post(proc.url("/inject"), json=admission_review(make_pod(), uid="env"))
        args = decoded_patch(response.json())[0]["value"][0]["args"]
        assert args[3:] == ["--exclude-cidr", "10.96.0.0/12", "--exclude-cidr", "10.244.0.0/16"]
    finally:
        proc.stop()


def test_sigterm_stops_the_webhook_cleanly(pki):
    """SIGTERM stops the webhook with exit code 0."""
    proc = Webhook(pki["cert"], pki["key"])
    try:
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(DEADLINE) == 0
    finally:
        proc.stop()


BAD_FLAGS = {
    "no-image": (["--image", ""], {}, "--image"),
    "bad-cidr": (["--exclude-cidr", "10.0.0.1/8"], {}, "--exclude-cidr: 10.0.0.1/8 has host bits set"),
    "bad-port": (["--exclude-port", "5432,http"], {}, "--exclude-port"),
    "bad-port-env": ([], {"EGRESSD_EXCLUDE_PORT": "0"}, "EGRESSD_EXCLUDE_PORT"),
    "listen-name": (["--listen", "localhost:8443"], {}, "--listen"),
    "listen-port": (["--listen", ":http"], {}, "--listen"),
    "no-cert-file": (["--cert", "/nonexistent/tls.crt"], {}, "--cert /nonexistent/tls.crt"),
    "mismatched-key": (["--key", "MISMATCHED"], {}, "do not load"),
    "no-templates": (["--templates", "/nonexistent"], {}, "--templates"),
}


@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_unusable_flags_exit_2_with_one_line(name, pki):
    """A flag value that cannot be used stops the start with exit code 2 and one line naming it."""
    extra, env, phrase = BAD_FLAGS[name]
    if "MISMATCHED" in extra:
        other, _, _ = issue(pki["ca"], pki["dir"], "other")
        extra = ["--key", str(pki["key"]), "--cert", str(other)]
    cmd = [sys.executable, "-m", "egressd", "inject-webhook", "--listen", "127.0.0.1:0", "--cert", str(pki["cert"]),
           "--key", str(pki["key"]), "--image", IMAGE, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert out.returncode == 2, out
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("egressd: ") and phrase in lines[0], out.stderr
    assert out.stdout == ""
