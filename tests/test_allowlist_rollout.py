"""An allowlist change, from the ConfigMap in egressd's namespace to a running sidecar, with no restart.

The chain a merged pull request takes in a cluster: ``kubectl apply -k`` replaces the source ConfigMap (here
a write to the Kubernetes API mock, the one accepted stand-in), ``egressd allowlist-sync`` (the real
command) copies it into the app's namespace, the kubelet projects the copy into the pod's volume, and the
running egressd notices the files change and swaps the policy in. The kubelet cannot run here: :func:`project`
writes the volume the way its atomic writer does (a new timestamped directory, the ``..data`` symlink
renamed over the old one, one symlink per key), which is what egressd sees in a pod.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from conftest import service_yaml
from egressd import kube
from harness import connect_tunnel, wait_for
from k8s_api import configmap, namespace
from test_allowlist_sync import DEADLINE, SyncProcess

APP_NS = "payments"


def echo_rule(lab, host: str) -> str:
    return f"  - host: {host}\n    ports: [{lab.echo.port}]\n"


def project(volume: Path, data: dict[str, str]) -> None:
    """Write ``data`` into ``volume`` as the kubelet updates a ConfigMap volume: atomically, by one rename."""
    volume.mkdir(exist_ok=True)
    stamp = volume / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets.token_hex(4)}"
    stamp.mkdir()
    for key, text in data.items():
        (stamp / key).write_text(text)
    current = volume / "..data"
    old = os.readlink(current) if current.is_symlink() else None
    os.symlink(stamp.name, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", current)
    for key in data:
        if not (volume / key).is_symlink():
            os.symlink(f"..data/{key}", volume / key)
    for link in volume.iterdir():
        if link.is_symlink() and not link.name.startswith("..") and link.name not in data:
            link.unlink()
    if old:
        shutil.rmtree(volume / old)


def copy_in(server, data: dict[str, str]) -> dict[str, str]:
    """Wait until the app namespace's copy holds ``data``; return it."""
    def ready() -> dict[str, str] | None:
        obj = server.read("configmaps", kube.ALLOWLISTS_CONFIGMAP, APP_NS)
        return obj["data"] if obj is not None and obj.get("data") == data else None

    return wait_for(ready, timeout=DEADLINE, what=f"the copy in {APP_NS} to hold the new allowlists")


def opens(proxy, authority: str) -> bool:
    sock, head = connect_tunnel(proxy.address, authority)
    sock.close()
    return head.startswith(b"HTTP/1.1 200")


def test_a_changed_allowlist_configmap_reaches_a_running_sidecar_without_a_restart(lab, api, start_proxy, tmp_path):
    """A new rule applied to the source ConfigMap is copied by allowlist-sync, projected into the pod's volume and
    enforced by the running egressd (same process, open tunnels kept); a broken change keeps the last good one."""
    first = {"svc.yaml": service_yaml(echo_rule(lab, "echo.test"))}
    second = {"svc.yaml": service_yaml(echo_rule(lab, "echo.test") + echo_rule(lab, "api.test"))}
    broken = {"svc.yaml": service_yaml("  - host: '*.com'\n")}
    source = configmap(kube.ALLOWLISTS_CONFIGMAP, kube.NAMESPACE, first)
    server = api([namespace(kube.NAMESPACE), namespace(APP_NS, {kube.INJECT_LABEL: kube.INJECT_ENABLED}), source])
    sync = SyncProcess(["--kubeconfig", server.kubeconfig(tmp_path / "kubeconfig"), "--admin-listen", "127.0.0.1:0"],
                       dict(os.environ))
    try:
        volume = tmp_path / "volume"
        project(volume, copy_in(server, first))
        proxy = start_proxy({}, "svc", "--allowlists", str(volume))
        assert opens(proxy, f"echo.test:{lab.echo.port}") and not opens(proxy, f"api.test:{lab.echo.port}")
        tunnel, head = connect_tunnel(proxy.address, f"echo.test:{lab.echo.port}")
        assert head.startswith(b"HTTP/1.1 200")

        server.modify(configmap(kube.ALLOWLISTS_CONFIGMAP, kube.NAMESPACE, second))
        project(volume, copy_in(server, second))
        wait_for(lambda: opens(proxy, f"api.test:{lab.echo.port}"), timeout=DEADLINE, what="the new rule in force")
        assert proxy.metric("egressd_policy_reloads_total", result="success") == 2

        server.modify(configmap(kube.ALLOWLISTS_CONFIGMAP, kube.NAMESPACE, broken))
        project(volume, copy_in(server, broken))
        wait_for(lambda: proxy.metric("egressd_policy_reloads_total", result="error") == 1, timeout=DEADLINE,
                 what="the broken change refused")
        assert opens(proxy, f"api.test:{lab.echo.port}")
        tunnel.sendall(b"same process")
        assert tunnel.recv(12) == b"same process"
        tunnel.close()
        assert proxy.proc.poll() is None
    finally:
        sync.stop()
