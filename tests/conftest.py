"""Shared fixtures: the lab (a real DNS server and real origins on loopback) and a proxy factory."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egressd.lab import DnsServer, EchoOrigin, HttpOrigin, LabThread, Servfail, Slow, TlsOrigin, make_ca
from harness import ProxyProcess, write_allowlists
from k8s_api import KubeApi

ISOLATED = os.environ.get("EGRESSD_TEST_NETNS") == "1"

TLS_NAMES = ("api.test", "www.api.test", "dual.test", "mixed.test", "v6.test", "fallback.test", "xn--bcher-kva.test")


def _only_loopback() -> bool:
    """True when this network namespace has no interface but lo (so no address can leave the machine)."""
    try:
        out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]
    return names == ["lo"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ISOLATED and _only_loopback():
        return
    skip = pytest.mark.skip(
        reason="DNS answers name addresses the proxy must refuse: run as root via tests/run, "
        "which starts pytest in a private network namespace with only loopback up"
    )
    for item in items:
        if "isolated" in item.keywords:
            item.add_marker(skip)


class Lab:
    """The session's stand-ins for the outside world."""

    def __init__(self, thread: LabThread, tmp: Path) -> None:
        self.thread = thread
        self.ca = make_ca()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.tls = thread.serve(TlsOrigin(self.ca, TLS_NAMES, label="tls-origin"))
        self.tls6 = thread.serve(TlsOrigin(self.ca, TLS_NAMES, label="tls-origin-v6"), host="::1")
        self.http = thread.serve(HttpOrigin(label="http-origin"))
        self.echo = thread.serve(EchoOrigin())
        self.closed_port = _closed_port()
        self.dns = thread.serve(
            DnsServer(
                {
                    "api.test": ("127.0.0.1",),
                    "www.api.test": ("127.0.0.1",),
                    "xn--bcher-kva.test": ("127.0.0.1",),
                    "web.test": ("127.0.0.1",),
                    "echo.test": ("127.0.0.1",),
                    "dual.test": ("127.0.0.1", "::1"),
                    "v6.test": ("::1",),
                    "fallback.test": ("127.0.0.1", "::1"),
                    "closed.test": ("127.0.0.1",),
                    "metadata.test": ("169.254.169.254",),
                    "private.test": ("10.0.0.1",),
                    "mapped.test": ("::ffff:10.0.0.1",),
                    "mixed.test": ("10.0.0.1", "127.0.0.1"),
                    "servfail.test": Servfail(),
                    "slow.test": Slow(5.0, ("127.0.0.1",)),
                },
                ttl=30,
            )
        )


def _closed_port() -> int:
    """A loopback port with nothing listening (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with LabThread() as thread:
        yield Lab(thread, tmp_path_factory.mktemp("lab"))


ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture
def start_proxy(lab: Lab, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start egressd with the given allowlist files ({name: yaml}); stopped after the test."""
    started: list[ProxyProcess] = []

    def start(
        files: dict[str, str], service: str = "svc", *extra: str, env: dict | None = None, wrap: list | None = None
    ) -> ProxyProcess:
        directory = write_allowlists(tmp_path / f"allowlists{len(started)}", files)
        args = [
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--workers", "1",
            "--allowlists", str(directory), "--service", service,
            "--resolver", f"{lab.dns.address[0]}:{lab.dns.address[1]}",
            "--allow-cidr", "127.0.0.0/8", "--allow-cidr", "::1/128",
            "--dns-timeout", "3", "--reload-interval", "0.1",
            *extra,
        ]
        proc = ProxyProcess(args, tmp_path / f"audit{len(started)}.jsonl", env=env, wrap=wrap)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def service_yaml(rules: str, service: str = "svc", mode: str = "enforce") -> str:
    """A service allowlist file with the given rules (YAML list items, indented by two)."""
    return f"version: v1\nservice: {service}\nmode: {mode}\nallow:\n{rules}"


@pytest.fixture(scope="module")
def kube_thread() -> Iterator[LabThread]:
    """A lab thread for the Kubernetes API mock of :mod:`k8s_api`, one per test module."""
    with LabThread() as thread:
        yield thread


@pytest.fixture
def api(kube_thread: LabThread) -> Iterator[Callable[..., KubeApi]]:
    """Start a KubeApi (arguments as KubeApi's: the objects it holds, then options) in the lab thread; stopped
    after the test."""
    servers: list[KubeApi] = []

    def start(objects=(), **kw) -> KubeApi:
        server = KubeApi(objects, **kw)
        kube_thread.run(server.start())
        servers.append(server)
        return server

    yield start
    for server in servers:
        kube_thread.run(server.stop())
    assert not kube_thread.errors
