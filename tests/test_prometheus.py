"""A real Prometheus scrapes a running egressd while it allows and denies traffic; every dashboard query and every
rule evaluates on it, and the denial panel counts the denials sent."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest
import yaml

from conftest import service_yaml
from harness import ProxyProcess, raw_request, wait_for, write_allowlists
from test_alerts import dashboard, dashboard_targets, find, rule_groups, rules, substitute, variables

DEADLINE = 60.0
SERVICE = "payments-api"
# The labels the Prometheus Operator gives a sidecar target found by the PodMonitor egressd-sidecars.
TARGET = {"namespace": "payments", "pod": "payments-api-7d9f-abcde", "container": "egressd",
          "endpoint": "egressd-admin"}
DENIED = {"secret-leak.test:443": "not_allowlisted", "api.test:8443": "port_not_allowed"}
DENIAL_PANEL = "Denials by service and reason"
VERSION = "<the version egressd logged>"  # in an expected table: replaced by the policy version of egressd.started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_config(admin: tuple[str, int]) -> dict:
    """egressd's admin endpoint as one static target, relabelled as the PodMonitor egressd-sidecars would be."""
    [endpoint] = find("PodMonitor", "egressd-sidecars")["spec"]["podMetricsEndpoints"]
    relabel = [{"target_label": label, "replacement": value} for label, value in TARGET.items()]
    for step in endpoint["relabelings"]:
        relabel.append({"action": step["action"], "target_label": step["targetLabel"],
                        "replacement": step["replacement"]})
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [{
            "job_name": "egressd-system/egressd-sidecars",
            "metrics_path": endpoint["path"],
            "static_configs": [{"targets": [f"{admin[0]}:{admin[1]}"]}],
            "relabel_configs": relabel,
        }],
    }


class Prometheus:
    """prometheus on a loopback port, its config, rules and storage in one directory."""

    def __init__(self, directory: Path, config: dict) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
        self.log = directory / "prometheus.log"
        self.port = free_port()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={directory / 'prometheus.yml'}",
                 f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=10)
        wait_for(self._ready, DEADLINE, "prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: str | list[str]) -> dict:
        answer = self.client.get(f"/api/v1/{path}", params=params).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


@dataclass
class Scraped:
    proxy: ProxyProcess
    prometheus: Prometheus
    denials: dict[str, int]  # reason -> denials sent


def send_round(proxy: ProxyProcess, lab) -> dict[str, int]:
    """One allowed HTTPS request, one denial per entry of DENIED, and DNS queries allowed, denied and failing."""
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", f"http://{proxy.address[0]}:{proxy.address[1]}",
         "--cacert", str(lab.ca_file), f"https://api.test:{lab.tls.port}/hello"],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    sent: dict[str, int] = {}
    for authority, reason in DENIED.items():
        answer = raw_request(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403 ") and f"X-Egressd-Reason: {reason}".encode() in answer
        sent[reason] = sent.get(reason, 0) + 1
    host, port = proxy.dns[0]
    for name, rcode in (("api.test", dns.rcode.NOERROR), ("exfil.test", dns.rcode.NXDOMAIN),
                        ("servfail.test", dns.rcode.SERVFAIL)):
        reply = dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=10)
        assert reply.rcode() == rcode, name
    return sent


def counter_form(expr: str) -> str:
    """A rate panel's query over the raw counter: the same selector and aggregation, without rate()."""
    return re.sub(r"rate\(([^\[]+)\[\$__rate_interval\]\)", r"\1", expr)


def denial_panel() -> dict:
    [panel] = [p for p in dashboard()["panels"] if p["title"] == DENIAL_PANEL]
    return panel


def by_labels(result: list[dict], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in result}


@pytest.fixture(scope="module")
def scraped(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """egressd with the explicit and DNS listeners, scraped every second, after two rounds of traffic."""
    tmp = tmp_path_factory.mktemp("prometheus")
    rules_text = (f"  - host: api.test\n    ports: [{lab.tls.port}]\n    tls: true\n"
                  "  - host: servfail.test\n")
    directory = write_allowlists(tmp / "allowlists", {f"{SERVICE}.yaml": service_yaml(rules_text, SERVICE)})
    proxy = ProxyProcess(
        ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0",
         "--workers", "1", "--allowlists", str(directory), "--service", SERVICE,
         "--resolver", f"{lab.dns.address[0]}:{lab.dns.address[1]}",
         "--allow-cidr", "127.0.0.0/8", "--allow-cidr", "::1/128", "--dns-timeout", "3"],
        tmp / "audit.jsonl",
    )
    prometheus = None
    try:
        prometheus = Prometheus(tmp / "server", scrape_config(proxy.admin))
        counted = substitute(counter_form(denial_panel()["targets"][0]["expr"]))

        def seen() -> float:
            return sum(by_labels(prometheus.query(counted), "reason").values())

        # Two rounds with a scrape between them, so that every counter rises within the rate panels' range.
        first = send_round(proxy, lab)
        wait_for(lambda: seen() == sum(first.values()), DEADLINE, "the first denials in Prometheus")
        second = send_round(proxy, lab)
        denials = {reason: first[reason] + second[reason] for reason in first}
        wait_for(lambda: seen() == sum(denials.values()), DEADLINE, "every denial in Prometheus")
        yield Scraped(proxy, prometheus, denials)
    finally:
        if prometheus is not None:
            prometheus.stop()
        proxy.stop()


