"""One benchmark session: set up the world, measure every system in every run, tear everything down.

::

    run dir (configs) ─▶ DNS (LabThread, client core) ─▶ origins + nginx (client core)
       for each run:  for each system (direct first: it is the latency baseline):
           start it (proxy core) ─▶ warm-up ─▶ idle RSS ─▶ tunnels/s ─▶ latency ─▶ bulk ─▶ wrk ─▶ records ─▶ stop
       egressd --workers 2 (both cores), tunnels/s only, when egressd has --workers
    ─▶ medians, ratios, table, JSON

A phase that fails is recorded with its message and the tail of the system's
log, and the session goes on. Every process started is stopped in ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import phases, proxies, records, scenario
from bench.phases import Bench, Params
from bench.procs import BenchError, Proc, port_open, run_bounded, wait_until
from egressd.lab import DnsServer, LabThread

HERE = Path(__file__).resolve().parent
SETUP_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def stopped_by(session: Session, exc: KeyboardInterrupt | BenchError) -> None:
    """A session cut short (Ctrl-C, SIGTERM, a set-up that failed): say so and record it as a failure; the
    caller's ``finally`` stops everything started."""
    if isinstance(exc, KeyboardInterrupt):
        log("interrupted: stopping everything started")
        session.failures.append("interrupted")
    else:
        log(f"set-up failed: {exc}")
        session.failures.append(f"set-up: {exc}")


def write_world(run_dir: Path) -> None:
    """Every generated file: allowlist, hosts, proxy configs and filters, nginx, wrk script."""
    rules = scenario.rules()
    (run_dir / "allowlists").mkdir()
    (run_dir / "allowlists" / f"{scenario.SERVICE}.yaml").write_text(scenario.allowlist_yaml(rules))
    (run_dir / "hosts").write_text(scenario.hosts_file())
    (run_dir / "squid-domains.txt").write_text("\n".join(scenario.squid_domains(rules)) + "\n")
    (run_dir / "tinyproxy-filter.txt").write_text(scenario.tinyproxy_filter(rules))
    (run_dir / "nginx-tmp").mkdir()
    (run_dir / "nginx.conf").write_text(scenario.nginx_conf(run_dir))
    (run_dir / "wrk.lua").write_text(scenario.wrk_script())
    from bench.load import client_hello

    (run_dir / "hello.bin").write_bytes(client_hello(scenario.TLS_NAME))


def isolate(run_dir: Path) -> dict[str, Any]:
    """Inside the private namespaces: loopback up, the run dir on a private tmpfs, /etc/hosts replaced,
    TCP sysctls for many short connections."""
    run_bounded(["ip", "link", "set", "lo", "up"], 10)
    # Logs and audit records go to memory, for every system alike: tinyproxy fsyncs each log line, which on
    # this disk cost it 7x its tunnel rate, and the benchmark measures proxies, not disks.
    done = run_bounded(["mount", "-t", "tmpfs", "-o", "mode=0755,size=2g", "bench-run", str(run_dir)], 10)
    if done.returncode != 0:
        raise BenchError(f"cannot mount a tmpfs on the run directory: {done.stderr.strip()}")
    (run_dir / "hosts").write_text(scenario.hosts_file())
    done = run_bounded(["mount", "--bind", str(run_dir / "hosts"), "/etc/hosts"], 10)
    if done.returncode != 0:
        raise BenchError(f"cannot bind-mount the hosts file: {done.stderr.strip()}")
    sysctls = {
        "net/ipv4/ip_local_port_range": "20000 65000",  # above every fixed port of the scenario
        "net/ipv4/tcp_tw_reuse": "1",
        "net/core/somaxconn": "8192",
        "net/ipv4/tcp_max_syn_backlog": "8192",
    }
    applied = {}
    for key, value in sysctls.items():
        try:
            Path("/proc/sys", key).write_text(value)
            applied[key.replace("/", ".")] = value
        except OSError as exc:
            log(f"could not set {key}: {exc}")
    return {"network_namespace": True, "mount_namespace": True, "run_dir": "tmpfs", "hosts_file": "bind-mounted",
            "sysctls": applied}


