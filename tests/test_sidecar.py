"""Sidecar mode end to end: a simulated pod, `egressd init-iptables` and `egressd sidecar`, an unmodified app.

The pod namespace holds the app (UID 65534, no proxy settings, its resolv.conf
naming the cluster DNS) and egressd (root, so ``--proxy-uid 0``); the net
namespace holds the cluster DNS, a "public" resolver, TLS origins on IPv4 and
IPv6, a decoy origin at an address no allowed name has, a plain HTTP origin, a
server-first service and a UDP sink. Every address is a documentation address,
re-admitted with ``--allow-cidr``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from egressd.lab import DnsServer, HttpOrigin, LabThread, TlsOrigin, make_ca
from egressd.lab.netns import DOC_CIDRS, NET_V4, NET_V6, Pod, enter
from harness import ProxyProcess, http_get, wait_for, write_allowlists

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root")

APP = 65534  # the app's UID: anything but the proxy's
KUBE_DNS = "203.0.113.53"  # the cluster DNS the pod's resolv.conf names
PUBLIC_DNS = "203.0.113.8"  # a resolver the app might try instead
DECOY_IP = "198.51.100.20"  # an address no allowed name resolves to
SSH_IP = "198.51.100.30"  # a server-first service with no name, allowed by a cidr: rule
NAMES = ("api.allowed.test", "evil.test", "dns.public.test")
ZONE = {
    "api.allowed.test": (NET_V4, NET_V6),
    "web.allowed.test": (NET_V4,),
    "evil.test": (NET_V4,),  # the same (CDN) address as an allowed name
    "denied.test": (DECOY_IP,),
    "kubernetes.default.svc.cluster.local": ("198.51.100.40",),
}
ALLOWLIST = f"""version: v1
service: payments-api
mode: enforce
allow:
  - host: api.allowed.test
  - host: web.allowed.test
    ports: [80]
  - cidr: {SSH_IP}/32
    ports: [22]
"""
PY = "/usr/bin/python3"  # readable by the app's UID (the interpreter under /root is not)


def in_netns(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call fn(*args) on a thread inside network namespace ``name``; return its result."""
    result: list[Any] = []
    error: list[BaseException] = []

    def main() -> None:
        try:
            enter(name)
            result.append(fn(*args))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(30)
    if error:
        raise error[0]
    return result[0]


