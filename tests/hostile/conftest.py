"""Fixtures of the hostile-input suite: one egressd per module, shared by that module's rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import ProxyProcess, write_allowlists
from hostile.explicit import Served, serve

Start = Callable[..., ProxyProcess]


@pytest.fixture(scope="module")
def module_proxy(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Start]:
    """``start(files, *flags, service="svc", resolver=(ip, port))``: egressd with these allowlist files (no
    ``--service`` when ``service`` is empty), its audit log in a file, the lab's DNS server as resolver unless told
    otherwise; stopped after the module."""
    started: list[ProxyProcess] = []

    def start(files: dict[str, str], *extra: str, service: str = "svc",
              resolver: tuple[str, int] | None = None) -> ProxyProcess:
        tmp: Path = tmp_path_factory.mktemp("hostile")
        directory = write_allowlists(tmp / "allowlists", files)
        ip, port = resolver or lab.dns.address
        args = [
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--workers", "1",
            "--allow-cidr", "127.0.0.0/8", "--allow-cidr", "::1/128", "--allowlists", str(directory),
            *(("--service", service) if service else ()), "--resolver", f"{ip}:{port}",
            "--dns-timeout", "3", "--reload-interval", "0", *extra,
        ]
        proc = ProxyProcess(args, tmp / "audit.jsonl")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def explicit(lab, module_proxy: Start) -> Served:
    """The explicit listener's egressd for one module (:func:`hostile.explicit.serve`)."""
    return serve(lab, module_proxy)