def build_loadc(run_dir: Path) -> Path | None:
    """Compile bench/loadc.c into the run dir; None (Python generator) when there is no compiler."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log("no C compiler: using the Python load generator (it may be the bottleneck: see CB marks)")
        return None
    out = run_dir / "loadc"
    try:
        done = run_bounded([cc, "-O2", "-o", str(out), str(HERE / "loadc.c"), "-lm"], 120)
    except BenchError as exc:
        log(f"building loadc failed ({exc}): using the Python load generator")
        return None
    if done.returncode != 0:
        log(f"building loadc failed: {done.stderr.strip()[-400:]}; using the Python load generator")
        return None
    return out


def cores() -> tuple[int | None, int | None]:
    """(proxy core, client core): 0 and 1 when the machine has two or more, else nothing pinned."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if os.geteuid() == 0:
        want = max(want, 1 << 17)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


class Session:
    """The started helpers of one benchmark session and the results so far."""

    def __init__(self, args: Any, run_dir: Path) -> None:
        self.args = args
        self.run_dir = run_dir
        self.helpers: list[Proc] = []
        self.lab: LabThread | None = None
        self.dns_server: DnsServer | None = None
        self.dns: tuple[str, int] = ("127.0.0.1", 0)
        self.failures: list[str] = []
        self.http_origin = "nginx (1 process, return 200)"
        self.echo_origin = ""

    def start_helpers(self, client_cpus: str | None, loadc: Path | None) -> None:
        self.lab = LabThread().start()
        zone = {name: ("127.0.0.1",) for name in scenario.NAMES}
        self.dns_server = self.lab.serve(DnsServer(zone, ttl=300))
        self.dns = self.dns_server.address
        echo_ports = [str(scenario.ECHO_TLS_PORT), str(scenario.ECHO_PORT)]
        origin_cmd = [sys.executable, "-m", "bench.origin", "--bulk", str(scenario.BULK_PORT)]
        if loadc is not None:
            self.echo_origin = "bench/loadc.c echo (C, epoll)"
            self._ready(Proc("echo", [str(loadc), "echo", "--port", echo_ports[0], "--port", echo_ports[1]],
                             self.run_dir / "echo.log", cpus=client_cpus, lines=True))
        else:
            self.echo_origin = "bench/origin.py (uvloop)"
            origin_cmd += ["--echo", echo_ports[0], "--echo", echo_ports[1]]
        nginx = shutil.which("nginx")
        if nginx is None:
            self.http_origin = "bench/origin.py (uvloop; nginx is not installed)"
            origin_cmd += ["--http", str(scenario.HTTP_PORT)]
        origin = self._ready(Proc("origin", origin_cmd, self.run_dir / "origin.log", cpus=client_cpus, lines=True))
        if nginx is not None:
            cmd = [nginx, "-p", str(self.run_dir), "-e", str(self.run_dir / "nginx-error.log"),
                   "-c", str(self.run_dir / "nginx.conf")]
            proc = Proc("nginx", cmd, self.run_dir / "nginx.out", cpus=client_cpus)
            self.helpers.append(proc)
            wait_until(lambda: port_open("127.0.0.1", scenario.HTTP_PORT), SETUP_TIMEOUT, "nginx", proc.alive)
        for port in (scenario.ECHO_TLS_PORT, scenario.ECHO_PORT, scenario.BULK_PORT):
            wait_until(lambda p=port: port_open("127.0.0.1", p), SETUP_TIMEOUT, f"origin port {port}", origin.alive)

    def dns_queries_since(self, mark: int) -> dict[str, int]:
        """Queries the DNS server received after the first ``mark`` ones, counted by "name type"."""
        if self.dns_server is None:
            return {}
        return dict(Counter(f"{name} {kind}" for name, kind in list(self.dns_server.queries)[mark:]))

    def dns_mark(self) -> int:
        return len(self.dns_server.queries) if self.dns_server is not None else 0

    def _ready(self, proc: Proc) -> Proc:
        """Keep ``proc`` for stopping; wait for its ``ready`` line."""
        self.helpers.append(proc)
        if '"ready"' not in proc.next_line(SETUP_TIMEOUT):
            raise BenchError(f"{proc.name} did not start:\n{proc.log_tail()}")
        return proc

    def stop_helpers(self) -> None:
        for proc in reversed(self.helpers):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {proc.name}: {exc}")
        if self.lab is not None:
            self.lab.stop()

    def phase(
        self, out: dict[str, Any], started: proxies.Started, name: str, fn: Callable[[], Any], retry: bool = False
    ) -> Any:
        """Run one phase; on failure record it (with the system's log tail) and carry on.

        With ``retry``, a measurement that other programs disturbed (``noisy``) is taken again, up to
        ``--retry-noisy`` more times, and the least disturbed attempt is kept.
        """
        label = f"{started.name} run {out['_run']}: {name}"
        attempts = 1 + (self.args.retry_noisy if retry else 0)
        best: Any = None
        for attempt in range(1, attempts + 1):
            t0 = time.monotonic()
            try:
                value = fn()
            except Exception as exc:
                if best is None:
                    self._failed(out, started, name, label, exc)
                    return None
                log(f"{label}: attempt {attempt} failed ({exc}); keeping an earlier attempt")
                break
            log(f"{label}: {time.monotonic() - t0:.1f}s {_brief(value)}")
            if not isinstance(value, dict):
                best = value
                break
            if best is None or value.get("foreign_cpu_pct", 0) < best.get("foreign_cpu_pct", 0):
                best = value
            best["attempts"] = attempt
            if not value.get("noisy"):
                break
            if attempt < attempts:
                log(f"{label}: other programs used {value['foreign_cpu_pct']:.0f}% of a core meanwhile; again")
        if best is not None:
            out[name] = best
        return best

    def _failed(self, out: dict[str, Any], started: proxies.Started, name: str, label: str, exc: Exception) -> None:
        if started.proc is not None and not started.proc.alive():
            exc = BenchError(f"{exc} ({started.name} exited with {started.proc.popen.returncode})")
        detail = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, BenchError):
            detail += "\n" + traceback.format_exc(limit=3)
        tails = started.log_tails()
        message = f"{label} failed: {detail}" + (f"\n{tails}" if tails else "")
        log(message)
        self.failures.append(message)
        out.setdefault("errors", {})[name] = detail.splitlines()[0][:300]


