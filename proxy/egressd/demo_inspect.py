"""``egressd demo --inspect``: inspect mode offline, on loopback.

One event loop runs a DNS server and an HTTPS origin for ``api.github.com`` from :mod:`egressd.lab`
(certificates from a throw-away CA), and egressd with an allowlist whose ``api.github.com`` rule has
``inspect:`` (GET under ``/repos/acme/``, POST of an issue there), a throw-away inspection CA
(:func:`egressd.inspect.ca.init`) and the origin's CA as ``--inspect-upstream-ca``. A client that trusts the
inspection CA alone then sends requests through the proxy; each line shows what it saw and the
``egress.request`` record. The origin listens on an ephemeral port, which the rule lists: the worker dials
the address egressd pinned, on that port, with no special dialer.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import uvloop

from egressd.addresses import parse_cidr
from egressd.app import Proxy, configure_logging
from egressd.audit import AuditLog
from egressd.config import Config
from egressd.demo import LOOPBACK, Records
from egressd.inspect import ca as inspect_ca
from egressd.inspect.rules import inspect_unavailable
from egressd.lab import DnsServer, TlsOrigin, make_ca

SERVICE = "payments-api"
NAME = "api.github.com"
RULES = """version: v1
service: payments-api
allow:
  - host: api.github.com
    ports: [{port}]
    inspect:
      - methods: [GET]
        paths: ["/repos/acme/**"]
      - methods: [POST]
        paths: ["/repos/acme/*/issues"]
"""


@dataclass(frozen=True)
class Step:
    title: str
    method: str
    path: str
    expect_status: int
    expect_reason: str


STEPS = (
    Step("allowed: GET a repository of acme", "GET", "/repos/acme/widgets", 200, "allowed"),
    Step("allowed: POST an issue to acme/widgets", "POST", "/repos/acme/widgets/issues", 200, "allowed"),
    Step("refused: POST a gist (the same name, another path)", "POST", "/gists", 403, "request_not_allowed"),
    Step("refused: DELETE a repository of acme", "DELETE", "/repos/acme/widgets", 403, "request_not_allowed"),
    Step("refused: /repos/acme/%2e%2e/other (a dot segment, encoded)", "GET", "/repos/acme/%2e%2e/other", 403,
         "request_not_allowed"),
)


def _client(proxy: tuple[str, int], port: int, step: Step, ctx: ssl.SSLContext) -> str:
    """CONNECT, TLS trusting the inspection CA only, one request; the status line of its answer."""
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(f"CONNECT {NAME}:{port} HTTP/1.1\r\nHost: {NAME}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                break
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            return head.split(b"\r\n", 1)[0].decode(errors="replace")
        with ctx.wrap_socket(sock, server_hostname=NAME) as tls:
            body = b"{}" if step.method == "POST" else b""
            tls.sendall(f"{step.method} {step.path} HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n".encode() + body)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    status, _, rest = answer.decode(errors="replace").partition("\r\n")
    return status + (" / " + rest.rsplit("\r\n\r\n", 1)[-1].strip() if rest else "")


async def run_demo() -> int:
    unavailable = inspect_unavailable()
    if unavailable is not None:
        print(f"egressd demo --inspect: {unavailable}")
        return 2
    origin_ca = make_ca()
    dns = DnsServer({NAME: ("127.0.0.1",)})
    origin = TlsOrigin(origin_ca, names=[NAME], label="demo-origin")
    await dns.start()
    await origin.start()
    records = Records()
    with tempfile.TemporaryDirectory(prefix="egressd-demo-inspect-") as tmp:
        directory = Path(tmp)
        (directory / "allowlists").mkdir()
        (directory / "allowlists" / f"{SERVICE}.yaml").write_text(RULES.format(port=origin.port))
        origin_ca_file = directory / "origin-ca.pem"
        origin_ca.cert_pem.write_to_path(str(origin_ca_file))
        cert, key = inspect_ca.init(directory / "inspect-ca")
        config = Config(
            allowlists=directory / "allowlists", service=SERVICE, listen=("127.0.0.1", 0),
            admin_listen=("127.0.0.1", 0), allow_cidrs=(parse_cidr(LOOPBACK),), resolvers=(dns.address,),
            reload_interval=0, inspect_ca_cert=str(cert), inspect_ca_key=str(key),
            inspect_upstream_ca=str(origin_ca_file),
        )
        proxy = Proxy(config, audit=AuditLog(os.devnull, sink=records.append))
        await proxy.start()
        ctx = ssl.create_default_context(cafile=str(cert))
        failures = 0
        try:
            print(f"{NAME} is allowed for {SERVICE} with inspect: (GET /repos/acme/**, POST /repos/acme/*/issues);"
                  " the client trusts egressd's inspection CA only\n")
            for step in STEPS:
                result = await asyncio.to_thread(_client, proxy.addresses[0], origin.port, step, ctx)
                record = await _request_record(records, step)
                ok = record is not None and record["reason"] == step.expect_reason
                ok = ok and result.startswith(f"HTTP/1.1 {step.expect_status}")
                failures += not ok
                print(f"{'ok ' if ok else 'BAD'} {step.title}\n    client saw: {result[:160]}")
                print("    egress.request: " + json.dumps(_short(record)))
        finally:
            await proxy.stop()
            await origin.stop()
            await dns.stop()
    print(f"\n{len(STEPS) - failures}/{len(STEPS)} requests decided as expected")
    return 0 if failures == 0 else 1


async def _request_record(records: Records, step: Step) -> dict | None:
    """The egress.request record of ``step`` (the worker reports it while the tunnel's own record waits)."""
    try:
        async with asyncio.timeout(10):
            while True:
                for record in records:
                    if record.get("event") == "egress.request" and record.get("method") == step.method and \
                            record.get("path") == step.path:
                        return record
                records.arrived.clear()
                await records.arrived.wait()
    except TimeoutError:
        return None


def _short(record: dict | None) -> dict:
    keep = ("decision", "reason", "method", "path", "status", "rule", "upstream", "detail")
    return {k: record.get(k) for k in keep} if record else {}


def main() -> int:
    configure_logging()
    return uvloop.run(run_demo())
