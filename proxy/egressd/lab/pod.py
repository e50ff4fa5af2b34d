"""The world of a sidecar: a simulated pod (:mod:`egressd.lab.netns`) and what its app might try to reach.

::

    pod namespace                                 net namespace ("the internet")
      the app (UID 65534, no proxy settings)        cluster DNS       203.0.113.53:53 (the pod's resolv.conf)
      egressd init-iptables + egressd sidecar       public resolver   203.0.113.8:53  (answers everything: decoy)
      (run by the caller, as root: --proxy-uid 0)   TLS origins       198.51.100.1:443, [2001:db8::1]:443
                                                    decoy TLS origin  198.51.100.20:443 (no allowed name has it)
                                                    HTTP origin       198.51.100.1:80
                                                    banner service    198.51.100.30:22 (server-first, no name)
                                                    UDP sink          198.51.100.1:443 (counts what arrives)

The tests and ``egressd demo --sidecar`` share it. Every address is a
documentation address (:data:`egressd.lab.netns.DOC_CIDRS`, re-admitted with
``--allow-cidr``); :meth:`PodLab.close` removes everything. Needs root.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from egressd.lab import DnsServer, HttpOrigin, LabThread, TlsOrigin, make_ca
from egressd.lab.netns import DOC_CIDRS, NET_V4, NET_V6, Pod

APP_UID = 65534  # the app: any UID but the proxy's
KUBE_DNS = "203.0.113.53"
PUBLIC_DNS = "203.0.113.8"
DECOY_IP = "198.51.100.20"
SSH_IP = "198.51.100.30"
BANNER = b"SSH-2.0-lab\r\n"


class Banner(asyncio.Protocol):
    """A server-first service: says its banner at once, then echoes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(BANNER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Sink(asyncio.DatagramProtocol):
    """Counts the UDP datagrams that reach it."""

    def __init__(self) -> None:
        self.count = 0

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.count += 1


class PodLab:
    """The pod, the net and the servers in it; ``zone`` is what the cluster DNS answers (name -> addresses)."""

    def __init__(self, zone: Mapping[str, tuple[str, ...]], tls_names: Sequence[str]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="egressd-pod-"))
        self.root.chmod(0o755)  # the app (another UID) reads the CA file here
        self.pod: Pod | None = None
        self.lab: LabThread | None = None
        try:
            self.pod = Pod(extra_net_addresses=[KUBE_DNS, PUBLIC_DNS, DECOY_IP, SSH_IP])
            self.lab = LabThread(netns=self.pod.net.name).start()
            ca = make_ca()
            self.ca_file = self.root / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            self.ca_file.chmod(0o644)
            serve = self.lab.serve
            self.dns = serve(DnsServer(dict(zone), ttl=30), host=KUBE_DNS, port=53)
            self.public = serve(DnsServer(dict.fromkeys(zone, (DECOY_IP,)), ttl=30), host=PUBLIC_DNS, port=53)
            self.origin4 = serve(TlsOrigin(ca, tls_names, label="origin-v4"), host=NET_V4, port=443)
            self.origin6 = serve(TlsOrigin(ca, tls_names, label="origin-v6"), host=NET_V6, port=443)
            self.decoy = serve(TlsOrigin(ca, tls_names, label="decoy"), host=DECOY_IP, port=443)
            self.web = serve(HttpOrigin(label="web"), host=NET_V4, port=80)
            loop = self.lab.loop
            self.banner = self.lab.run(loop.create_server(Banner, SSH_IP, 22))
            self.sink = Sink()
            self.lab.run(loop.create_datagram_endpoint(lambda: self.sink, local_addr=(NET_V4, 443)))
            self.pod.pod.set_resolv_conf(KUBE_DNS)
        except BaseException:
            self.close()
            raise

    def init_iptables(self, *extra: str) -> subprocess.CompletedProcess:
        """``egressd init-iptables`` in the pod, for an egressd running as root."""
        return self.pod.pod.run([sys.executable, "-m", "egressd", "init-iptables", "--proxy-uid", "0", *extra])

    def sidecar_args(self, service: str, allowlists: Path, *extra: str) -> list[str]:
        """The flags of ``egressd sidecar`` for this pod (run as root, resolving through the cluster DNS)."""
        cidrs = [flag for cidr in DOC_CIDRS for flag in ("--allow-cidr", cidr)]
        return ["--service", service, "--allowlists", str(allowlists), *cidrs, *extra]

    def app(self, *cmd: str, timeout: float = 20, **kw: object) -> subprocess.CompletedProcess:
        """Run cmd in the pod as the app: another UID, no proxy settings."""
        return self.pod.pod.run(list(cmd), user=APP_UID, timeout=timeout, **kw)

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return self.app("curl", "-sS", "--max-time", "8", "--cacert", str(self.ca_file), *args)

    def close(self) -> None:
        if self.lab is not None:
            self.lab.stop()
        if self.pod is not None:
            self.pod.close()
        shutil.rmtree(self.root, ignore_errors=True)
