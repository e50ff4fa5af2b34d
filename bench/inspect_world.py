"""The files and systems the inspect-mode benchmark measures: certificates, allowlists, and each system started
(egressd with and without an ``inspect:`` rule, mitmdump, direct) with the origin and the load generator of
:mod:`bench.inspect_load` on the client core."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from bench import phases, runner
from bench.inspect_load import BODY, NAME, ORIGIN_PORT, PATH, SERVICE, Failed, _whole, merge
from bench.procs import BenchError, Proc, port_open, tree_cpu, tree_rss, wait_until
from bench.proxies import START_TIMEOUT, Started, _started_line, egressd_command

EGRESSD_PORT = 13128
MITM_PORT = 13131


def write_certs(run_dir: Path) -> dict[str, Path]:
    """The origin's CA and leaf (trustme), egressd's inspection CA, and a CA of the same kind (EC P-256) for
    mitmdump's confdir, so both interceptors sign the same kind of leaf."""
    import trustme

    from egressd.inspect import ca

    origin = trustme.CA()
    leaf = origin.issue_cert(NAME)
    out = {"origin_ca": run_dir / "origin-ca.pem", "origin_cert": run_dir / "origin-cert.pem",
           "origin_key": run_dir / "origin-key.pem"}
    origin.cert_pem.write_to_path(str(out["origin_ca"]))
    leaf.private_key_pem.write_to_path(str(out["origin_key"]))
    out["origin_cert"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    out["inspect_cert"], out["inspect_key"] = ca.init(run_dir / "inspect-ca")
    mitm_cert, mitm_key = ca.init(run_dir / "mitm-ca", common_name="bench mitmdump CA")
    confdir = run_dir / "mitm-conf"
    confdir.mkdir(mode=0o700)
    (confdir / "mitmproxy-ca.pem").write_bytes(mitm_key.read_bytes() + mitm_cert.read_bytes())
    out["mitm_cert"], out["mitm_conf"] = mitm_cert, confdir
    return out


def write_allowlists(run_dir: Path, service: str) -> dict[str, Path]:
    """Two policies for the one name: ``plain`` (a blind tunnel) and ``inspect`` (GET /bench/** inspected)."""
    head = f"version: v1\nservice: {service}\nmode: enforce\nallow:\n  - host: {NAME}\n    ports: [{ORIGIN_PORT}]\n"
    inspect = '    inspect:\n      - methods: [GET]\n        paths: ["/bench/**"]\n'
    dirs = {}
    for kind, extra in (("plain", ""), ("inspect", inspect)):
        dirs[kind] = run_dir / f"allowlists-{kind}"
        dirs[kind].mkdir()
        (dirs[kind] / f"{service}.yaml").write_text(head + extra)
    return dirs


def one_request(proxy: tuple[str, int] | None, cafile: Path, path: str = PATH, timeout: float = 30.0
                ) -> dict[str, Any]:
    """One new tunnel and one GET, blocking (the first inspected tunnel, and a check that the client trusts only
    the CA it should; the origin's ``/stats``): the status, the issuer of the certificate the client saw, the body."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    target = f"{NAME}:{ORIGIN_PORT}"
    with socket.create_connection(proxy or ("127.0.0.1", ORIGIN_PORT), timeout=timeout) as raw:
        if proxy is not None:
            raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192 and (chunk := raw.recv(4096)):
                head += chunk
            if head[9:12] != b"200":
                raise Failed(f"CONNECT {target} got {head[:80]!r}")
        with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            issuer = dict(x[0] for x in tls.getpeercert()["issuer"])
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            data = b""
            while (chunk := tls.recv(65536)) and not _whole(data := data + chunk):
                pass
    return {"status": data[9:12].decode(errors="replace"),
            "issuer": issuer.get("commonName") or issuer.get("organizationName"),
            "body": data.partition(b"\r\n\r\n")[2].decode(errors="replace")}


class World:
    """The run directory's files, the DNS server, the origin, and how each system is started and loaded."""

    def __init__(self, run_dir: Path, params: Any, bench: phases.Bench) -> None:  # params: bench.inspect.Params
        self.run_dir, self.params, self.bench = run_dir, params, bench
        self.files = write_certs(run_dir)
        self.allowlists = write_allowlists(run_dir, SERVICE)
        self.cafile = {"direct": self.files["origin_ca"], "plain": self.files["origin_ca"],
                       "inspected": self.files["inspect_cert"], "mitmproxy": self.files["mitm_cert"]}
        from egressd.lab import DnsServer, LabThread  # not in the load generator's processes

        self.lab = LabThread().start()
        self.dns = self.lab.serve(DnsServer({NAME: ("127.0.0.1",)}, ttl=300)).address
        cmd = [sys.executable, "-m", "bench.inspect_load", "origin", "--cert", str(self.files["origin_cert"]),
               "--key", str(self.files["origin_key"])]
        self.origin = Proc("origin", cmd, run_dir / "origin.log", cpus=bench.client_cpus, lines=True)
        if '"ready"' not in self.origin.next_line(runner.SETUP_TIMEOUT):
            raise BenchError(f"the origin did not start:\n{self.origin.log_tail()}")
        self._n = 0

    def stop(self) -> None:
        self.origin.stop()
        self.lab.stop()

    def start(self, system: str, tag: str) -> Started:
        if system == "direct":
            return Started("direct", None, None)
        log = self.run_dir / f"{system}-{tag}.log"
        if system == "mitmproxy":
            cmd = [str(Path(sys.executable).with_name("mitmdump")), "-q", "--listen-host", "127.0.0.1",
                   "--listen-port", str(MITM_PORT), "--set", f"confdir={self.files['mitm_conf']}",
                   "--set", f"ssl_verify_upstream_trusted_ca={self.files['origin_ca']}",
                   "--set", "connection_strategy=lazy", "--set", "upstream_cert=false"]
            proc = Proc(f"mitmdump-{tag}", cmd, log, cpus=self.bench.proxy_cpus)
            started = Started("mitmproxy", proc, ("127.0.0.1", MITM_PORT), [log])
            wait = (lambda: port_open("127.0.0.1", MITM_PORT), "mitmdump's port")
        else:
            audit = self.run_dir / f"{system}-{tag}.audit.jsonl"
            kind = "inspect" if system == "inspected" else "plain"
            cmd = [*egressd_command(), "run", "--workers", "1", "--listen", f"127.0.0.1:{EGRESSD_PORT}",
                   "--admin-listen", "127.0.0.1:0", "--allowlists", str(self.allowlists[kind]), "--service",
                   SERVICE, "--resolver", f"{self.dns[0]}:{self.dns[1]}", "--allow-cidr", "127.0.0.0/8",
                   "--audit-log", str(audit), "--inspect-ca-cert", str(self.files["inspect_cert"]),
                   "--inspect-ca-key", str(self.files["inspect_key"]),
                   "--inspect-upstream-ca", str(self.files["origin_ca"])]
            proc = Proc(f"egressd-{system}-{tag}", cmd, log, cpus=self.bench.proxy_cpus)
            started = Started(system, proc, ("127.0.0.1", EGRESSD_PORT), [log], audit)
            wait = (lambda: _started_line(log), "egressd's 'egressd.started' line")
        try:
            wait_until(wait[0], START_TIMEOUT, wait[1], proc.alive)
        except BenchError as exc:
            proc.stop()
            raise BenchError(f"{system} did not start: {exc}\n{started.log_tails()}") from None
        return started

    def first_request(self, system: str, started: Started) -> dict[str, Any]:
        """One new tunnel and one GET (blocking, from this process); the certificate's issuer must be the CA this
        system's clients trust (egressd's for an inspected tunnel, the origin's for a plain one)."""
        t0 = time.perf_counter()
        got = one_request(started.address, self.cafile[system])
        want = {"inspected": "egressd inspection CA", "mitmproxy": "bench mitmdump CA"}.get(system, "trustme")
        if got["status"] != "200" or got["body"] != BODY.decode() or not str(got["issuer"]).startswith(want):
            raise BenchError(f"{system}: first request: {got}, expected 200 with a certificate from {want}")
        return {**got, "ms": round(1000 * (time.perf_counter() - t0), 1)}

    def origin_connections(self) -> int:
        """Connections the origin has accepted so far (this question's own included)."""
        return int(one_request(None, self.files["origin_ca"], "/stats")["body"])

    def load(self, system: str, started: Started, mode: str, concurrency: int, procs: int, warmup: float,
             duration: float, *extra: str) -> dict[str, Any]:
        """One load phase: ``procs`` generator processes share ``concurrency`` connections; requests/s in the
        window, latency percentiles, the CPU used meanwhile, and the connections the origin accepted."""
        accepted = self.origin_connections()
        t0 = time.monotonic() + self.params.start_margin
        proxy = "direct" if started.address is None else "{}:{}".format(*started.address)
        loads = []
        for i in range(procs):
            self._n += 1
            share = concurrency // procs + (1 if i < concurrency % procs else 0)
            cmd = [sys.executable, "-m", "bench.inspect_load", "load", "--proxy", proxy, "--cafile",
                   str(self.cafile[system]), "--mode", mode, "--concurrency", str(share), "--t0", repr(t0),
                   "--warmup", str(warmup), "--duration", str(duration), *extra]
            loads.append(Proc(f"load-{self._n}", cmd, self.run_dir / f"load-{self._n}-{system}-{mode}.log",
                              cpus=self.bench.client_cpus, lines=True))
        main = [started.proc.pid] if started.proc is not None else []  # egressd without its worker
        try:
            pids = [proc.pid for proc in loads]
            time.sleep(max(0.0, t0 + warmup - time.monotonic()))
            before, main_before = phases.Sampler(self.bench, started, pids), tree_cpu(main)
            time.sleep(max(0.0, t0 + warmup + duration - time.monotonic()))
            use = phases.usage(before, phases.Sampler(self.bench, started, pids))
            use["main_cpu_s"] = tree_cpu(main) - main_before
            results = [json.loads(proc.next_line(20.0)) for proc in loads]
        finally:
            for proc in loads:
                proc.stop()
        out = merge(results, use, duration, warmup, started.proc is not None)
        out["origin_connections"] = self.origin_connections() - accepted - 1
        out["origin_connections_per_request"] = out["origin_connections"] / max(out["total"], 1)
        return out

    def rss(self, started: Started) -> dict[str, Any]:
        """The system's process tree RSS once it holds still (two looks 0.2 s apart within 64 KiB, up to 5 s),
        and its parts: the main process and its children (egressd's inspection worker)."""
        if started.proc is None:
            return {}
        last, deadline = started.proc.rss_kib(), time.monotonic() + 5.0
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = started.proc.rss_kib()
            if abs(now - last) <= 64:
                break
            last = now
        tree = started.proc.tree()
        main = tree_rss([started.proc.pid])
        return {"rss_kib": tree_rss(tree), "main_kib": main, "children_kib": tree_rss(tree) - main,
                "processes": len(tree)}


