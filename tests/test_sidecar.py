"""Sidecar mode end to end: a simulated pod, `egressd init-iptables` and `egressd sidecar`, an unmodified app.

The pod namespace holds the app (UID 65534, no proxy settings, its resolv.conf
naming the cluster DNS) and egressd (root, so ``--proxy-uid 0``); the net
namespace holds the cluster DNS, a "public" resolver, TLS origins on IPv4 and
IPv6, a decoy origin at an address no allowed name has, a plain HTTP origin, a
server-first service and a UDP sink. Every address is a documentation address,
re-admitted with ``--allow-cidr``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from egressd.lab.netns import NET_V4, NET_V6, call_in
from egressd.lab.pod import BANNER, DECOY_IP, PUBLIC_DNS, SSH_IP, PodLab
from harness import ProxyProcess, http_get, wait_for, write_allowlists

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root")

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


class World(PodLab):
    """The pod lab with the sidecar running (through the test harness, which reads its records and logs)."""

    def __init__(self) -> None:
        super().__init__(ZONE, NAMES)
        self.allowlists = write_allowlists(self.root / "allowlists", {"payments-api.yaml": ALLOWLIST})
        self.proxy: ProxyProcess | None = None

    def start_sidecar(self) -> ProxyProcess:
        args = self.sidecar_args("payments-api", self.allowlists, "--hello-timeout", "2")
        self.proxy = ProxyProcess(args, self.root / "audit.jsonl", wrap=self.pod.pod.command([]), command="sidecar")
        return self.proxy

    def metric(self, name: str, **labels: str) -> float:
        text = call_in(self.pod.pod.name, http_get, ("127.0.0.1", 15020), "/metrics")[1]
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
        super().close()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    made = World()
    try:
        out = made.init_iptables()
        assert out.returncode == 0, out.stderr
        made.start_sidecar()
        yield made
    finally:
        made.close()


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
    assert out.stdout.strip() == repr(BANNER), out
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