def test_denial_panel_counts_the_denials_sent(scraped):
    """The denial panel's query, over the raw counter, gives each reason's denials sent; its rate shows each one."""
    expr = denial_panel()["targets"][0]["expr"]
    counted = scraped.prometheus.query(substitute(counter_form(expr), service=SERVICE, namespace="payments"))
    expected = {("payments", SERVICE, reason): float(n) for reason, n in scraped.denials.items()}
    assert by_labels(counted, "namespace", "service", "reason") == expected

    def rates() -> dict:
        result = scraped.prometheus.query(substitute(expr, service=SERVICE, namespace="payments"))
        found = by_labels(result, "namespace", "service", "reason")
        return found if set(found) == set(expected) and all(v > 0 for v in found.values()) else None

    wait_for(rates, DEADLINE, "a positive denial rate for each reason")


@pytest.mark.parametrize(
    ("title", "ref", "labels", "expected"),
    [
        pytest.param("Allowed and denied per service", "A", ("service",), {(SERVICE,)}, id="allowed"),
        pytest.param("Allowed and denied per service", "B", ("service",), {(SERVICE,)}, id="denied"),
        pytest.param("Top denied services", "A", ("namespace", "service"), {("payments", SERVICE)}, id="top-denied"),
        pytest.param("Bytes per service", "A", ("service", "direction"), {(SERVICE, "up"), (SERVICE, "down")},
                     id="bytes"),
        pytest.param("DNS filter decisions", "A", ("decision", "reason"),
                     {("allow", "allowed"), ("deny", "not_allowlisted"), ("allow", "dns_failure")},
                     id="dns-decisions"),
        pytest.param("DNS failure ratio", "A", ("service",), {(SERVICE,)}, id="dns-failure-ratio"),
        pytest.param("Policy in force per pod", "A", ("pod",), {(TARGET["pod"],)}, id="policy-loaded"),
    ],
)
def test_panels_show_the_traffic_table(scraped, title, ref, labels, expected):
    """Panels over the traffic sent return series for it, with the labels the legends and tables use."""
    [panel] = [p for p in dashboard()["panels"] if p["title"] == title]
    [target] = [t for t in panel["targets"] if t["refId"] == ref]
    expr = substitute(target["expr"])

    def found() -> set | None:
        result = by_labels(scraped.prometheus.query(expr), *labels)
        return set(result) if set(result) == expected and all(v > 0 for v in result.values()) else None

    wait_for(found, DEADLINE, f"{title} {ref} to show {expected}")


@pytest.mark.parametrize(
    ("title", "ref", "labels", "expected"),
    [
        pytest.param("Policy in force per pod", "C", ("pod", "version"), {(TARGET["pod"], VERSION): 1.0},
                     id="version"),
        pytest.param("Policy in force per pod", "D", ("pod",), {(TARGET["pod"],): 1.0}, id="last-load"),
        pytest.param("Pods per policy version", "A", ("version",), {(VERSION,): 1.0}, id="pods-per-version"),
        pytest.param("Policy versions in force", "A", (), {(): 1.0}, id="versions-in-force"),
        pytest.param("Pods on a failed load", "A", (), {(): 0.0}, id="failed-load"),
    ],
)
def test_policy_panels_show_the_version_in_force_table(scraped, title, ref, labels, expected):
    """The policy panels show the version egressd started with, a last load that succeeded, and one version."""
    version = scraped.proxy.wait_log("egressd.started")["policy_version"]
    expected = {tuple(version if v == VERSION else v for v in key): n for key, n in expected.items()}
    [panel] = [p for p in dashboard()["panels"] if p["title"] == title]
    [target] = [t for t in panel["targets"] if t["refId"] == ref]
    expr = substitute(target["expr"])

    def found() -> dict | None:
        result = by_labels(scraped.prometheus.query(expr), *labels)
        return result if result == expected else None

    wait_for(found, DEADLINE, f"{title} {ref} to show {expected}")


@pytest.mark.parametrize(("panel", "target"), dashboard_targets(),
                         ids=[f"{p['title']}-{t['refId']}" for p, t in dashboard_targets()])
def test_dashboard_query_evaluates(scraped, panel, target):
    """Every dashboard query, its variables substituted as Grafana does, is valid PromQL on the real server."""
    scraped.prometheus.query(substitute(target["expr"]))


@pytest.mark.parametrize("rule", rules(), ids=[r.get("alert") or r["record"] for r in rules()])
def test_rule_expression_evaluates(scraped, rule):
    """Every alert and recording rule expression is valid PromQL on the real server."""
    scraped.prometheus.query(rule["expr"])


def test_prometheus_evaluates_every_rule_without_error(scraped):
    """Prometheus loads the rule groups and evaluates each rule with health ok; the denial rates are recorded."""
    def healthy() -> bool:
        groups = scraped.prometheus.api("rules")["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        return len(loaded) == len(rules()) and all(
            rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001") for rule in loaded
        )

    wait_for(healthy, DEADLINE, "every rule evaluated with health ok")

    def recorded() -> bool:
        result = scraped.prometheus.query(
            f'job_namespace_service_reason:egressd_denials:rate5m{{job="egressd-sidecar", service="{SERVICE}"}}'
        )
        return {r["metric"]["reason"] for r in result} == set(scraped.denials)

    wait_for(recorded, DEADLINE, "the denial recording rule")


@pytest.mark.parametrize(("name", "value"), [("job", "egressd-sidecar"), ("namespace", "payments"),
                                             ("service", SERVICE)])
def test_dashboard_variable_lists_the_target_table(scraped, name, value):
    """Each label_values variable, asked of the real server, lists the scraped egressd's job, namespace and service."""
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variables()[name]["definition"])
    assert match and match.group(2) == name
    values = scraped.prometheus.api(f"label/{name}/values", **{"match[]": substitute(match.group(1))})
    assert value in values
