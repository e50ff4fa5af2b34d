"""A simulated pod: network namespaces we create, joined by a veth pair, on documentation addresses.

::

    pod (app + egressd)                       net ("the internet")
    veth  198.51.100.2/24  2001:db8::2/64 ─── veth  198.51.100.1/24  2001:db8::1/64
    default routes via .1 / ::1               lo    + any --extra address (203.0.113.53, ...)

Both ends use documentation ranges (RFC 5737, RFC 3849), which no real network
routes; egressd refuses them unless ``--allow-cidr`` names them, so a test
re-admits exactly those. ``ip netns exec`` bind-mounts ``/etc/netns/NAME/resolv.conf``
over ``/etc/resolv.conf``, which is how the pod gets its own resolver
(:meth:`Namespace.set_resolv_conf`). A thread can move itself into a namespace
with :func:`enter` (network namespaces are per thread): sockets it opens there
stay there, which is how :class:`egressd.lab.LabThread` serves inside ``net``.

Everything made here is removed by :meth:`Pod.close` (names carry a random
suffix so parallel runs never collide). Needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
POD_V4, NET_V4 = "198.51.100.2", "198.51.100.1"
POD_V6, NET_V6 = "2001:db8::2", "2001:db8::1"
DOC_CIDRS = ("198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")  # what a test re-admits with --allow-cidr


def enter(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (one made by ``ip netns add``)."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, CLONE_NEWNET)
        else:  # Python 3.11
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(name: str, fn: Callable[..., T], *args: object, timeout: float = 30) -> T:
    """fn(*args) on a short-lived thread inside network namespace ``name`` (entering one is for good, so never
    on the caller's thread); its result, or its exception raised here."""
    outcome: list[object] = []

    def main() -> None:
        try:
            enter(name)
            outcome.append(fn(*args))
        except BaseException as exc:  # handed to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=main, name=f"egressd-in-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {timeout}s in namespace {name}")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]  # type: ignore[return-value]


def socket_in(name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket made inside network namespace ``name``: it stays there, whichever thread then uses it."""
    return call_in(name, socket.socket, family, kind, timeout=10)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


class Namespace:
    """One network namespace, by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def command(self, cmd: Sequence[str], user: int | None = None) -> list[str]:
        """``cmd`` run inside this namespace (as ``user`` with no groups, when given)."""
        prefix = ["ip", "netns", "exec", self.name]
        if user is not None:
            prefix += ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"]
        return [*prefix, *cmd]

    def run(
        self, cmd: Sequence[str], user: int | None = None, timeout: float = 20, **kw: object
    ) -> subprocess.CompletedProcess:
        """``cmd`` run to its end inside this namespace; output captured as text unless told otherwise."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(cmd, user), timeout=timeout, **kw)  # callers check the result

    def ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def make_socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket inside this namespace, owned by this process's user (see :func:`socket_in`)."""
        return socket_in(self.name, family, kind)

    def set_resolv_conf(self, *nameservers: str) -> None:
        """What ``/etc/resolv.conf`` says inside this namespace (for processes started by :meth:`run`)."""
        directory = Path("/etc/netns") / self.name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text("".join(f"nameserver {ns}\n" for ns in nameservers))


class Pod:
    """The pod and net namespaces, the veth between them, addresses and routes; ``close()`` removes it all."""

    def __init__(self, extra_net_addresses: Sequence[str] = ()) -> None:
        suffix = secrets.token_hex(3)
        self.pod = Namespace(f"egressd-pod-{suffix}")
        self.net = Namespace(f"egressd-net-{suffix}")
        self._made: list[Namespace] = []
        try:
            for ns in (self.pod, self.net):
                _ip("netns", "add", ns.name)
                self._made.append(ns)
                ns.ip("link", "set", "lo", "up")
            veth = f"veth{suffix}"
            _ip("link", "add", veth, "netns", self.pod.name, "type", "veth", "peer", "name", "eth0",
                "netns", self.net.name)
            self.pod.ip("link", "set", veth, "name", "eth0")
            for ns, v4, v6 in ((self.pod, POD_V4, POD_V6), (self.net, NET_V4, NET_V6)):
                ns.ip("addr", "add", f"{v4}/24", "dev", "eth0")
                ns.ip("-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
                ns.ip("link", "set", "eth0", "up")
            self.pod.ip("route", "add", "default", "via", NET_V4)
            self.pod.ip("-6", "route", "add", "default", "via", NET_V6)
            for address in extra_net_addresses:
                self.net.ip("addr", "add", address + ("/128" if ":" in address else "/32"), "dev", "lo")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ns in self._made:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "del", ns.name)
            shutil.rmtree(Path("/etc/netns") / ns.name, ignore_errors=True)
        self._made = []

    def __enter__(self) -> Pod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