def _brief(value: Any) -> str:
    if not isinstance(value, dict):
        return ""
    keys = ("per_s", "p50_ms", "cpu_us_per_tunnel", "mib_per_s", "rps", "idle_rss_mib", "idle_kib_per_tunnel",
            "client_core_busy_pct", "proxy_cpu_pct")
    return " ".join(f"{k}={value[k]:.4g}" for k in keys if isinstance(value.get(k), (int, float)))


def measure_system(session: Session, bench: Bench, name: str, run: int, has_workers: bool) -> dict[str, Any]:
    """Every figure for one system in one run (direct: no proxy)."""
    out: dict[str, Any] = {"_run": run}
    p = bench.params
    workers = 1 if (name == "egressd" and has_workers) else None
    tag = f"r{run}"
    dns_mark = session.dns_mark()
    try:
        started = proxies.start(name, session.run_dir, tag, bench.proxy_cpus, session.dns, workers)
    except Exception as exc:
        message = f"{name} run {run}: start failed: {exc}"
        log(message)
        session.failures.append(message)
        out["errors"] = {ph: f"start failed: {str(exc).splitlines()[0][:300]}"
                         for ph in ("idle", "tunnels", "latency", "bulk", "http")}
        return out
    try:
        session.phase(out, started, "warmup", lambda: phases.warm_up(started))
        if name != "direct":
            session.phase(out, started, "idle", lambda: phases.idle_rss(bench, started))
        session.phase(out, started, "tunnels",
                      lambda: phases.tunnels(bench, started, p.concurrency, p.tunnel_duration, "tunnels"), retry=True)
        session.phase(out, started, "latency",
                      lambda: phases.tunnels(bench, started, 1, p.latency_duration, "latency"), retry=True)
        session.phase(out, started, "bulk", lambda: phases.bulk(bench, started), retry=True)
        session.phase(out, started, "http", lambda: phases.http(bench, started), retry=True)
        if name in ("egressd", "squid"):
            connects = (1 + out.get("idle", {}).get("idle_opened", 0) + out.get("tunnels", {}).get("opened", 0)
                        + out.get("latency", {}).get("opened", 0) + (1 if "bulk" in out else 0))
            if name == "egressd":
                http = out.get("http", {}).get("requests", 0)
                session.phase(out, started, "records", lambda: {
                    **records.egressd(started, connects, http), "dns_queries": session.dns_queries_since(dns_mark)})
            else:
                session.phase(out, started, "records", lambda: records.squid(started, connects))
        elif name == "tinyproxy":
            session.phase(out, started, "records", lambda: records.log_problems(started))
    finally:
        started.stop()
    return out


