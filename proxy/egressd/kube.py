"""The names egressd's Kubernetes install agrees on: labels, annotations, objects, ports.

One place for them, so the injection webhook (:mod:`egressd.inject`), the
allowlist sync (:mod:`egressd.allowlistsync`), the manifests under ``k8s/`` and
the tests cannot drift apart. The manifests spell the same strings; a test
reads them back from ``kubectl kustomize`` output.
"""

from __future__ import annotations

from egressd import __version__

VERSION = __version__

NAMESPACE = "egressd-system"  # egressd's own namespace: never injected
SKIPPED_NAMESPACES = frozenset({"kube-system", NAMESPACE})

# Namespace label egressd.io/inject=enabled turns injection (and the allowlist copy) on;
# the pod label egressd.io/inject="false" opts one pod out (the webhook's objectSelector skips it).
INJECT_LABEL = "egressd.io/inject"
INJECT_ENABLED = "enabled"
INJECT_DISABLED = "false"

SERVICE_ANNOTATION = "egressd.io/service"  # else the pod's service account name
EXCLUDE_CIDRS_ANNOTATION = "egressd.io/exclude-cidrs"  # comma-separated CIDRs left alone
EXCLUDE_PORTS_ANNOTATION = "egressd.io/exclude-ports"  # comma-separated ports left alone
INJECTED_ANNOTATION = "egressd.io/injected"  # value: the egressd version that injected the pod
SIDECAR_LABEL = "egressd.io/sidecar"  # "true" on injected pods: the PodMonitor selects on it

ALLOWLISTS_CONFIGMAP = "egressd-allowlists"  # the source in NAMESPACE and every copy: one fixed name
ALLOWLISTS_MOUNT = "/etc/egressd/allowlists"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SYNC_MANAGER = "egressd-allowlist-sync"  # the owner label value on every copy
COPY_OF_ANNOTATION = "egressd.io/copy-of"  # "<namespace>/<name>" of the source

INIT_CONTAINER = "egressd-init"
SIDECAR_CONTAINER = "egressd"
PROXY_UID = 1337
ADMIN_PORT = 15020
ADMIN_PORT_NAME = "egressd-admin"
TRANSPARENT_PORT = 15001
DNS_PORT = 15053
GATEWAY_PORT = 3128
WEBHOOK_PORT = 8443
