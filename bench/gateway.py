"""``python -m bench.gateway``: egressd as a central gateway (token identity) next to ``--service``.

One session, the main benchmark's world (namespaces, DNS, echo origin, C load
generator, 300-rule allowlist), two egressd configurations started fresh in
turn on the proxy core, new tunnels/s only:

- ``service``: ``--service bench`` (a fixed identity, as the main benchmark);
- ``token``: no ``--service``, ``--identity token --token-issuer ISS --jwks-file FILE``; the service file
  lists ``identities: [{namespace: bench, serviceAccount: load}]`` and every CONNECT of the load generator
  carries ``Proxy-Authorization: Bearer <one RS256 token>`` (one client's token, reused by all 16 slots:
  one signature check, then cache hits);
- ``service-header``: ``--service bench`` again, with the same ``Proxy-Authorization`` line sent (and
  ignored): what the longer request costs by itself, apart from identifying the client.

Then the cost of verifying a token, timed on this interpreter pinned to the proxy core: a new token (cache
miss: header, key, signature, claims) and a known one (cache hit), RS256 2048-bit and ES256.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from bench import cli, phases, records, runner, scenario
from bench.procs import BenchError, Proc, wait_until
from bench.proxies import START_TIMEOUT, Started, _started_line, egressd_command

CONFIGS = ("service", "service-header", "token")
ISSUER = "https://kubernetes.default.svc.cluster.local"
NAMESPACE, ACCOUNT = "bench", "load"
TARGET_RATIO = 0.90  # token tunnels/s >= 0.90 x service
DEFAULT_JSON = runner.HERE / "results" / "gateway-latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway",
        description="egressd tunnels/s with token identity (central gateway) next to --service, one core, "
        "and the JWT verification cost.")
    parser.add_argument("--quick", action="store_true", help="1 s phases, one run, no re-measuring")
    parser.add_argument("--runs", type=int, default=None, help="runs; medians are reported (default 3, --quick 1)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write the results here ({DEFAULT_JSON})")
    parser.add_argument("--keep", action="store_true", help="copy the run directory to bench/results/run-<time>/")
    parser.add_argument("--retry-noisy", type=int, default=None, help="measure again, up to N more times, when "
                        "other programs used >=10%% of a core meanwhile (default 2; --quick: 0)")
    parser.add_argument("--no-netns", action="store_true", help="stay in the caller's namespaces even as root")
    args = parser.parse_args(argv)
    args.runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    args.retry_noisy = args.retry_noisy if args.retry_noisy is not None else (0 if args.quick else 2)
    if not 1 <= args.runs <= 20 or not 0 <= args.retry_noisy <= 5:
        parser.error("--runs must be 1-20 and --retry-noisy 0-5")
    return args


# ---- keys, tokens, files ----

def _rsa_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ec_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def jwks(key: Any, kid: str) -> dict[str, Any]:
    import jwt

    if hasattr(key, "curve"):
        jwk, alg = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "ES256"
    else:
        jwk, alg = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "RS256"
    return {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": alg}]}


def token(key: Any, kid: str, pod: str = "load-0", lifetime: int = 7200) -> str:
    """A projected service-account token as the API server makes it."""
    import jwt

    now = int(time.time())
    claims = {
        "iss": ISSUER, "aud": ["egressd"], "sub": f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}",
        "iat": now - 5, "nbf": now - 5, "exp": now + lifetime,
        "kubernetes.io": {"namespace": NAMESPACE, "serviceaccount": {"name": ACCOUNT, "uid": "sa-uid-load"},
                          "pod": {"name": pod, "uid": f"pod-uid-{pod}"}},
    }
    alg = "ES256" if hasattr(key, "curve") else "RS256"
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def write_gateway_world(run_dir: Path) -> str:
    """The service file gains ``identities:`` (the same 300 rules, so both configurations read the same policy);
    the JWKS file; returns the load generator's token."""
    path = run_dir / "allowlists" / f"{scenario.SERVICE}.yaml"
    identities = f"identities:\n  - namespace: {NAMESPACE}\n    serviceAccount: {ACCOUNT}\n"
    text = path.read_text().replace("mode: enforce\n", "mode: enforce\n" + identities, 1)
    path.write_text(text)
    key = _rsa_key()
    (run_dir / "jwks.json").write_text(json.dumps(jwks(key, "bench-rs")))
    return token(key, "bench-rs")