class Banner(asyncio.Protocol):
    """A server-first service: says its banner at once, then echoes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"SSH-2.0-lab\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Sink(asyncio.DatagramProtocol):
    """Counts the UDP datagrams that reach it."""

    def __init__(self) -> None:
        self.count = 0

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.count += 1


class World:
    """The pod, the net, the lab servers in it, and the running sidecar."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pod = Pod(extra_net_addresses=[KUBE_DNS, PUBLIC_DNS, DECOY_IP, SSH_IP])
        self.lab = LabThread(netns=self.pod.net.name).start()
        ca = make_ca()
        self.ca_file = root / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.ca_file.chmod(0o644)
        self.dns = self.lab.serve(DnsServer(ZONE, ttl=30), host=KUBE_DNS, port=53)
        self.public = self.lab.serve(DnsServer(dict.fromkeys(ZONE, (DECOY_IP,)), ttl=30), host=PUBLIC_DNS, port=53)
        self.origin4 = self.lab.serve(TlsOrigin(ca, NAMES, label="origin-v4"), host=NET_V4, port=443)
        self.origin6 = self.lab.serve(TlsOrigin(ca, NAMES, label="origin-v6"), host=NET_V6, port=443)
        self.decoy = self.lab.serve(TlsOrigin(ca, NAMES, label="decoy"), host=DECOY_IP, port=443)
        self.web = self.lab.serve(HttpOrigin(label="web"), host=NET_V4, port=80)
        loop = self.lab.loop
        self.banner = self.lab.run(loop.create_server(Banner, SSH_IP, 22))
        self.sink = Sink()
        self.lab.run(loop.create_datagram_endpoint(lambda: self.sink, local_addr=(NET_V4, 443)))
        self.pod.pod.set_resolv_conf(KUBE_DNS)
        self.allowlists = write_allowlists(root / "allowlists", {"payments-api.yaml": ALLOWLIST})
        self.proxy: ProxyProcess | None = None

    def init_iptables(self, *extra: str) -> str:
        out = self.pod.pod.run([sys.executable, "-m", "egressd", "init-iptables", "--proxy-uid", "0", *extra])
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start_sidecar(self) -> ProxyProcess:
        args = [
            "--service", "payments-api", "--allowlists", str(self.allowlists),
            *(flag for cidr in DOC_CIDRS for flag in ("--allow-cidr", cidr)),
            "--hello-timeout", "2", "--reload-interval", "0.1",
        ]
        self.proxy = ProxyProcess(args, self.root / "audit.jsonl", wrap=self.pod.pod.command([]), command="sidecar")
        return self.proxy

    def app(self, *cmd: str, timeout: float = 20, **kw: Any) -> Any:
        """Run cmd in the pod as the app (no proxy settings)."""
        return self.pod.pod.run(list(cmd), user=APP, timeout=timeout, **kw)

    def curl(self, *args: str) -> Any:
        return self.app("curl", "-sS", "--max-time", "8", "--cacert", str(self.ca_file), *args)

    def metric(self, name: str, **labels: str) -> float:
        text = in_netns(self.pod.pod.name, http_get, ("127.0.0.1", 15020), "/metrics")[1]
        for line in text.splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def records(self, event: str = "egress.connection") -> list[dict]:
        assert self.proxy is not None
        return [r for r in self.proxy.records() if r["event"] == event]

    def wait_record(self, predicate: Callable[[dict], bool], event: str = "egress.connection") -> dict:
        return wait_for(lambda: next((r for r in self.records(event) if predicate(r)), None), what="a record")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.lab.stop()
        self.pod.close()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="egressd-sidecar-"))
    root.chmod(0o755)  # the app (UID 65534) reads the CA file here
    made = World(root)
    try:
        made.init_iptables()
        made.start_sidecar()
        yield made
    finally:
        made.close()
        shutil.rmtree(root, ignore_errors=True)


def test_allowed_name_works_over_ipv4_and_ipv6(world):
    """curl with no proxy settings reaches an allowed name over IPv4 and IPv6, through the transparent listener."""
    for family, label in (("-4", "origin-v4"), ("-6", "origin-v6")):
        out = world.curl(family, "https://api.allowed.test/")
        assert out.returncode == 0, out.stderr
        assert f"{label} saw GET / host=api.allowed.test sni=api.allowed.test" in out.stdout
    rec = world.wait_record(lambda r: r["upstream"] == f"[{NET_V6}]:443")
    assert (rec["listener"], rec["decision"], rec["host"], rec["sni"]) == (
        "transparent", "allow", "api.allowed.test", "api.allowed.test"
    )
    assert rec["original_dst"] == f"[{NET_V6}]:443" and rec["original_dst_in_answer"] is True


def test_plain_http_is_decided_request_by_request(world):
    """Plain HTTP on an allowed port works, and each request on the connection is decided by its Host."""
    script = (
        "import socket\n"
        f"s = socket.create_connection(('{NET_V4}', 80), timeout=8)\n"
        "for host in ('web.allowed.test', 'evil.test'):\n"
        "    s.sendall(f'GET /x HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n'.encode())\n"
        "    data = b''\n"
        "    while b'\\r\\n\\r\\n' not in data:\n"
        "        data += s.recv(4096)\n"
        "    print(data.split(b'\\r\\n')[0].decode())\n"
        "    head, _, body = data.partition(b'\\r\\n\\r\\n')\n"
        "    n = int([l.split(b':')[1] for l in head.split(b'\\r\\n') if l.lower().startswith(b'content-length')][0])\n"
        "    while len(body) < n:\n"
        "        body += s.recv(4096)\n"
    )
    out = world.app(PY, "-c", script)
    assert out.stdout.splitlines() == ["HTTP/1.1 200 OK", "HTTP/1.1 403 Forbidden"], out.stderr
    rec = world.wait_record(lambda r: r["host"] == "evil.test" and r["port"] == 80)
    assert (rec["listener"], rec["reason"], rec["request"]) == ("transparent", "not_allowlisted", 2)


