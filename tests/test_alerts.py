"""The monitoring install: kustomize output, PodMonitors, the rules under promtool, runbook links, the dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from egressd import kube, limits, metrics
from egressd.listeners import explicit, transparent
from egressd.policy.model import Reason

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "k8s" / "monitoring"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"
RUNBOOK_URL = "https://github.com/egressd/egressd/blob/main/docs/runbook.md#"
PART_OF = "app.kubernetes.io/part-of"

# job label of each PodMonitor's targets
JOBS = {"egressd-sidecars": "egressd-sidecar", "egressd-gateway": "egressd-gateway",
        "egressd-allowlist-sync": "egressd-allowlist-sync"}

# alert -> the labels its description must name (the ones its expression keeps)
ALERTS = {
    "EgressdDenialSpike": ("job", "namespace", "service", "reason"),
    "EgressdPolicyReloadFailing": ("job", "namespace", "pod"),
    "EgressdNoPolicyLoaded": ("job", "namespace", "pod"),
    "EgressdDnsFailureRatioHigh": ("job", "namespace", "service"),
    "EgressdSidecarDown": ("namespace", "pod", "instance"),
    "EgressdGatewayDown": ("namespace", "pod", "instance"),
    "EgressdGatewayReplicasMissing": ("namespace", "deployment"),
    "EgressdGatewayUnavailable": ("namespace", "deployment"),
    "EgressdAllowlistSyncDown": ("namespace", "pod", "instance"),
    "EgressdJwksRefreshFailing": ("job", "namespace", "pod"),
    "EgressdAuditWriteFailing": ("job", "namespace", "pod"),
    "EgressdAllowlistSyncFailing": ("job", "namespace", "pod", "reason"),
    "EgressdAllowlistCopyUnmanaged": ("job", "namespace", "reason"),
    "EgressdLimitActing": ("job", "namespace", "pod", "limit"),
}

# Closed label values (see egressd.metrics and the modules that count): label -> values, or per metric.
RESULTS = {
    "egressd_policy_reloads_total": {"success", "error"},  # egressd.metrics.Metrics.policy_loaded
    "egressd_jwks_refresh_total": {"success", "error"},  # egressd.identity.jwks.KeySource
    "egressd_identity_total": {"ok", "bad", "unmapped", "missing"},  # egressd.identity.identify
    "egressd_dns_cache_lookups_total": {"hit", "miss"},  # egressd.resolve
    "egressd_allowlist_sync_actions_total": set(metrics.SYNC_RESULTS),
}
# Label values of one metric where they are not those of CLOSED.
BY_METRIC = {
    "egressd_allowlist_sync_errors_total": {"reason": set(metrics.SYNC_ERROR_REASONS)},
    "egressd_allowlist_sync_actions_total": {"action": set(metrics.SYNC_ACTION_NAMES)},
}
CLOSED = {
    "reason": {r.value for r in Reason},
    "decision": {"allow", "deny"},
    "direction": {"up", "down"},
    "listener": {explicit.LISTENER, transparent.LISTENER},
    "limit": set(limits.LIMITS),
}
OTHER_METRICS = {"up", "kube_deployment_spec_replicas", "kube_deployment_status_replicas_available"}
# The allowlist sync's own metrics (its job only).
SYNC_METRICS = {metrics.PREFIX + spec[0] for spec in (metrics.SYNC_ACTIONS, metrics.SYNC_COPIES, metrics.SYNC_ERRORS,
                                                      metrics.SYNC_LAST_SUCCESS)}


def declared_metrics() -> set[str]:
    """Every series name egressd exports, from the declarations in egressd.metrics."""
    names = {"egressd_process_" + n for n in ("cpu_seconds_total", "open_fds", "max_fds", "virtual_memory_bytes",
                                               "resident_memory_bytes", "start_time_seconds")}
    histograms = {metrics.DNS_SECONDS[0], metrics.CONNECT_SECONDS[0], metrics.DNS_UPSTREAM_SECONDS[0]}
    for value in vars(metrics).values():
        if isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], str) and isinstance(value[2], tuple):
            name = metrics.PREFIX + value[0]
            if value[0] in histograms:
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            else:
                names.add(name)
    return names


@cache
def built() -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(kind: str, name: str) -> dict:
    [obj] = [o for o in built() if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def rule_groups() -> list[dict]:
    """spec.groups of the PrometheusRule, read from the source file (what kustomize copies unchanged)."""
    return yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]["groups"]


def rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def dashboard() -> dict:
    return json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_targets() -> list[tuple[dict, dict]]:
    """(panel, target) for every query of every panel."""
    return [(panel, target) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def variables() -> dict[str, dict]:
    return {var["name"]: var for var in dashboard()["templating"]["list"]}


def substitute(expr: str, rate_interval: str = "1m", time_range: str = "1h", **values: str) -> str:
    """The expression as Grafana sends it: its variables replaced (by default each query variable's all-value)."""
    for name, var in variables().items():
        if var["type"] == "query":
            expr = expr.replace(f"${name}", values.get(name, var["allValue"]))
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", time_range)
    assert "$" not in expr, f"a variable is left in {expr}"
    return expr


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, operator, value)]) for every selector with braces in the expression."""
    found = []
    for metric, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        found.append((metric, re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body)))
    return found


def all_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every rule and every dashboard query."""
    out = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules()]
    out += [(f"panel {panel['title']!r} {target['refId']}", substitute(target["expr"]))
            for panel, target in dashboard_targets()]
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = re.match(r"#{1,6} (.+)", line)
        if match and not in_code:
            slug = github_slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