# ---- egressd and the load ----

def start_egressd(run_dir: Path, config: str, tag: str, cpus: str | None, dns: tuple[str, int]) -> Started:
    log = run_dir / f"egressd-{tag}-{config}.log"
    audit = run_dir / f"egressd-{tag}-{config}.audit.jsonl"
    who = (["--service", scenario.SERVICE] if config.startswith("service") else
           ["--identity", "token", "--token-issuer", ISSUER, "--jwks-file", str(run_dir / "jwks.json")])
    cmd = [*egressd_command(), "run", "--workers", "1", "--listen", f"127.0.0.1:{scenario.EGRESSD_PORT}",
           "--admin-listen", "127.0.0.1:0", "--allowlists", str(run_dir / "allowlists"), *who,
           "--resolver", f"{dns[0]}:{dns[1]}", "--allow-cidr", "127.0.0.0/8", "--audit-log", str(audit)]
    proc = Proc(f"egressd-{tag}-{config}", cmd, log, cpus=cpus)
    started = Started(f"egressd-{config}", proc, ("127.0.0.1", scenario.EGRESSD_PORT), [log], audit)
    try:
        line = wait_until(lambda: _started_line(log), START_TIMEOUT, "egressd's 'egressd.started' line", proc.alive)
    except BenchError as exc:
        proc.stop()
        raise BenchError(f"egressd ({config}) did not start: {exc}\n{started.log_tails()}") from None
    admin = line.get("admin") or []
    started.admin = tuple(admin[0]) if admin else None  # type: ignore[assignment]
    return started


def tunnels(bench: phases.Bench, started: Started, headers: list[str], duration: float, tag: str,
            concurrency: int = 16) -> dict[str, Any]:
    """phases.tunnels with extra CONNECT header lines (the token)."""
    p = bench.params
    assert bench.loadc is not None
    extra = [arg for h in headers for arg in ("--header", h)]
    cmd = phases._load_cmd(bench, "tunnels", started, f"{scenario.TLS_NAME}:{scenario.ECHO_TLS_PORT}",
                           "--hello", str(bench.hello), "--concurrency", str(concurrency), "--warmup",
                           str(p.tunnel_warmup), "--duration", str(duration), "--timeout", "10", *extra)
    result, use = phases._run_load(bench, started, cmd, f"{tag}-{started.name}", p.tunnel_warmup + duration + 10)
    if not result.get("completed"):
        raise BenchError(f"no tunnel completed: errors {result.get('errors')}")
    return {**result, **use, "cpu_us_per_tunnel": 1e6 * use["proxy_cpu_s"] / result["completed"]}


def identity_counts(started: Started) -> dict[str, int]:
    """Connect records by (identity source, service): every tunnel must be the bench service."""
    counts: dict[str, int] = {}
    if started.audit is None or not started.audit.exists():
        return counts
    with started.audit.open() as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("protocol") != "connect":
                continue
            ident = rec.get("identity") or {}
            key = f"{ident.get('source', 'none')}/{rec.get('service')}/{rec.get('reason')}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def measure(session: runner.Session, bench: phases.Bench, config: str, run: int, headers: list[str],
            duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {"_run": run}
    try:
        started = start_egressd(session.run_dir, config, f"r{run}", bench.proxy_cpus, session.dns)
    except BenchError as exc:
        session.failures.append(f"{config} run {run}: {exc}")
        out["errors"] = {"tunnels": "start failed"}
        return out
    try:
        session.phase(out, started, "warmup", lambda: tunnels(bench, started, headers, 0.3, f"r{run}-warmup", 1))
        session.phase(out, started, "tunnels", lambda: tunnels(bench, started, headers, duration, f"r{run}-tunnels"),
                      retry=True)
        opened = sum(out.get(k, {}).get("opened", 0) for k in ("warmup", "tunnels"))
        session.phase(out, started, "records", lambda: {**records.egressd(started, opened, 0),
                                                        "identities": identity_counts(started)})
    finally:
        started.stop()
    return out


# ---- JWT verification cost ----