def test_denied_name_is_refused_and_never_looked_up_upstream(world):
    """A denied name gets NXDOMAIN from the filter, the cluster DNS never sees it, and a connection is refused."""
    out = world.app("dig", "+tries=1", "+time=3", "denied.test", "A")
    assert "status: NXDOMAIN" in out.stdout, out.stdout + out.stderr
    assert not any(name == "denied.test" for name, _ in world.dns.queries)
    dns = world.wait_record(lambda r: r["qname"] == "denied.test", event="egress.dns")
    assert (dns["decision"], dns["reason"], dns["rcode"]) == ("deny", "not_allowlisted", "NXDOMAIN")
    out = world.curl("--resolve", f"denied.test:443:{DECOY_IP}", "https://denied.test/")
    assert out.returncode != 0
    rec = world.wait_record(lambda r: r["sni"] == "denied.test")
    assert (rec["decision"], rec["reason"]) == ("deny", "not_allowlisted")
    assert world.metric("egressd_denials_total", service="payments-api", reason="not_allowlisted") >= 1


def test_forbidden_sni_on_an_allowed_address_is_refused(world):
    """openssl to an allowed name's (shared) address with a forbidden SNI is refused; nothing reaches the origin."""
    before = len(world.origin4.requests)
    out = world.app("openssl", "s_client", "-connect", f"{NET_V4}:443", "-servername", "evil.test",
                    "-CAfile", str(world.ca_file), input="", timeout=20)
    assert "BEGIN CERTIFICATE" not in out.stdout
    rec = world.wait_record(lambda r: r["sni"] == "evil.test" and r["port"] == 443)
    assert (rec["decision"], rec["reason"], rec["original_dst"]) == ("deny", "not_allowlisted", f"{NET_V4}:443")
    assert len(world.origin4.requests) == before


def test_allowed_sni_on_a_forbidden_address_reaches_only_the_real_one(world):
    """curl pointed at a decoy address with an allowed name reaches that name's real address, never the decoy."""
    out = world.curl("--resolve", f"api.allowed.test:443:{DECOY_IP}", "https://api.allowed.test/pinned")
    assert out.returncode == 0, out.stderr
    assert "origin-v4 saw GET /pinned" in out.stdout or "origin-v6 saw GET /pinned" in out.stdout
    assert not world.decoy.requests
    rec = world.wait_record(lambda r: r["original_dst"] == f"{DECOY_IP}:443" and r["sni"] == "api.allowed.test")
    assert rec["decision"] == "allow" and rec["original_dst_in_answer"] is False


def test_raw_ip_without_a_name_is_refused_unless_a_cidr_rule_allows_it(world):
    """Bytes with no name to a bare IP are refused no_name; a server-first service allowed by cidr: works."""
    script = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)\n"
        "s.sendall(b'\\x00\\x01not a name\\r\\n\\r\\n') if sys.argv[3] == 'send' else None\n"
        "print(repr(s.recv(100)))\n"
    )
    out = world.app(PY, "-c", script, NET_V4, "8443", "send")
    assert out.stdout.strip() in ("b''", ""), out
    rec = world.wait_record(lambda r: r["original_dst"] == f"{NET_V4}:8443")
    assert (rec["decision"], rec["reason"]) == ("deny", "no_name")
    out = world.app(PY, "-c", script, SSH_IP, "22", "wait")
    assert out.stdout.strip() == repr(b"SSH-2.0-lab\r\n"), out
    rec = world.wait_record(lambda r: r["original_dst"] == f"{SSH_IP}:22")
    assert (rec["decision"], rec["rule"] is not None) == ("allow", True)


