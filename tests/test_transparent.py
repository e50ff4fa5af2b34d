"""The transparent listener end to end: iptables REDIRECT in a pod namespace, real clients, origins in another.

::

    pod namespace                                          net namespace ("the internet")
    app (UID 65534: curl, openssl, python3)                TLS origins  203.0.113.10, 2001:db8:1::10 (real)
      │ iptables -t nat OUTPUT --uid-owner 65534                        203.0.113.66 (impostor, same names)
      │   -j REDIRECT --to-ports 15001 (and ip6tables)     HTTP origin  203.0.113.20:80
      ▼                                                    server-first 203.0.113.30:2222 (banner, then echo)
    egressd (root) 127.0.0.1:15001, [::1]:15001 ─veth──▶   DNS          203.0.113.53:53

Only documentation addresses, only inside namespaces made here (and removed
at the end): nothing can leave the machine. egressd re-admits exactly those
ranges with ``--allow-cidr``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import service_yaml
from egressd.lab import DnsServer, HttpOrigin, LabThread, TlsOrigin, make_ca
from egressd.lab._serving import StreamServer, read_some
from egressd.lab.netns import DOC_CIDRS, Pod
from harness import ProxyProcess, wait_for, write_allowlists

APP_UID = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter under /root is not readable by the app's UID
REAL, REAL6, IMPOSTOR = "203.0.113.10", "2001:db8:1::10", "203.0.113.66"  # (outside the veth's on-link /64)
WEB, BANNER, DNS = "203.0.113.20", "203.0.113.30", "203.0.113.53"
BANNER_PORT, SHUT_PORT = 2222, 2223  # the cidr: rule allows BANNER on 2222 only
BUSY_PORT = 7000  # redirected to a second egressd that serves one connection at a time
BANNER_LINE = b"SSH-2.0-lab\r\n"

RULES = f"""  - host: allowed.test
  - host: web.test
    ports: [80]
  - cidr: {BANNER}/32
    ports: [{BANNER_PORT}]
"""
ZONE = {
    "allowed.test": (REAL, REAL6),
    "forbidden.test": (REAL,),
    "web.test": (WEB,),
    "other.test": (WEB,),
}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(tool) for tool in ("ip", "iptables", "ip6tables", "setpriv", "curl", "openssl"))
    or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, iproute2, iptables, setpriv, curl, openssl and /usr/bin/python3 (install.sh installs them)",
)


class BannerOrigin(StreamServer):
    """A server-first service: sends a banner line on accept, then echoes what it receives."""

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serial: int) -> None:
        writer.write(BANNER_LINE)
        await writer.drain()
        while data := await read_some(reader):
            writer.write(data)
            await writer.drain()


@dataclass
class World:
    pod: Pod
    proxy: ProxyProcess
    busy: ProxyProcess  # --max-connections 1, on port 15002
    ca_file: str
    real: TlsOrigin
    real6: TlsOrigin
    impostor: TlsOrigin
    web: HttpOrigin
    banner: BannerOrigin
    dns: DnsServer

    def app(self, *cmd: str, stdin: str = "") -> tuple[int, str, str]:
        """Run cmd in the pod as the app's UID (its TCP is redirected); (exit code, stdout, stderr)."""
        done = self.pod.pod.run(list(cmd), user=APP_UID, input=stdin, timeout=30)
        return done.returncode, done.stdout, done.stderr

    def python(self, script: str, *args: str) -> tuple[int, str, str]:
        return self.app(SYSTEM_PYTHON, "-c", script, *args)

    def curl(self, *args: str) -> tuple[int, str, str]:
        return self.app("curl", "-sS", "--max-time", "10", "--cacert", self.ca_file, *args)

    def metric(self, name: str, admin: int = 15020, **labels: str) -> float:
        """The sum of an egressd's /metrics samples with these labels (read in the pod as root, whose traffic is
        not redirected)."""
        done = self.pod.pod.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{admin}/metrics"])
        assert done.returncode == 0, done.stderr
        total = 0.0
        for line in done.stdout.splitlines():
            if line.startswith(name + "{"):
                sample, value = line.rsplit(" ", 1)
                if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                    total += float(value)
        return total