def jwt_costs(number: int = 200) -> dict[str, Any]:
    """µs per TokenVerifier.verify: a new token each call (cold: signature and claims) and one known token
    (cache hit), for RS256 2048-bit and ES256, on this interpreter."""
    from egressd.identity.jwks import KeySource, parse_jwks
    from egressd.identity.token import TokenVerifier

    out: dict[str, Any] = {}
    for alg, make in (("RS256-2048", _rsa_key), ("ES256", _ec_key)):
        key = make()
        source = KeySource("bench", None)
        source.keys = parse_jwks(json.dumps(jwks(key, "k")).encode(), "bench")
        verifier = TokenVerifier(ISSUER, keys=source, cache_size=10 * number)
        fresh = [token(key, "k", pod=f"load-{i}") for i in range(number * 5)]
        cold, hit = _time_verify(verifier, fresh, number)
        out[alg] = {"cold_us": 1e6 * cold, "hit_us": 1e6 * hit, "token_bytes": len(fresh[0])}
    return out


def _time_verify(verifier: Any, fresh: list[str], number: int) -> tuple[float, float]:
    """Seconds per verify: tokens never seen before (the best of 3 x ``number``), then a known one."""
    it = iter(fresh)
    verifier.verify(next(it))  # imports, first-use work; fresh[0] is now cached
    cold = min(timeit.repeat(lambda: verifier.verify(next(it)), number=number, repeat=3)) / number
    hit = min(timeit.repeat(lambda: verifier.verify(fresh[0]), number=20000, repeat=5)) / 20000
    return cold, hit