def test_udp_does_not_leave_the_pod(world):
    """A UDP datagram to port 443 (QUIC) is dropped in the pod and never reaches the net."""
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        f"    s.sendto(b'quic', ('{NET_V4}', 443))\n"
        "except PermissionError:\n"
        "    print('dropped')\n"
    )
    assert world.app(PY, "-c", script).stdout.strip() == "dropped"
    drops = world.pod.pod.run(["iptables-save", "-c"]).stdout
    assert any("DROP" in line and not line.startswith("[0:0]") for line in drops.splitlines() if "-p udp" in line)
    assert world.sink.count == 0


def test_dns_to_another_resolver_is_answered_by_the_filter(world):
    """A query sent straight to a public resolver's address is answered by the filter, not by that server."""
    out = world.app("dig", "+tries=1", "+time=3", f"@{PUBLIC_DNS}", "web.allowed.test", "A", "+short")
    assert out.stdout.strip() == NET_V4, out.stdout + out.stderr  # the cluster DNS's answer, not the decoy's
    out = world.app("dig", "+tries=1", "+time=3", f"@{PUBLIC_DNS}", "denied.test", "A")
    assert "status: NXDOMAIN" in out.stdout
    assert world.public.queries == []


def test_dns_over_tls_to_a_public_resolver_is_refused(world):
    """DNS over TLS (port 853) to a public resolver is a TLS connection like any other: its name is not allowed."""
    out = world.app("openssl", "s_client", "-connect", f"{PUBLIC_DNS}:853", "-servername", "dns.public.test",
                    input="", timeout=20)
    assert "BEGIN CERTIFICATE" not in out.stdout
    rec = world.wait_record(lambda r: r["original_dst"] == f"{PUBLIC_DNS}:853")
    assert (rec["decision"], rec["reason"]) == ("deny", "not_allowlisted")


def test_thousands_of_lookups_all_succeed(world):
    """Two thousand lookups through the filter all succeed: the app's and egressd's DNS never share conntrack."""
    batch = world.root / "lookups.txt"
    batch.write_text("web.allowed.test A +short\n" * 2000)
    batch.chmod(0o644)
    out = world.app("dig", "+tries=1", "+time=2", "-f", str(batch), timeout=120)
    answers = out.stdout.split()
    assert answers.count(NET_V4) == 2000, (len(answers), out.stderr[-500:])


def test_egressd_own_traffic_is_not_redirected_and_the_records_say_where_it_went(world):
    """egressd's own upstream connections leave the pod directly (a loop would never reach the origin)."""
    assert world.curl("https://api.allowed.test/own").returncode == 0
    rec = world.wait_record(lambda r: r.get("upstream") and r["host"] == "api.allowed.test")
    assert rec["upstream"] in (f"{NET_V4}:443", f"[{NET_V6}]:443")
    assert not [r for r in world.records() if (r.get("original_dst") or "").endswith(":15001")]


def test_without_the_sidecar_the_app_reaches_nothing(world):
    """With egressd stopped, redirected traffic has nowhere to go: no connection and no lookup succeeds."""
    assert world.proxy is not None
    assert world.proxy.stop() == 0
    try:
        assert world.curl("https://api.allowed.test/").returncode != 0
        assert world.curl("--resolve", f"api.allowed.test:443:{NET_V4}", "https://api.allowed.test/").returncode != 0
        out = world.app("dig", "+tries=1", "+time=2", "web.allowed.test", "A")
        assert "NOERROR" not in out.stdout
    finally:
        world.start_sidecar()