def redirect(pod: Pod, to_port: int, *match: str) -> None:
    """REDIRECT the app UID's outbound TCP (narrowed by ``match``) to to_port, for IPv4 and IPv6, inserted first."""
    for tool in ("iptables", "ip6tables"):
        cmd = [tool, "-t", "nat", "-I", "OUTPUT", "-p", "tcp", *match, "-m", "owner", "--uid-owner", str(APP_UID),
               "-j", "REDIRECT", "--to-ports", str(to_port)]
        done = pod.pod.run(cmd)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"


def proxy_args(directory: Path, listen: int, admin: str, *extra: str) -> list[str]:
    cidrs = [arg for cidr in DOC_CIDRS for arg in ("--allow-cidr", cidr)]
    return [
        "--listen", "off", "--transparent-listen", f"127.0.0.1:{listen}", "--transparent-listen", f"[::1]:{listen}",
        "--admin-listen", admin, "--workers", "1", "--allowlists", str(directory), "--service", "svc",
        "--resolver", f"{DNS}:53", *cidrs, "--hello-timeout", "1", "--connect-timeout", "3", "--dns-timeout", "3",
        "--reload-interval", "0", *extra,
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("transparent")
    shared = Path(tempfile.mkdtemp(prefix="egressd-transparent-"))  # readable by the app's UID
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, shared, ignore_errors=True)
        pod = Pod(extra_net_addresses=(REAL, REAL6, IMPOSTOR, WEB, BANNER, DNS))
        stack.callback(pod.close)
        shared.chmod(0o755)
        redirect(pod, 15001)
        redirect(pod, 15002, "--dport", f"{BUSY_PORT}:{BUSY_PORT + 1}")
        lab = stack.enter_context(LabThread(netns=pod.net.name))
        ca = make_ca()
        ca_file = shared / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ca_file.chmod(0o644)
        names = ("allowed.test", "forbidden.test")
        real = lab.serve(TlsOrigin(ca, names, label="real"), host=REAL, port=443)
        real6 = lab.serve(TlsOrigin(ca, names, label="real-v6"), host=REAL6, port=443)
        impostor = lab.serve(TlsOrigin(ca, names, label="impostor"), host=IMPOSTOR, port=443)
        web = lab.serve(HttpOrigin(label="web"), host=WEB, port=80)
        banner = lab.serve(BannerOrigin(), host=BANNER, port=BANNER_PORT)
        dns = lab.serve(DnsServer(ZONE), host=DNS, port=53)
        for address in (REAL, REAL6):  # neighbour discovery done before any test (root is not redirected)
            warm = f"import socket; socket.create_connection(({address!r}, 443), timeout=10).close()"
            done = pod.pod.run([SYSTEM_PYTHON, "-c", warm])
            assert done.returncode == 0, done.stderr
        directory = write_allowlists(tmp / "allowlists", {"svc.yaml": service_yaml(RULES)})
        wrap = ["ip", "netns", "exec", pod.pod.name]
        proxy = ProxyProcess(proxy_args(directory, 15001, "127.0.0.1:15020"), tmp / "audit.jsonl", wrap=wrap)
        stack.callback(proxy.stop)
        busy_args = proxy_args(directory, 15002, "127.0.0.1:15021", "--max-connections", "1", "--hello-timeout", "3")
        busy = ProxyProcess(busy_args, tmp / "busy.jsonl", wrap=wrap)
        stack.callback(busy.stop)
        yield World(pod, proxy, busy, str(ca_file), real, real6, impostor, web, banner, dns)


@pytest.fixture
def records(world: World) -> Iterator[Callable[[int], list[dict]]]:
    """``records(n)``: wait for the n records this test's connections make, and return exactly those."""
    before = len(world.proxy.records())

    def new(n: int = 1) -> list[dict]:
        found = world.proxy.wait_records(before + n)[before:]
        assert len(found) == n, json.dumps(found, indent=1)
        return found

    yield new


def test_allowed_name_over_ipv4(world: World, records) -> None:
    """curl to an allowed name on its IPv4 address is decided by SNI, dialled at egressd's own answer and
    recorded once."""
    allowed = world.metric("egressd_connections_total", listener="transparent", decision="allow", reason="allowed")
    code, out, err = world.curl("--resolve", f"allowed.test:443:{REAL}", "https://allowed.test/hello")
    assert code == 0, err
    assert out == "real saw GET /hello host=allowed.test sni=allowed.test\n"
    [rec] = records()
    assert (rec["listener"], rec["protocol"], rec["decision"], rec["reason"]) == ("transparent", "tls", "allow",
                                                                                   "allowed")
    assert (rec["host"], rec["port"], rec["sni"], rec["ech"]) == ("allowed.test", 443, "allowed.test", False)
    assert (rec["original_dst"], rec["original_dst_in_answer"]) == (f"{REAL}:443", True)
    assert rec["upstream"] == f"{REAL}:443" and rec["resolved"] == [REAL, REAL6]
    assert rec["client"].startswith("198.51.100.2:") and rec["status"] is None
    assert rec["bytes_up"] > 200 and rec["bytes_down"] > 200 and rec["rule"].endswith("svc.yaml:5")
    after = world.metric("egressd_connections_total", listener="transparent", decision="allow", reason="allowed")
    assert after == allowed + 1