def _jwt_costs_pinned(core: int | None) -> dict[str, Any]:
    """jwt_costs() in a child of this interpreter pinned to the proxy core (where egressd ran)."""
    code = "import json; from bench.gateway import jwt_costs; print(json.dumps(jwt_costs()))"
    cmd = [sys.executable, "-c", code]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(runner.HERE.parent))
    if done.returncode != 0:
        raise BenchError(f"JWT timing failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the session ----

def summarize(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config in CONFIGS:
        cells = [r[config] for r in per_run if r.get(config)]
        if not cells:
            continue
        out[config] = {k: statistics.median(c[k] for c in cells) for k in cells[0]
                       if isinstance(cells[0][k], (int, float)) and not isinstance(cells[0][k], bool)}
        out[config]["client_bound_runs"] = sum(1 for c in cells if c.get("client_bound"))
        out[config]["noisy_runs"] = sum(1 for c in cells if c.get("noisy"))
    if "service" in out and "token" in out:
        out["ratio_tunnels"] = out["token"]["per_s"] / out["service"]["per_s"]
        out["ratio_cpu"] = out["token"]["cpu_us_per_tunnel"] / out["service"]["cpu_us_per_tunnel"]
        out["target_met"] = out["ratio_tunnels"] >= TARGET_RATIO
    return out


def table(summary: dict[str, Any], costs: dict[str, Any]) -> str:
    rows = ["| figure | `--service` | `--service` + header | token | token / service | target |",
            "|---|---|---|---|---|---|"]
    s, h, t = summary.get("service"), summary.get("service-header") or {}, summary.get("token")
    if s and t:
        def marks(c: dict[str, Any]) -> str:
            return (" CB" if c["client_bound_runs"] else "") + (" N" if c["noisy_runs"] else "")

        verdict = "ok" if summary["target_met"] else "FAIL"
        def cell(c: dict[str, Any], key: str, form: str) -> str:
            return format(c[key], form) + marks(c) if key in c else "–"

        rows.append(f"| new tunnels/s, 16 concurrent | {cell(s, 'per_s', ',.0f')} | {cell(h, 'per_s', ',.0f')} | "
                    f"{cell(t, 'per_s', ',.0f')} "
                    f"| {summary['ratio_tunnels']:.3f} | ≥ {TARGET_RATIO:.2f} {verdict} |")
        rows.append(f"| p50 (p99) ms | {s['p50_ms']:.2f} ({s['p99_ms']:.2f}) | "
                    + (f"{h['p50_ms']:.2f} ({h['p99_ms']:.2f})" if h else "–")
                    + f" | {t['p50_ms']:.2f} ({t['p99_ms']:.2f}) | | |")
        rows.append(f"| egressd CPU per tunnel, µs | {s['cpu_us_per_tunnel']:.0f} | "
                    f"{h.get('cpu_us_per_tunnel', float('nan')):.0f} | {t['cpu_us_per_tunnel']:.0f} "
                    f"| {summary['ratio_cpu']:.3f} | |")
        rows.append(f"| client core busy % | {s.get('client_core_busy_pct', 0):.0f} | "
                    f"{h.get('client_core_busy_pct', float('nan')):.0f} | "
                    f"{t.get('client_core_busy_pct', 0):.0f} | | (< 90) |")
    for alg, c in costs.items():
        rows.append(f"| JWT verify {alg}, µs: new token (cache hit) | | | {c['cold_us']:.0f} ({c['hit_us']:.1f}) "
                    "| | |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, cli._on_sigterm)
    isolated = os.environ.get("BENCH_NETNS") == "1"
    run_dir = runner.make_run_dir(isolated)
    session = runner.Session(args, run_dir)
    params = runner.params_for(args)
    duration = params.tunnel_duration
    per_run: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    proxy_core = None
    try:
        if isolated:
            info["isolation"] = runner.isolate(run_dir)
        runner.write_world(run_dir)
        tok = write_gateway_world(run_dir)
        auth = [f"Proxy-Authorization: Bearer {tok}"]
        headers = {"service": [], "service-header": auth, "token": auth}
        info["token_bytes"] = len(tok)
        proxy_core, client_core = runner.cores()
        if client_core is not None:
            os.sched_setaffinity(0, {client_core})
        runner.raise_fd_limit()
        loadc = runner.build_loadc(run_dir)
        if loadc is None:
            raise BenchError("the C load generator (bench/loadc.c) is needed: install a C compiler")
        bench = phases.Bench(run_dir, params, proxy_core, client_core, loadc, run_dir / "hello.bin",
                             run_dir / "wrk.lua")
        info["pinning"] = {"proxy_core": proxy_core, "client_core": client_core}
        session.start_helpers(bench.client_cpus, loadc)
        for run_no in range(1, args.runs + 1):
            order = CONFIGS if run_no % 2 else tuple(reversed(CONFIGS))
            results = {c: measure(session, bench, c, run_no, headers[c], duration) for c in order}
            per_run.append({c: results[c]["tunnels"] for c in CONFIGS if "tunnels" in results[c]})
            raw.append(results)
    except (KeyboardInterrupt, BenchError) as exc:
        runner.stopped_by(session, exc)
    finally:
        session.stop_helpers()
    if not session.failures or per_run:
        try:
            costs = _jwt_costs_pinned(proxy_core)
        except (BenchError, subprocess.SubprocessError, ValueError) as exc:
            session.failures.append(f"jwt timing: {exc}")
    summary = summarize(per_run)
    text = table(summary, costs)
    notes = _notes(raw) + [f"FAILED: {f.splitlines()[0][:300]}" for f in session.failures]
    print(text)
    for note in notes:
        print(f"- {note}")
    elapsed = time.monotonic() - t0
    document = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": os.environ.get("BENCH_ARGV") or shlex.join(["python", "-m", "bench.gateway", *sys.argv[1:]]),
        "duration_s": round(elapsed, 1), "machine": cli.machine(), "params": vars(params), **info,
        "figures": summary, "jwt_verify": costs, "table": text, "notes": notes, "failures": session.failures,
        "runs": raw,
    }
    return runner.finish(args.json, document, elapsed, run_dir, args.keep, session.failures, isolated)


def _notes(raw: list[dict[str, Any]]) -> list[str]:
    """Records that are not allowed, or not attributed to the bench service by the expected identity."""
    notes = []
    for i, results in enumerate(raw, 1):
        for config, out in results.items():
            found = out.get("records", {})
            if found.get("missing_connect_records"):
                notes.append(f"run {i}: {config}: {found['missing_connect_records']} connect records missing")
            want = "token" if config == "token" else "none"
            odd = {k: v for k, v in found.get("identities", {}).items() if k != f"{want}/bench/allowed"}
            if odd:
                notes.append(f"run {i}: {config}: records other than {want}/bench/allowed: {odd}")
            if found.get("log_problem_lines"):
                notes.append(f"run {i}: {config}: {found['log_problem_lines']} warning/error lines, e.g. "
                             f"{found['log_problem_samples'][:1]}")
    return notes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if cli.wants_namespaces(args.no_netns):
        cli.reexec_in_namespaces(argv, "bench.gateway")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
