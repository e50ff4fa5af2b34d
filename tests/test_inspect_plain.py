"""Inspect rules over plain HTTP: the method and path are in the clear, so the fast engine checks them itself
(no interception, no worker), and a name with ``inspect:`` is never forwarded unchecked."""

from __future__ import annotations

import subprocess

import pytest

from conftest import service_yaml
from egressd.inspect.rules import inspect_unavailable

pytestmark = pytest.mark.skipif(inspect_unavailable() is not None, reason="inspect: needs Python 3.12+ and mitmproxy")


def inspected_web(lab) -> str:
    return (f"  - host: web.test\n    ports: [{lab.http.port}]\n    inspect:\n"
            "      - methods: [GET]\n        paths: [\"/repos/acme/**\"]\n")


def curl(proxy, method: str, path: str, lab) -> subprocess.CompletedProcess:
    url = f"http://web.test:{lab.http.port}{path}"
    return subprocess.run(["curl", "-sS", "-i", "--path-as-is", "-X", method, "--proxy", "http://{}:{}".format(
        *proxy.address), url], capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/repos/acme/widgets?x=1", True),
    ("GET", "/repos/acme", True),
    ("POST", "/repos/acme/widgets", False),
    ("GET", "/repos/other", False),
    ("GET", "/repos/acme/../other", False),
    ("GET", "/repos/acme/%2e%2e/other", False),
    ("GET", "/repos/acme%2Fx", False),
    ("GET", "/REPOS/acme", False),
    ("GET", "/repos/acme;x/y", False),
])
def test_plain_http_to_an_inspected_name_is_checked_by_method_and_path(lab, start_proxy, method, path, allowed):
    proxy = start_proxy({"svc.yaml": service_yaml(inspected_web(lab))})
    out = curl(proxy, method, path, lab)
    [rec] = proxy.wait_records(1)
    if allowed:
        assert out.stdout.startswith("HTTP/1.1 200"), out.stdout[:300]
        assert "http-origin saw GET" in out.stdout
        assert rec["reason"] == "allowed" and "allowed by the inspect: entry at" in rec["detail"]
    else:
        assert out.stdout.startswith("HTTP/1.1 403") and "X-Egressd-Reason: request_not_allowed" in out.stdout
        assert "http-origin saw" not in out.stdout
        assert (rec["decision"], rec["reason"], rec["host"]) == ("deny", "request_not_allowed", "web.test")
        assert f"{method} " in rec["detail"] and "is not allowed" in rec["detail"]