def test_allowed_name_over_ipv6(world: World, records) -> None:
    """curl over IPv6 reaches the allowed name through the [::1] listener, at the IPv6 answer it dialled."""
    code, out, err = world.curl("-6", "--resolve", f"allowed.test:443:[{REAL6}]", "https://allowed.test/six")
    assert code == 0, err
    assert out == "real-v6 saw GET /six host=allowed.test sni=allowed.test\n"
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["sni"]) == ("allow", "allowed", "allowed.test")
    assert (rec["original_dst"], rec["original_dst_in_answer"]) == (f"[{REAL6}]:443", True)
    assert rec["client"].startswith("[2001:db8::2]:") and rec["upstream"] == f"[{REAL6}]:443"


def test_plain_http_each_request_decided(world: World, records) -> None:
    """Plain HTTP is named by Host per request: a kept-alive connection's second request, to a denied Host,
    gets the explicit listener's 403."""
    script = r"""
import socket
s = socket.create_connection(("203.0.113.20", 80), timeout=10)
s.sendall(b"GET /one HTTP/1.1\r\nHost: web.test\r\n\r\n")
data = b""
while b"web saw" not in data or not data.endswith(b"\n"):
    data += s.recv(65536)
s.sendall(b"GET /two HTTP/1.1\r\nHost: other.test\r\n\r\n")
while chunk := s.recv(65536):
    data += chunk
print(data.decode())
"""
    code, out, err = world.python(script)
    assert code == 0, err
    first, _, second = out.partition("HTTP/1.1 403 Forbidden")
    assert first.startswith("HTTP/1.1 200 OK") and "web saw GET /one host=web.test sni=-" in first
    assert "X-Egressd-Reason: not_allowlisted" in second and "egressd denied other.test:80" in second
    one, two = records(2)
    assert one["conn_id"] == two["conn_id"] and (one["request"], two["request"]) == (1, 2)
    assert (one["protocol"], one["host"], one["port"], one["decision"], one["status"]) == (
        "http", "web.test", 80, "allow", 200)
    assert (two["protocol"], two["host"], two["decision"], two["reason"], two["status"]) == (
        "http", "other.test", "deny", "not_allowlisted", 403)
    assert one["original_dst"] == two["original_dst"] == f"{WEB}:80"
    assert (one["original_dst_in_answer"], two["original_dst_in_answer"]) == (True, None)
    assert "other.test" not in [name for name, _ in world.dns.queries]


def test_host_naming_another_port_is_host_mismatch(world: World, records) -> None:
    """A Host header naming another port than the one the client dialled gets 403 host_mismatch."""
    code, out, err = world.curl("-i", "-H", "Host: web.test:8080", f"http://{WEB}/")
    assert code == 0, err
    assert out.startswith("HTTP/1.1 403") and "X-Egressd-Reason: host_mismatch" in out
    [rec] = records()
    assert (rec["reason"], rec["host"], rec["port"], rec["original_dst"]) == ("host_mismatch", "web.test", 80,
                                                                            f"{WEB}:80")


def test_denied_name_is_refused_with_an_alert(world: World, records) -> None:
    """A TLS connection naming a name outside the allowlist gets an access_denied alert, and the name is never
    resolved nor anything sent upstream."""
    code, _, err = world.curl("--resolve", f"forbidden.test:443:{IMPOSTOR}", "https://forbidden.test/")
    assert code != 0 and "alert access denied" in err, err
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["sni"], rec["host"]) == ("deny", "not_allowlisted",
                                                                          "forbidden.test", "forbidden.test")
    assert (rec["original_dst"], rec["original_dst_in_answer"], rec["upstream"]) == (f"{IMPOSTOR}:443", None, None)
    assert rec["bytes_up"] == 0 and rec["status"] is None
    assert "forbidden.test" not in [name for name, _ in world.dns.queries]