def measure_workers(session: Session, bench: Bench, run: int) -> dict[str, Any]:
    """egressd --workers 2 with the proxy free to use both cores: new tunnels/s only."""
    out: dict[str, Any] = {"_run": run}
    cpus = None if bench.proxy_core is None else f"{bench.proxy_core},{bench.client_core}"
    dns_mark = session.dns_mark()
    try:
        started = proxies.start("egressd", session.run_dir, f"r{run}-w2", cpus, session.dns, 2)
    except Exception as exc:
        log(f"egressd --workers 2 run {run}: start failed: {exc}")
        session.failures.append(str(exc))
        out["errors"] = {"workers2": f"start failed: {str(exc).splitlines()[0][:300]}"}
        return out
    try:
        session.phase(out, started, "warmup", lambda: phases.warm_up(started))
        p = bench.params
        session.phase(out, started, "workers2",
                      lambda: phases.tunnels(bench, started, p.concurrency, p.tunnel_duration, "workers2"), retry=True)
        if "workers2" in out:
            w = out["workers2"]
            session.phase(out, started, "records", lambda: {
                **records.egressd(started, 1 + w.get("opened", 0), 0),
                "dns_queries": session.dns_queries_since(dns_mark)})
    finally:
        started.stop()
    return out


def make_run_dir(isolated: bool) -> Path:
    """A fresh directory for configs and logs: under /tmp (a private tmpfs is mounted on it when isolated),
    else under /dev/shm when it is there (memory, like the tmpfs)."""
    shm = Path("/dev/shm")
    base = shm if not isolated and shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    run_dir = Path(tempfile.mkdtemp(prefix="egressd-bench-", dir=base))
    run_dir.chmod(0o755)  # Squid runs as 'proxy': it must reach its config, hosts file and logs
    return run_dir


KEEP_LIMIT = 64 << 20  # files larger than this (audit records of a full run) are not copied out


def finish(json_path: Path, document: dict, elapsed: float, run_dir: Path, keep: bool, failures: list,
           isolated: bool = False) -> int:
    """The end of a benchmark session: write ``document`` as JSON to ``json_path``, keep the run directory when
    asked or when something failed, unmount its tmpfs (``isolated``: the mount point would stay behind), remove
    it; the exit status (1 when any figure failed)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nJSON: {json_path}  ({elapsed:.0f} s)")
    if keep or failures:
        print(f"logs: {save_run_dir(run_dir)}")
    if isolated:
        subprocess.run(["umount", str(run_dir)], capture_output=True, timeout=30)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failures else 0


def save_run_dir(run_dir: Path) -> Path:
    """Copy the run directory (configs, logs; not the largest record files) to bench/results/run-<time>/."""
    dest = HERE / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    skipped = []
    for path in sorted(run_dir.rglob("*")):
        target = dest / path.relative_to(run_dir)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.is_file():
            if path.stat().st_size > KEEP_LIMIT:
                skipped.append(f"{path.name} ({path.stat().st_size >> 20} MiB)")
                continue
            shutil.copy2(path, target)
    if skipped:
        (dest / "NOT-COPIED.txt").write_text("\n".join(skipped) + "\n")
    return dest


def git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (modified)' if dirty else ''}" if head else None


def params_for(args: Any) -> Params:
    return Params.quick() if args.quick else Params.full()