# --- the kustomization

def test_kustomization_builds_the_monitoring_objects():
    """kubectl kustomize builds exactly the three PodMonitors, the PrometheusRule and the dashboard ConfigMap."""
    found = {(o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]) for o in built()}
    assert found == {
        ("PodMonitor", "egressd-sidecars", kube.NAMESPACE),
        ("PodMonitor", "egressd-gateway", kube.NAMESPACE),
        ("PodMonitor", "egressd-allowlist-sync", kube.NAMESPACE),
        ("PrometheusRule", "egressd", kube.NAMESPACE),
        ("ConfigMap", "egressd-dashboard", kube.NAMESPACE),
    }
    assert all(o["metadata"]["labels"][PART_OF] == "egressd" for o in built())


@pytest.mark.parametrize(
    ("name", "namespaces", "selector", "port"),
    [
        pytest.param("egressd-sidecars", {"any": True}, {kube.SIDECAR_LABEL: "true"}, kube.ADMIN_PORT_NAME,
                     id="sidecars"),
        pytest.param("egressd-gateway", {"matchNames": [kube.NAMESPACE]},
                     {"app.kubernetes.io/name": "egressd-gateway"}, kube.ADMIN_PORT_NAME, id="gateway"),
        pytest.param("egressd-allowlist-sync", {"matchNames": [kube.NAMESPACE]},
                     {"app.kubernetes.io/name": "egressd-injector"}, "sync-admin", id="allowlist-sync"),
    ],
)
def test_podmonitor_table(name, namespaces, selector, port):
    """Each PodMonitor selects its pods by label, scrapes /metrics on the named port and sets a fixed job label."""
    spec = find("PodMonitor", name)["spec"]
    assert spec["namespaceSelector"] == namespaces
    assert spec["selector"] == {"matchLabels": selector}
    [endpoint] = spec["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port, "/metrics")
    assert {"action": "replace", "targetLabel": "job", "replacement": JOBS[name]} in endpoint["relabelings"]


def test_dashboard_configmap_for_the_grafana_sidecar():
    """The dashboard ConfigMap has a fixed name, the grafana_dashboard label and dashboard.json as its one key."""
    cm = find("ConfigMap", "egressd-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(cm["data"]) == ["egressd.json"]
    assert json.loads(cm["data"]["egressd.json"]) == dashboard()


def test_prometheusrule_is_built_from_the_source_file():
    """The built PrometheusRule carries the groups of prometheusrule.yaml unchanged."""
    assert find("PrometheusRule", "egressd")["spec"]["groups"] == rule_groups()


# --- the rules under promtool

@pytest.fixture
def promtool_dir(tmp_path: Path) -> Path:
    """A directory with the rules as a Prometheus rule file (rules.yaml) and the unit test files next to it."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    for test_file in PROMTOOL_TESTS.glob("*.yaml"):
        shutil.copy(test_file, tmp_path / test_file.name)
    return tmp_path


def test_promtool_check_rules(promtool_dir):
    """promtool accepts the rule file: every expression parses and every template renders."""
    out = subprocess.run(["promtool", "check", "rules", str(promtool_dir / "rules.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests(promtool_dir):
    """Every promtool unit test passes: input series fire each alert with its labels and annotations, or keep quiet."""
    files = sorted(p.name for p in promtool_dir.glob("*.yaml") if p.name != "rules.yaml")
    assert files
    out = subprocess.run(["promtool", "test", "rules", *files], cwd=promtool_dir,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(files), out.stdout


def test_every_alert_is_unit_tested_firing_and_quiet():
    """Each alert has a promtool case where it fires and one where it stays quiet."""
    fired, quiet = set(), set()
    for path in PROMTOOL_TESTS.glob("*.yaml"):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fired == set(ALERTS)
    assert quiet == set(ALERTS)


# --- alerts, runbook, names

def test_the_alerts_are_the_designed_set():
    """The PrometheusRule has exactly the designed alerts, each once."""
    names = [rule["alert"] for rule in rules() if "alert" in rule]
    assert sorted(names) == sorted(ALERTS)


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_metadata_table(name):
    """Each alert has a severity, a summary, a description naming its labels, and a runbook section that exists."""
    rule = alerts()[name]
    assert rule["labels"]["severity"] in {"warning", "critical"}
    notes = rule["annotations"]
    assert notes["summary"].strip() and notes["description"].strip()
    for label in ALERTS[name]:
        assert f"$labels.{label}" in notes["description"], label
    url = notes["runbook_url"]
    assert url.startswith(RUNBOOK_URL)
    anchor = url.removeprefix(RUNBOOK_URL)
    assert anchor == name.lower()
    assert anchor in runbook_anchors()
    assert re.search(rf"^## {name}$", RUNBOOK.read_text(), re.MULTILINE)


def test_runbook_links_resolve():
    """Every in-page link of the runbook points at one of its headings."""
    links = re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text())
    assert links
    assert set(links) <= runbook_anchors()


def test_recording_rule_names_follow_the_convention():
    """Recording rules are named level:metric:operations and each is used by an alert."""
    records = [rule["record"] for rule in rules() if "record" in rule]
    alert_exprs = " ".join(rule["expr"] for rule in alerts().values())
    for name in records:
        assert re.fullmatch(r"[a-z_]+:egressd_[a-z_]+:[a-z0-9_]+", name), name
        assert name in alert_exprs, name


@pytest.mark.parametrize(("where", "expr"), all_expressions(), ids=[w for w, _ in all_expressions()])
def test_expressions_use_only_declared_metrics_and_closed_label_values(where, expr):
    """Every metric an expression names is one egressd declares (or up, kube-state-metrics), with known label values."""
    declared = declared_metrics()
    records = {rule["record"] for rule in rules() if "record" in rule}
    for name in set(re.findall(r"(?<![\w:])(egressd_[a-z_]+)(?![\w:])", expr)):
        assert name in declared, f"{where}: {name} is not declared in egressd.metrics"
    for metric, matchers in selectors(expr):
        assert metric in declared | records | OTHER_METRICS, f"{where}: unknown metric {metric}"
        closed = {**CLOSED, **BY_METRIC.get(metric, {})}
        for label, op, value in matchers:
            allowed = RESULTS.get(metric) if label == "result" else closed.get(label)
            if label == "job":
                jobs = set(JOBS.values())
                pattern = re.compile(value)
                matched = {job for job in jobs if pattern.fullmatch(job)}
                assert matched if op in ("=", "=~") else True, f"{where}: job {value!r} matches no egressd job"
            elif allowed is not None:
                for alternative in value.split("|"):
                    assert alternative in allowed, f"{where}: {label}{op}{alternative!r} is not a value of {metric}"


# --- the dashboard

def test_dashboard_structure():
    """The dashboard has a recent schema, unique panel ids, a grid position for each panel and no overlaps."""
    board = dashboard()
    assert board["schemaVersion"] >= 38 and board["uid"] == "egressd"
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["type"] in {"timeseries", "stat", "bargauge", "table"}
            assert panel["targets"], panel["title"]


def test_dashboard_variables():
    """A datasource variable for Prometheus, and job, namespace and service variables from label_values."""
    found = variables()
    assert (found["datasource"]["type"], found["datasource"]["query"]) == ("datasource", "prometheus")
    for name in ("job", "namespace", "service"):
        var = found[name]
        assert var["type"] == "query" and var["includeAll"] and var["multi"]
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert re.fullmatch(rf"label_values\(egressd_\w+(\{{[^}}]*\}})?, {name}\)", var["definition"])
        assert var["query"]["query"] == var["definition"]
    assert re.fullmatch(found["job"]["allValue"], "egressd-sidecar")
    assert re.fullmatch(found["job"]["allValue"], "egressd-gateway")


@pytest.mark.parametrize(("panel", "target"), dashboard_targets(),
                         ids=[f"{p['title']}-{t['refId']}" for p, t in dashboard_targets()])
def test_dashboard_query_table(panel, target):
    """Every query uses the data source variable, the job and namespace variables (the allowlist sync's metrics: its
    job, whatever the variables select), the service variable where the metric has a service label, and Grafana's
    intervals for every range."""
    expr = target["expr"]
    assert expr.strip()
    assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ranges = re.findall(r"\[([^\]]+)\]", expr)
    assert all(r in ("$__rate_interval", "$__range") for r in ranges), ranges
    for metric, matchers in selectors(expr):
        labels = {label: value for label, _, value in matchers}
        if metric in SYNC_METRICS:
            assert labels.get("job") == JOBS["egressd-allowlist-sync"], f"{metric} without its job"
            continue
        assert "$job" in labels.get("job", ""), f"{metric} without $job"
        assert labels.get("namespace") == "$namespace", f"{metric} without $namespace"
        spec = [s for s in vars(metrics).values()
                if isinstance(s, tuple) and len(s) == 3 and metric.startswith(metrics.PREFIX + str(s[0]))]
        if any("service" in s[2] for s in spec):
            assert labels.get("service") == "$service", f"{metric} without $service"


@pytest.mark.parametrize(
    ("title", "metric", "panel_type"),
    [
        pytest.param("Allowed and denied per service", "egressd_connections_total", "timeseries",
                     id="allowed-and-denied-rate"),
        pytest.param("Denials by service and reason", "egressd_denials_total", "timeseries", id="denials-by-reason"),
        pytest.param("Top denied services", "egressd_denials_total", "bargauge", id="top-denied"),
        pytest.param("Denials by reason", "egressd_denials_total", "table", id="denials-table"),
        pytest.param("Bytes per service", "egressd_bytes_total", "timeseries", id="bytes"),
        pytest.param("DNS lookup time", "egressd_dns_lookup_seconds_bucket", "timeseries", id="dns-latency"),
        pytest.param("DNS filter upstream time", "egressd_dns_upstream_seconds_bucket", "timeseries",
                     id="dns-upstream-latency"),
        pytest.param("DNS filter decisions", "egressd_dns_queries_total", "timeseries", id="dns-decisions"),
        pytest.param("Active connections per service", "egressd_active_connections", "timeseries", id="active"),
        pytest.param("Policy reloads", "egressd_policy_reloads_total", "timeseries", id="reload-status"),
        pytest.param("Policy in force per pod", "egressd_policy_loaded_timestamp_seconds", "table",
                     id="policy-loaded-at"),
        pytest.param("Policy in force per pod", "egressd_policy_info", "table", id="policy-version"),
        pytest.param("Policy in force per pod", "egressd_policy_last_reload_success", "table",
                     id="last-load-per-pod"),
        pytest.param("Pods on a failed load", "egressd_policy_last_reload_success", "stat", id="failed-load"),
        pytest.param("Policy versions in force", "count(count by (version) (egressd_policy_info", "stat",
                     id="versions-in-force"),
        pytest.param("Pods per policy version", "egressd_policy_info", "timeseries", id="pods-per-version"),
        pytest.param("Allowlist copies", "egressd_allowlist_copies", "timeseries", id="sync-copies"),
        pytest.param("Allowlist sync writes", "egressd_allowlist_sync_actions_total", "timeseries", id="sync-writes"),
        pytest.param("Allowlist sync errors", "egressd_allowlist_sync_errors_total", "timeseries", id="sync-errors"),
        pytest.param("Since the last complete reconcile", "egressd_allowlist_sync_last_success_timestamp_seconds",
                     "stat", id="sync-last-success"),
        pytest.param("Identity failures", "egressd_identity_total", "timeseries", id="identity-failures"),
        pytest.param("JWKS refreshes", "egressd_jwks_refresh_total", "timeseries", id="jwks"),
        pytest.param("Audit write errors", "egressd_audit_write_errors_total", "timeseries", id="audit"),
    ],
)
def test_dashboard_panel_table(title, metric, panel_type):
    """Each thing the dashboard must show has its panel, of the right type, querying the right metric."""
    [panel] = [p for p in dashboard()["panels"] if p["title"] == title]
    assert panel["type"] == panel_type
    assert any(metric in target["expr"] for target in panel["targets"])