def test_forbidden_sni_at_an_allowed_names_address_is_refused(world: World, records) -> None:
    """openssl s_client to the allowed name's shared address with a forbidden SNI is refused by name."""
    code, out, _ = world.app(
        "openssl", "s_client", "-connect", f"{REAL}:443", "-servername", "forbidden.test", "-CAfile", world.ca_file,
    )
    assert code != 0 and "BEGIN CERTIFICATE" not in out
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["sni"]) == ("deny", "not_allowlisted", "forbidden.test")
    assert rec["original_dst"] == f"{REAL}:443" and (rec["upstream"], rec["bytes_up"]) == (None, 0)


def test_allowed_sni_at_a_forbidden_address_reaches_the_real_one(world: World, records) -> None:
    """A client that dials another address with an allowed SNI reaches only the allowed name's own address,
    and the record says the address it dialled was not among the answers."""
    seen = world.impostor.connections
    code, out, err = world.curl("--resolve", f"allowed.test:443:{IMPOSTOR}", "https://allowed.test/where")
    assert code == 0, err
    assert out == "real saw GET /where host=allowed.test sni=allowed.test\n"
    [rec] = records()
    assert (rec["decision"], rec["original_dst"], rec["original_dst_in_answer"]) == ("allow", f"{IMPOSTOR}:443",
                                                                                     False)
    assert rec["upstream"] == f"{REAL}:443"
    assert world.impostor.connections == seen


def test_tls_without_sni_is_no_name(world: World, records) -> None:
    """A ClientHello without a server name, to an address no cidr: rule allows, is refused no_name."""
    code, _, _ = world.app("openssl", "s_client", "-connect", f"{REAL}:443", "-noservername")
    assert code != 0
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["protocol"], rec["sni"]) == ("deny", "no_name", "tls", None)


SEND_AND_READ = r"""
import socket, sys
data = b""
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    if sys.argv[3]:
        s.sendall(bytes.fromhex(sys.argv[3]))
    while chunk := s.recv(65536):
        data += chunk
except ConnectionResetError:
    print("reset")
print(data.hex() or "closed")
"""


def test_raw_bytes_to_an_address_without_a_rule_are_no_name(world: World, records) -> None:
    """Bytes that are neither TLS nor HTTP, to an ip:port no cidr: rule allows, are refused no_name: closed,
    nothing dialled."""
    seen = world.banner.connections
    code, out, err = world.python(SEND_AND_READ, BANNER, str(SHUT_PORT), b"\x00\x01binary".hex())
    assert code == 0, err
    assert out.strip() == "closed"  # a clean close, nothing answered
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["protocol"]) == ("deny", "no_name", "tcp")
    assert rec["original_dst"] == f"{BANNER}:{SHUT_PORT}" and rec["upstream"] is None
    assert world.banner.connections == seen


def test_silent_client_is_no_name_after_the_hello_timeout(world: World, records) -> None:
    """A client that sends nothing to an address without a cidr: rule is closed after --hello-timeout, no_name."""
    code, out, err = world.python(SEND_AND_READ, BANNER, str(SHUT_PORT), "")
    assert code == 0, err
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["protocol"]) == ("deny", "no_name", None)
    assert "sent nothing within 1s" in rec["detail"] and rec["duration_ms"] >= 900


def test_server_first_service_allowed_by_cidr(world: World, records) -> None:
    """A service that speaks first, allowed by a cidr: rule, is dialled at once: its banner arrives before the
    client sends a byte."""
    script = r"""
import socket
s = socket.create_connection(("203.0.113.30", 2222), timeout=10)
banner = s.recv(100)
s.sendall(b"ping\n")
echo = s.recv(100)
s.close()
print(repr(banner), repr(echo))
"""
    code, out, err = world.python(script)
    assert code == 0, err
    assert out.strip() == f"{BANNER_LINE!r} {b'ping' + chr(10).encode()!r}"
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["protocol"], rec["host"], rec["port"]) == (
        "allow", "allowed", "tcp", BANNER, BANNER_PORT)
    assert (rec["original_dst"], rec["original_dst_in_answer"]) == (f"{BANNER}:{BANNER_PORT}", True)
    assert rec["upstream"] == f"{BANNER}:{BANNER_PORT}" and rec["rule"].endswith("svc.yaml:8")
    assert rec["bytes_up"] == 5 and rec["bytes_down"] == len(BANNER_LINE) + 5


