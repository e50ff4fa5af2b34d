"""Inspect mode on the transparent listener: an app in a pod namespace, its TCP redirected by iptables, reaches a
TLS origin in another namespace by name; the rule's ``inspect:`` decides each request inside the tunnel, the
worker dialling egressd's own answer for the name (never the address the app dialled).

Only documentation addresses, only inside namespaces made here (see tests/test_transparent.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import service_yaml
from egressd.inspect import ca
from egressd.lab import DnsServer, LabThread, TlsOrigin, make_ca
from egressd.lab.netns import DOC_CIDRS, Pod
from harness import ProxyProcess, wait_for, write_allowlists

APP_UID = 65534
REAL, IMPOSTOR, DNS = "203.0.113.10", "203.0.113.66", "203.0.113.53"
RULES = """  - host: api.test
    inspect:
      - methods: [GET]
        paths: ["/repos/acme/**"]
"""

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 12) or os.geteuid() != 0
    or not all(shutil.which(tool) for tool in ("ip", "iptables", "ip6tables", "curl")),
    reason="needs Python 3.12+ (mitmproxy), root, iproute2, iptables and curl",
)


@dataclass
class World:
    pod: Pod
    proxy: ProxyProcess
    inspect_ca: str

    def curl(self, *args: str) -> tuple[int, str, str]:
        cmd = ["curl", "-sS", "-i", "--max-time", "15", "--cacert", self.inspect_ca, *args]
        done = self.pod.pod.run(cmd, user=APP_UID, timeout=30)
        return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("transparent-inspect")
    shared = Path(tempfile.mkdtemp(prefix="egressd-inspect-"))  # the CA certificate, readable by the app's UID
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, shared, ignore_errors=True)
        shared.chmod(0o755)
        pod = Pod(extra_net_addresses=(REAL, IMPOSTOR, DNS))
        stack.callback(pod.close)
        for tool in ("iptables", "ip6tables"):
            done = pod.pod.run([tool, "-t", "nat", "-I", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner",
                                str(APP_UID), "-j", "REDIRECT", "--to-ports", "15001"])
            assert done.returncode == 0, done.stderr
        lab = stack.enter_context(LabThread(netns=pod.net.name))
        origin_ca = make_ca()
        origin_ca_file = tmp / "origin-ca.pem"
        origin_ca.cert_pem.write_to_path(str(origin_ca_file))
        lab.serve(TlsOrigin(origin_ca, ["api.test"], label="real"), host=REAL, port=443)
        lab.serve(TlsOrigin(origin_ca, ["api.test"], label="impostor"), host=IMPOSTOR, port=443)
        lab.serve(DnsServer({"api.test": (REAL,)}), host=DNS, port=53)
        cert, key = ca.init(tmp / "inspect-ca")
        app_ca = shared / "inspect-ca.pem"
        shutil.copy(cert, app_ca)
        app_ca.chmod(0o644)
        directory = write_allowlists(tmp / "allowlists", {"svc.yaml": service_yaml(RULES)})
        cidrs = [arg for cidr in DOC_CIDRS for arg in ("--allow-cidr", cidr)]
        args = ["--listen", "off", "--transparent-listen", "127.0.0.1:15001", "--admin-listen", "127.0.0.1:15020",
                "--workers", "1", "--allowlists", str(directory), "--service", "svc", "--resolver", f"{DNS}:53",
                *cidrs, "--reload-interval", "0", "--inspect-ca-cert", str(cert), "--inspect-ca-key", str(key),
                "--inspect-upstream-ca", str(origin_ca_file)]
        proxy = ProxyProcess(args, tmp / "audit.jsonl", wrap=["ip", "netns", "exec", pod.pod.name])
        stack.callback(proxy.stop)
        yield World(pod, proxy, str(app_ca))


def events(world: World, event: str, n: int) -> list[dict]:
    return wait_for(lambda: len(r := [x for x in world.proxy.records() if x["event"] == event]) >= n and r,
                    what=f"{n} {event} records")


def test_redirected_tls_is_inspected_and_dialled_at_egressds_own_answer(world: World) -> None:
    """The app dials the impostor's address for api.test; egressd inspects the tunnel, the allowed GET reaches the
    real origin (egressd's answer), the POST is refused inside the tunnel, and the records join by conn_id."""
    code, out, err = world.curl("--resolve", f"api.test:443:{IMPOSTOR}", "https://api.test/repos/acme/x")
    assert code == 0, err
    assert "real saw GET /repos/acme/x host=api.test sni=api.test" in out
    code, out, err = world.curl("--resolve", f"api.test:443:{IMPOSTOR}", "-X", "POST", "https://api.test/gists")
    assert code == 0, err
    assert " 403" in out.splitlines()[0] and "x-egressd-reason: request_not_allowed" in out.lower()
    assert "saw" not in out
    requests = events(world, "egress.request", 2)
    tunnels = events(world, "egress.connection", 2)
    assert [(r["method"], r["decision"]) for r in requests] == [("GET", "allow"), ("POST", "deny")]
    assert {r["conn_id"] for r in tunnels} == {r["conn_id"] for r in requests}
    for rec in tunnels:
        assert (rec["listener"], rec["protocol"], rec["upstream"]) == ("transparent", "tls", f"{REAL}:443")
        assert rec["original_dst"] == f"{IMPOSTOR}:443" and rec["original_dst_in_answer"] is False
        assert "inspected" in rec["detail"]
