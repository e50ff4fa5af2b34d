"""Inspect mode end to end: curl through egressd's explicit listener to a trustme origin on loopback, the name's
rule with ``inspect:``; egressd hands the tunnel to the mitmproxy worker, which presents a leaf from egressd's CA,
decides each request by method and path and verifies the origin. A rule without ``inspect:`` on the same proxy
stays a blind tunnel (the client sees the origin's own certificate)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import service_yaml
from egressd.inspect import ca
from harness import wait_for

pytestmark = pytest.mark.skipif(sys.version_info < (3, 12), reason="inspect mode runs mitmproxy, which needs 3.12+")


@pytest.fixture
def proxy(lab, start_proxy, tmp_path):
    cert, key = ca.init(tmp_path / "inspect-ca")
    rules = (f"  - host: api.test\n    ports: [{lab.tls.port}]\n    inspect:\n"
             "      - methods: [GET]\n        paths: [\"/repos/acme/**\"]\n"
             f"  - host: www.api.test\n    ports: [{lab.tls.port}]\n")
    started = start_proxy({"svc.yaml": service_yaml(rules)}, "svc", "--inspect-ca-cert", str(cert),
                          "--inspect-ca-key", str(key), "--inspect-upstream-ca", str(lab.ca_file))
    started.inspect_ca = cert
    return started


def curl(proxy, lab, name: str, path: str, cacert, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "-i", "--path-as-is", "--max-time", "20", "--proxy", "http://{}:{}".format(*proxy.address),
         "--cacert", str(cacert), *extra, f"https://{name}:{lab.tls.port}{path}"],
        capture_output=True, text=True, timeout=30)


def status(out: subprocess.CompletedProcess) -> str:
    """The origin-side status line curl printed after the proxy's 200 to CONNECT (HTTP/2 with the worker)."""
    lines = [line for line in out.stdout.splitlines() if line.startswith("HTTP/")]
    return lines[-1].strip() if lines else out.stderr


def events(proxy, event: str, n: int) -> list[dict]:
    return wait_for(lambda: len(r := [x for x in proxy.records() if x["event"] == event]) >= n and r,
                    what=f"{n} {event} records")


def test_allowed_request_reaches_the_origin_and_others_are_refused_with_a_record(lab, proxy):
    ok = curl(proxy, lab, "api.test", "/repos/acme/widgets?token=secret", proxy.inspect_ca)
    assert status(ok) == "HTTP/2 200", ok.stdout[:300] + ok.stderr
    assert "tls-origin saw GET /repos/acme/widgets?token=secret" in ok.stdout
    refused = curl(proxy, lab, "api.test", "/gists", proxy.inspect_ca, "-X", "POST")
    assert status(refused) == "HTTP/2 403" and "x-egressd-reason: request_not_allowed" in refused.stdout.lower()
    assert "tls-origin saw" not in refused.stdout
    requests = events(proxy, "egress.request", 2)
    by_path = {r["path"]: r for r in requests}
    assert by_path["/repos/acme/widgets"]["decision"] == "allow"
    assert by_path["/gists"]["reason"] == "request_not_allowed"
    assert "secret" not in str(requests)  # the query string is not kept without --inspect-log-query
    tunnels = events(proxy, "egress.connection", 2)
    assert {r["conn_id"] for r in tunnels} == {r["conn_id"] for r in requests}
    assert all(r["host"] == "api.test" and "inspected" in r["detail"] for r in tunnels)


def test_a_rule_without_inspect_stays_a_blind_tunnel(lab, proxy):
    """The client sees the origin's own certificate: with only egressd's CA it fails, with the origin's it works."""
    assert curl(proxy, lab, "www.api.test", "/x", proxy.inspect_ca).returncode != 0
    blind = curl(proxy, lab, "www.api.test", "/x", lab.ca_file)
    assert status(blind) == "HTTP/1.1 200 OK" and "tls-origin saw GET /x" in blind.stdout
    [rec] = events(proxy, "egress.connection", 2)[-1:]
    assert rec["reason"] == "allowed" and "inspected" not in (rec["detail"] or "")