def with_extension(record: bytes, extension: bytes) -> bytes:
    """A one-record ClientHello with ``extension`` appended to its extensions (the three lengths fixed)."""
    body = record[9:]
    pos = 34
    pos += 1 + body[pos]  # session_id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + body[pos]  # compression_methods
    block = int.from_bytes(body[pos : pos + 2], "big") + len(extension)
    body = body[:pos] + block.to_bytes(2, "big") + body[pos + 2 :] + extension
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return record[:3] + len(message).to_bytes(2, "big") + message


def client_hello(name: str) -> bytes:
    """The first flight of a real TLS client for ``name``."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_ech_hello_is_decided_on_its_outer_sni_and_flagged(world: World, records) -> None:
    """A ClientHello with a (GREASE) encrypted_client_hello extension is decided on its outer SNI, reaches the
    origin, and the record says ech."""
    grease = struct.pack("!HH", 0xFE0D, 6 + 2 + 32 + 2 + 144) + b"\x00\x00\x01\x00\x01\x5b"
    grease += struct.pack("!H", 32) + os.urandom(32) + struct.pack("!H", 144) + os.urandom(144)
    hello = with_extension(client_hello("allowed.test"), grease)
    script = r"""
import socket, sys
s = socket.create_connection(("203.0.113.10", 443), timeout=10)
s.sendall(bytes.fromhex(sys.argv[1]))
print(s.recv(5).hex())
"""
    code, out, err = world.python(script, hello.hex())
    assert code == 0, err
    assert out.strip().startswith("160303")  # the origin's ServerHello came back
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["sni"], rec["ech"]) == ("allow", "allowed", "allowed.test", True)
    assert rec["bytes_up"] >= len(hello) and rec["upstream"] == f"{REAL}:443"


def test_connection_to_the_listener_itself_is_refused(world: World, records) -> None:
    """A client dialling 127.0.0.1:15001 itself is refused forbidden_address and egressd connects nowhere."""
    request = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
    code, out, err = world.python(SEND_AND_READ, "127.0.0.1", "15001", request.hex())
    assert code == 0, err
    assert out.strip() == "closed"
    [rec] = records()
    assert (rec["decision"], rec["reason"], rec["original_dst"]) == ("deny", "forbidden_address", "127.0.0.1:15001")
    assert "never connects to itself" in rec["detail"] and rec["upstream"] is None


def test_refused_at_admission_is_reset_and_recorded(world: World) -> None:
    """Past --max-connections a redirected client is reset at once (no 503 on an unknown protocol) and
    recorded overloaded."""
    before = len(world.busy.records())
    holder = world.pod.pod.command([SYSTEM_PYTHON, "-c", SEND_AND_READ, BANNER, str(BUSY_PORT), ""], user=APP_UID)
    held = subprocess.Popen(holder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: world.metric("egressd_active_connections", admin=15021, service="svc") == 1,
                 what="the first connection to be served")
        code, out, err = world.python(SEND_AND_READ, BANNER, str(BUSY_PORT + 1), "")
    finally:
        held.wait(15)
    assert code == 0, err
    assert out.startswith("reset")
    refused, held_rec = world.busy.wait_records(before + 2)[before:]
    assert (refused["decision"], refused["reason"], refused["status"]) == ("deny", "overloaded", None)
    assert refused["original_dst"] == f"{BANNER}:{BUSY_PORT + 1}" and "--max-connections" in refused["detail"]
    assert (held_rec["reason"], held_rec["original_dst"]) == ("no_name", f"{BANNER}:{BUSY_PORT}")


def test_every_connection_and_request_is_recorded_once(world: World) -> None:
    """Across this module every connection (every plain-HTTP request) has exactly one record, and the
    connection counter of the transparent listener counts each once."""
    code, _, err = world.curl("--resolve", f"allowed.test:443:{REAL}", "https://allowed.test/once")
    assert code == 0, err
    recs = wait_for(lambda: (r := world.proxy.records()) and
                    len(r) == world.metric("egressd_connections_total", listener="transparent") and r,
                    what="records and counters to agree")
    keys = [(r["conn_id"], r["request"]) for r in recs]
    assert len(keys) == len(set(keys)) >= 1
    assert {r["listener"] for r in recs} == {"transparent"}
