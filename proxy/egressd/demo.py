"""``egressd demo``: the proxy with the shipped allowlists, offline, on loopback.

The demo starts, on one event loop, a DNS server and an HTTPS origin from
:mod:`egressd.lab` (certificates from a throw-away CA for the allowlisted names),
and egressd serving ``payments-api`` with ``--allow-cidr 127.0.0.0/8`` and the
demo DNS as its resolver. It then sends a few requests through the proxy and
prints each decision with its audit record, then the denial counters.

The lab origin listens on an ephemeral port, not 443, so the demo gives the
engine a dialer that sends the pinned loopback address to the origin's port.
That dialer refuses anything but loopback; the proxy's decisions, resolution
and pinning are the production code. ``hooks.slack.com`` is answered with
169.254.169.254, as a poisoned or rebound DNS answer would be: the proxy must
refuse it without dialling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import uvloop

from egressd.addresses import parse_cidr
from egressd.app import Proxy, configure_logging
from egressd.audit import AuditLog
from egressd.config import Config, parse_hostport
from egressd.connection import dial_tcp
from egressd.hostport import IPAddress
from egressd.lab import DnsServer, TlsOrigin, client_ssl_context, make_ca
from egressd.policy.loader import PolicyError
from egressd.relay import Side

SERVICE = "payments-api"
LOOPBACK = "127.0.0.0/8"
ZONE = {
    "api.stripe.com": ("127.0.0.1",),
    "files.stripe.com": ("127.0.0.1",),
    "hooks.slack.com": ("169.254.169.254",),
}


@dataclass(frozen=True)
class Step:
    title: str
    connect: str
    sni: str | None
    expect_status: int
    expect_reason: str


STEPS = (
    Step("allowed: api.stripe.com on 443", "api.stripe.com:443", "api.stripe.com", 200, "allowed"),
    Step("denied by name: exfil.example.net", "exfil.example.net:443", "exfil.example.net", 403, "not_allowlisted"),
    Step("denied by port: api.stripe.com on 8443", "api.stripe.com:8443", "api.stripe.com", 403, "port_not_allowed"),
    Step("SNI mismatch: CONNECT api.stripe.com, TLS to evil.example.net", "api.stripe.com:443", "evil.example.net",
         200, "sni_mismatch"),
    Step("metadata address: hooks.slack.com answered with 169.254.169.254", "hooks.slack.com:443",
         "hooks.slack.com", 403, "forbidden_address"),
)


def _client(proxy: tuple[str, int], step: Step, ctx: ssl.SSLContext) -> str:
    """A plain blocking client: CONNECT, then TLS and one GET when the proxy said 200."""
    with socket.create_connection(proxy, timeout=5) as sock:
        sock.sendall(f"CONNECT {step.connect} HTTP/1.1\r\nHost: {step.connect}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 200 " not in status_line + " ":
            return status_line
        try:
            with ctx.wrap_socket(sock, server_hostname=step.sni) as tls:
                tls.sendall(f"GET /v1/charges HTTP/1.1\r\nHost: {step.sni}\r\nConnection: close\r\n\r\n".encode())
                answer = tls.recv(4096).decode(errors="replace")
                return status_line + " / origin: " + answer.split("\r\n", 1)[0]
        except (OSError, ssl.SSLError) as exc:
            return status_line + f" / tunnel closed by the proxy ({type(exc).__name__})"


async def run_demo(allowlists: Path, serve: bool, listen: tuple[str, int]) -> int:
    ca = make_ca()
    dns = DnsServer(dict(ZONE))
    origin = TlsOrigin(ca, names=sorted(ZONE), label="demo-origin")
    await dns.start()
    await origin.start()
    records = Records()

    async def dial(ip: IPAddress, port: int) -> Side:
        if not ip.is_loopback:
            raise OSError(f"the demo dials loopback only, not {ip}")
        return await dial_tcp(ip, origin.port)

    config = Config(
        allowlists=allowlists, service=SERVICE, listen=listen if serve else ("127.0.0.1", 0),
        admin_listen=("127.0.0.1", 0), allow_cidrs=(parse_cidr(LOOPBACK),), resolvers=(dns.address,),
        reload_interval=0,
    )
    audit = AuditLog(None if serve else os.devnull, sink=records.append)
    try:
        proxy = Proxy(config, audit=audit, dial=dial)
    except PolicyError as exc:
        print(f"egressd demo: the allowlists do not load:\n{exc}", file=sys.stderr)
        return 2
    await proxy.start()
    failures = 0
    try:
        if serve:
            return await _serve(proxy, ca)
        ctx = client_ssl_context(ca)
        for step in STEPS:
            before = len(records)
            result = await asyncio.to_thread(_client, proxy.addresses[0], step, ctx)
            record = await records.wait(before)
            ok = record is not None and record["reason"] == step.expect_reason
            ok = ok and result.startswith(f"HTTP/1.1 {step.expect_status}")
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} {step.title}\n    client saw: {result}")
            print("    audit: " + json.dumps(_short(record)))
        print("\ndenial counters (from /metrics):")
        text = await asyncio.to_thread(_scrape, proxy.addresses[1])
        for line in text.splitlines():
            if line.startswith("egressd_denials_total"):
                print("    " + line)
    finally:
        await proxy.stop()
        await origin.stop()
        await dns.stop()
    print(f"\n{len(STEPS) - failures}/{len(STEPS)} decisions as expected")
    return 0 if failures == 0 else 1


class Records(list):
    """The audit records of the demo, with an event set each time one arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def append(self, record: dict) -> None:
        super().append(record)
        self.arrived.set()

    async def wait(self, n: int) -> dict | None:
        """The n-th record (from 0); records are written when a connection ends."""
        async with asyncio.timeout(5):
            while len(self) <= n:
                self.arrived.clear()
                await self.arrived.wait()
        return self[n]


def _short(record: dict | None) -> dict:
    keep = ("decision", "reason", "host", "port", "sni", "rule", "resolved", "upstream", "detail", "bytes_up",
            "bytes_down")
    return {k: record.get(k) for k in keep} if record else {}


def _scrape(admin: tuple[str, int]) -> str:
    with socket.create_connection(admin, timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode(errors="replace")


async def _serve(proxy: Proxy, ca) -> int:
    with tempfile.NamedTemporaryFile("wb", prefix="egressd-demo-ca-", suffix=".pem", delete=False) as fh:
        fh.write(ca.cert_pem.bytes())
    host, port = proxy.addresses[0]
    print(
        f"egressd demo proxy on {host}:{port} (admin {proxy.addresses[1][0]}:{proxy.addresses[1][1]}), "
        f"service {SERVICE}; names served by the demo: {', '.join(sorted(ZONE))}\n"
        f"try: curl -x http://{host}:{port} --cacert {fh.name} https://api.stripe.com/v1/charges\n"
        "audit records follow on stdout; Ctrl-C to stop",
        file=sys.stderr,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(OSError):
        os.unlink(fh.name)
    return 0


def main(allowlists: Path, serve: bool = False, listen: str = "127.0.0.1:3128") -> int:
    configure_logging()
    return uvloop.run(run_demo(allowlists, serve, parse_hostport(listen, "--listen", 3128)))
