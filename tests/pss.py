"""The Kubernetes "restricted" Pod Security Standard as assertions over a pod spec.

Follows the checks of the Pod Security admission controller (baseline and
restricted, latest version): host namespaces, privileged, capabilities, host
paths and ports, seccomp, privilege escalation, running as root, volume types,
sysctls, AppArmor/SELinux, /proc mount. ``exempt`` names the containers allowed
to run as root with NET_ADMIN and NET_RAW (egressd's init step, the one
documented exception); every other rule still applies to them.
"""

from __future__ import annotations

from typing import Any

RESTRICTED_VOLUMES = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
})
EXEMPT_CAPABILITIES = frozenset({"NET_ADMIN", "NET_RAW"})


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        out += [(f"{kind}[{c.get('name')}]", c) for c in spec.get(kind) or []]
    return out


def violations(spec: dict[str, Any], exempt: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Every way ``spec`` (a PodSpec) breaks the restricted profile; empty when it meets it."""
    out: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"spec.{field} is true")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume.get('name')}: type {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl.get('name')} not allowed")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser is 0")
    if (pod_sc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t",
                                                                 "container_kvm_t", "container_engine_t"):
        out.append("pod seLinuxOptions.type not allowed")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        name = c.get("name")
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where}: hostPort {port['hostPort']}")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{where}: procMount {sc['procMount']}")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile is {seccomp} (RuntimeDefault or Localhost needed)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities do not drop ALL")
        allowed_add = {"NET_BIND_SERVICE"} | (EXEMPT_CAPABILITIES if name in exempt else set())
        extra = set(caps.get("add") or []) - allowed_add
        if extra:
            out.append(f"{where}: capabilities add {sorted(extra)}")
        if name in exempt:
            continue
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{where}: runAsUser is 0")
        if (sc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t",
                                                                "container_kvm_t", "container_engine_t"):
            out.append(f"{where}: seLinuxOptions.type not allowed")
    return out
