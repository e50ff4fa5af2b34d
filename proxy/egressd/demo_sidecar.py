"""``egressd demo --sidecar``: sidecar mode in a simulated pod, offline (root: namespaces and iptables).

The demo builds the world of :mod:`egressd.lab.pod` (a pod namespace and a
"net" namespace with a cluster DNS, a public resolver, TLS origins and a
decoy), runs ``egressd init-iptables`` and ``egressd sidecar`` in the pod with
the shipped allowlists for ``payments-api``, then plays an app with no proxy
settings trying every way out, and prints what it saw and egressd's record.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from egressd.lab.netns import NET_V4, NET_V6, call_in
from egressd.lab.pod import DECOY_IP, PUBLIC_DNS, PodLab

SERVICE = "payments-api"
ZONE = {
    "api.stripe.com": (NET_V4, NET_V6),
    "files.stripe.com": (NET_V4,),
    "exfil.example.net": (DECOY_IP,),
}
TLS_NAMES = ("api.stripe.com", "exfil.example.net")
DEADLINE = 15.0


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[PodLab], subprocess.CompletedProcess]
    expect: Callable[[subprocess.CompletedProcess, PodLab], bool]  # what the app saw
    record: Callable[[dict], bool]  # which record belongs to the step
    reason: str


UDP = (
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    f"try:\n    s.sendto(b'quic', ('{NET_V4}', 443)); print('sent')\nexcept PermissionError:\n    print('dropped')\n"
)

STEPS = (
    Step("allowed: curl https://api.stripe.com/ (no proxy settings)",
         lambda w: w.curl("-4", "https://api.stripe.com/v1/charges"),
         lambda out, w: out.returncode == 0 and "origin-v4 saw GET" in out.stdout,
         lambda r: r.get("sni") == "api.stripe.com" and r.get("original_dst") == f"{NET_V4}:443", "allowed"),
    Step("allowed over IPv6: curl -6 https://api.stripe.com/",
         lambda w: w.curl("-6", "https://api.stripe.com/v1/charges"),
         lambda out, w: out.returncode == 0 and "origin-v6 saw GET" in out.stdout,
         lambda r: r.get("original_dst") == f"[{NET_V6}]:443", "allowed"),
    Step("denied name: its lookup gets NXDOMAIN and never leaves the pod",
         lambda w: w.curl("https://exfil.example.net/upload"),
         lambda out, w: out.returncode != 0 and not any(n == "exfil.example.net" for n, _ in w.dns.queries),
         lambda r: r.get("qname") == "exfil.example.net", "not_allowlisted"),
    Step("allowed address, forbidden name (curl --resolve exfil.example.net to api.stripe.com's address)",
         lambda w: w.curl("--resolve", f"exfil.example.net:443:{NET_V4}", "https://exfil.example.net/upload"),
         lambda out, w: out.returncode != 0,
         lambda r: r.get("sni") == "exfil.example.net", "not_allowlisted"),
    Step("allowed name, forbidden address (curl --resolve api.stripe.com to a decoy): egressd dials the real one",
         lambda w: w.curl("--resolve", f"api.stripe.com:443:{DECOY_IP}", "https://api.stripe.com/v1/charges"),
         lambda out, w: out.returncode == 0 and "decoy" not in out.stdout,
         lambda r: r.get("original_dst") == f"{DECOY_IP}:443", "allowed"),
    Step("raw IP, no name: curl -k https://198.51.100.1/",
         lambda w: w.curl("-k", f"https://{NET_V4}/"),
         lambda out, w: out.returncode != 0,
         lambda r: r.get("original_dst") == f"{NET_V4}:443" and r.get("sni") is None, "no_name"),
    Step("UDP to port 443 (QUIC): dropped in the pod",
         lambda w: w.app("/usr/bin/python3", "-c", UDP),
         lambda out, w: out.stdout.strip() == "dropped" and w.sink.count == 0,
         lambda r: True, ""),
    Step("its own DNS server: dig @203.0.113.8 exfil.example.net is answered by egressd's filter",
         lambda w: w.app("dig", "+tries=1", "+time=3", f"@{PUBLIC_DNS}", "exfil.example.net"),
         lambda out, w: "NXDOMAIN" in out.stdout and not w.public.queries,
         lambda r: r.get("qname") == "exfil.example.net", "not_allowlisted"),
)


class Sidecar:
    """``egressd sidecar`` in the pod: its records (a file) and its start-up line (stderr)."""

    def __init__(self, world: PodLab, allowlists: Path) -> None:
        self.audit = world.root / "audit.jsonl"
        args = world.sidecar_args(SERVICE, allowlists.resolve(), "--hello-timeout", "2")
        cmd = world.pod.pod.command([sys.executable, "-m", "egressd", "sidecar", "--audit-log", str(self.audit),
                                     *args])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        end = time.monotonic() + DEADLINE
        while True:
            line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            if line is None:
                raise RuntimeError(f"egressd sidecar exited ({self.proc.wait()}) before it started")
            if '"egressd.started"' in line:
                return

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def records(self) -> list[dict]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

    def wait(self, seen: int, predicate: Callable[[dict], bool]) -> dict | None:
        """The first record after the first ``seen`` that matches, within the deadline."""
        end = time.monotonic() + 5
        while time.monotonic() < end:
            match = next((r for r in self.records()[seen:] if predicate(r)), None)
            if match is not None:
                return match
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)


def _short(record: dict | None) -> dict:
    keep = ("event", "decision", "reason", "host", "sni", "qname", "rcode", "original_dst", "original_dst_in_answer",
            "upstream", "rule")
    return {k: record[k] for k in keep if record and record.get(k) is not None}


def _denials(world: PodLab) -> list[str]:
    from egressd.demo import _scrape

    text = call_in(world.pod.pod.name, _scrape, ("127.0.0.1", 15020))
    return [line for line in text.splitlines() if line.startswith(("egressd_denials_total", "egressd_dns_queries"))]


def main(allowlists: Path) -> int:
    if os.geteuid() != 0:
        print("egressd demo --sidecar needs root: it makes network namespaces and iptables rules", file=sys.stderr)
        return 2
    world = PodLab(ZONE, TLS_NAMES)
    sidecar = None
    failures = 0
    try:
        done = world.init_iptables()
        if done.returncode != 0:
            print(f"egressd init-iptables failed:\n{done.stderr}", file=sys.stderr)
            return 1
        print("pod: egressd init-iptables done; egressd sidecar --service payments-api running as root (proxy UID 0);"
              "\n     the app runs as UID 65534 with no proxy settings\n")
        sidecar = Sidecar(world, allowlists)
        for step in STEPS:
            seen = len(sidecar.records())
            out = step.run(world)
            record = sidecar.wait(seen, step.record) if step.reason else None
            ok = step.expect(out, world) and (not step.reason or (record or {}).get("reason") == step.reason)
            failures += not ok
            said = (out.stdout.strip() or out.stderr.strip()).splitlines()
            said = [line for line in said if "status:" in line] or said  # dig: its header line
            print(f"{'ok ' if ok else 'BAD'} {step.title}\n    app saw: {said[-1][:110] if said else '(nothing)'}")
            if step.reason:
                print("    audit: " + json.dumps(_short(record)))
        print("\ndenial counters (from the sidecar's /metrics):")
        for line in _denials(world):
            print("    " + line)
    finally:
        if sidecar is not None:
            sidecar.stop()
        world.close()
    print(f"\n{len(STEPS) - failures}/{len(STEPS)} outcomes as expected")
    return 0 if failures == 0 else 1
