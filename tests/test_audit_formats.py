"""--audit-format ecs|ocsf: every native field lands in a documented place and comes back unchanged; the mapped
records use only the published names and values of ECS 8.11 and OCSF 1.3.0 (below, copied from the schemas) and
the fields docs/forensics.md documents; the docs' tables match the code's. And the audit flags reach the config."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd import records as audit
from egressd.auditchain import Chain, Line, verify
from egressd.auditformats import ECS, FORMATS, NATIVE, OCSF, detect, epoch_ms
from egressd.cli import build_parser, run
from egressd.config import ConfigError
from test_audit_chain import sample, signer

DOCS = Path(__file__).resolve().parent.parent / "docs" / "forensics.md"

# ECS 8.11.0, generated/csv/fields.csv: every field of the field sets the mapping writes to.
ECS_FIELDS = set("""
@timestamp destination.address destination.bytes destination.domain destination.ip destination.mac
destination.packets destination.port destination.registered_domain destination.subdomain destination.top_level_domain
dns.answers dns.answers.class dns.answers.data dns.answers.name dns.answers.ttl dns.answers.type dns.header_flags dns.id
dns.op_code dns.question.class dns.question.name dns.question.registered_domain dns.question.subdomain
dns.question.top_level_domain dns.question.type dns.resolved_ip dns.response_code dns.type ecs.version event.action
event.agent_id_status event.category event.code event.created event.dataset event.duration event.end event.hash event.id
event.ingested event.kind event.module event.original event.outcome event.provider event.reason event.reference
event.risk_score event.risk_score_norm event.sequence event.severity event.start event.timezone event.type event.url
http.request.body.bytes http.request.body.content http.request.body.content.text http.request.bytes http.request.id
http.request.method http.request.mime_type http.request.referrer http.response.body.bytes http.response.body.content
http.response.body.content.text http.response.bytes http.response.mime_type http.response.status_code http.version
message network.application network.bytes network.community_id network.direction
network.forwarded_ip network.iana_number network.inner network.inner.vlan.id network.inner.vlan.name network.name
network.packets network.protocol network.transport network.type network.vlan.id network.vlan.name observer.product
observer.type observer.vendor rule.author rule.category rule.description rule.id rule.license rule.name rule.reference
rule.ruleset rule.uuid rule.version service.origin.name source.address source.bytes source.domain source.ip source.mac
source.packets source.port source.registered_domain source.subdomain source.top_level_domain tls.client.server_name
url.domain url.extension url.fragment url.full url.full.text url.original url.original.text url.password url.path
url.port url.query url.registered_domain url.scheme url.subdomain url.top_level_domain url.username
""".split())
# ECS 8.11.0, generated/ecs/ecs_flat.yml: allowed (or expected) values.
ECS_VALUES = {
    "event.kind": {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error", "signal"},
    "event.category": {"api", "authentication", "configuration", "database", "driver", "email", "file", "host", "iam",
                       "intrusion_detection", "library", "malware", "network", "package", "process", "registry",
                       "session", "threat", "vulnerability", "web"},
    "event.type": {"access", "admin", "allowed", "change", "connection", "creation", "deletion", "denied", "end",
                   "error", "group", "indicator", "info", "installation", "protocol", "start", "user"},
    "event.outcome": {"failure", "success", "unknown"},
    "network.direction": {"ingress", "egress", "inbound", "outbound", "internal", "external", "unknown"},
}

# OCSF 1.3.0: the attributes of the classes written (with their profiles) and of the objects they use.
_NETWORK = """action action_id activity_id activity_name actor api app_name attacks authorizations category_name
category_uid class_name class_uid cloud connection_info count device disposition disposition_id dst_endpoint duration
end_time enrichments firewall_rule ja4_fingerprint_list load_balancer malware message metadata observables osint proxy
proxy_connection_info proxy_endpoint proxy_http_request proxy_http_response proxy_tls proxy_traffic raw_data severity
severity_id src_endpoint start_time status status_code status_detail status_id time timezone_offset tls traffic
type_name type_uid unmapped"""
OCSF_CLASSES = {
    4001: set((_NETWORK + " url").split()),
    4002: set((_NETWORK + " file http_cookies http_request http_response http_status").split()),
    4003: set((_NETWORK + " answers query query_time rcode rcode_id response_time").split()),
    0: set("""activity_id activity_name api category_name category_uid class_name class_uid cloud count duration
end_time enrichments message metadata observables osint raw_data severity severity_id start_time status status_code
status_detail status_id time timezone_offset type_name type_uid unmapped""".split()),
}
OCSF_OBJECTS = {
    "metadata": "correlation_uid data_classification event_code extension extensions labels log_level log_name "
                "log_provider log_version logged_time loggers modified_time original_time processed_time product "
                "profiles sequence tenant_uid uid version",
    "product": "cpe_name data_classification feature lang name path uid url_string vendor_name version",
    "network_endpoint": "agent_list autonomous_system container domain hostname hw_info instance_uid interface_name "
                        "interface_uid intermediate_ips ip location mac name namespace_pid os owner port "
                        "proxy_endpoint subnet_uid svc_name type type_id uid vlan_uid vpc_uid zone",
    "network_connection_info": "boundary boundary_id direction direction_id protocol_name protocol_num protocol_ver "
                               "protocol_ver_id session tcp_flags uid",
    "network_traffic": "bytes bytes_in bytes_out chunks chunks_in chunks_out packets packets_in packets_out",
    "firewall_rule": "category condition desc duration match_details match_location name rate_limit sensitivity "
                     "type uid version",
    "tls": "alert certificate certificate_chain cipher client_ciphers extension_list handshake_dur ja3_hash ja3s_hash "
           "key_length sans server_ciphers sni tls_extension_list version",
    "dns_query": "class hostname opcode opcode_id packet_uid type",
    "dns_answer": "class flag_ids flags packet_uid rdata ttl type",
    "http_request": "args http_headers http_method length referrer uid url user_agent version x_forwarded_for",
    "http_response": "code content_type http_headers latency length message status",
    "url": "categories category_ids domain hostname path port query_string resource_type scheme subdomain url_string",
}
OCSF_TYPES = {  # attribute -> object type, for the attributes written
    "metadata": "metadata", "product": "product", "src_endpoint": "network_endpoint",
    "dst_endpoint": "network_endpoint",
    "connection_info": "network_connection_info", "traffic": "network_traffic", "firewall_rule": "firewall_rule",
    "tls": "tls", "query": "dns_query", "answers": "dns_answer", "http_request": "http_request",
    "http_response": "http_response", "url": "url",
}
OCSF_TIMESTAMPS = {"time", "start_time", "end_time", "query_time", "response_time"}  # the datetime profile adds *_dt
OCSF_ENUMS = {  # attribute: {id: caption} (dictionary.json, and the classes' activity_id)
    "action_id": {1: "Allowed", 2: "Denied"}, "disposition_id": {1: "Allowed", 2: "Blocked"},
    "status_id": {1: "Success", 2: "Failure"}, "severity_id": {1: "Informational"},
}
OCSF_ACTIVITIES = {
    4001: {2: "Close", 5: "Refuse"}, 4003: {2: "Response"}, 0: {99: "Other"},
    4002: {0: "Unknown", 1: "Connect", 2: "Delete", 3: "Get", 4: "Head", 5: "Options", 6: "Post", 7: "Put", 8: "Trace",
           99: "Other"},
}
OCSF_CAPTIONS = {4001: ("Network Activity", 4, "Network Activity"), 4002: ("HTTP Activity", 4, "Network Activity"),
                 4003: ("DNS Activity", 4, "Network Activity"), 0: ("Base Event", 0, "Uncategorized")}


def connection(**changes: Any) -> dict[str, Any]:
    fields = {**sample(1, decision="allow"), "stream": "gw-0/4242/2026-11-23T05:21:12.123456Z/w1", "seq": 7}
    fields.update(changes)
    return fields


def dns_record(**changes: Any) -> dict[str, Any]:
    rec = audit.DnsRecord(1_700_000_000.25, "svc", "[fd00::5]:5353")
    rec.qname, rec.qtype, rec.rcode, rec.decision, rec.reason = "api.test", "AAAA", "NOERROR", "allow", "allowed"
    rec.answers, rec.upstream_ms, rec.policy_version = [{"address": "2001:db8::1", "ttl": 30}], 1.25, "abc"
    return {**rec.fields(), audit.EVENT: rec.event, "stream": "pod/1/t", "seq": 2, **changes}


def request(**changes: Any) -> dict[str, Any]:
    rec = audit.RequestRecord(1_700_000_000.75, "c9", "svc", "10.1.0.9:40009")
    rec.host, rec.port, rec.upstream, rec.request = "api.test", 443, "[2001:db8::2]:443", 2
    rec.method, rec.path, rec.http_version, rec.status = "GET", "/v1/items", "HTTP/2.0", 200
    rec.bytes_up, rec.bytes_down, rec.decision, rec.reason = 12, 3400, "allow", "allowed"
    rec.rule, rec.policy_version, rec.duration_ms = "svc.yaml:7", "abc", 12.5
    return {**rec.fields(), audit.EVENT: rec.event, "stream": "pod/1/t", "seq": 4, **changes}


def checkpoint(signed: bool) -> dict[str, Any]:
    chain = Chain("pod/1/2026-11-23T05:21:12.123456Z", signer=signer() if signed else None)
    chain.record(sample(1))
    record = json.loads(chain.checkpoint(1_700_000_100.0, final=True))
    del record["chain"]
    return record


RECORDS = {
    "connection-allowed": connection(
        identity={"source": "token", "namespace": "payments", "serviceaccount": "api", "pod": "api-1"},
        upstream="127.0.0.1:443", resolved=["127.0.0.1", "::1"], sni="api.test", rule="svc.yaml:5",
        policy_version="abc", dns_ms=0.5, connect_ms=1.25, bytes_up=10, bytes_down=2000),
    "connection-denied-ip-literal": connection(decision="deny", reason="forbidden_address", host="10.0.0.1",
                                               would_deny=True),
    "connection-transparent": connection(listener="transparent", protocol="tls", original_dst="203.0.113.9:443",
                                         original_dst_in_answer=False, ech=True, upstream="[2001:db8::2]:443"),
    "http-request": connection(protocol="http", port=80, request=3, status=404),
    "dns-allowed": dns_record(answers=[{"address": "192.0.2.1", "ttl": 5}, {"address": "2001:db8::1", "ttl": 30}]),
    "dns-denied": dns_record(decision="deny", reason="not_allowlisted", rcode="NXDOMAIN", answers=[],
                             upstream_ms=None),
    "request-allowed": request(),
    "request-with-query": request(method="POST", path="/v1/items?page=2&q=", http_version="HTTP/1.1"),
    "request-refused": request(method="DELETE", path="/admin", decision="deny", reason="request_not_allowed",
                               status=403, bytes_down=0, detail="DELETE /admin: no inspect entry allows it",
                               rule="svc.yaml:5"),
    "request-host-mismatch": request(method="PATCH", decision="deny", reason="host_mismatch", status=421),
    "request-bad": request(method=None, path=None, http_version=None, status=None, decision="deny",
                           reason="bad_request", upstream=None, request=None, rule=None),
    "gap": {"event": audit.GAP_EVENT, "ts": "2026-11-23T05:21:12.123456Z", "last_ts": "2026-11-23T05:22:00.000001Z",
            "refused": 12, "detail": "12 connections refused", "stream": "pod/1/t", "seq": 9},
    "checkpoint-signed": checkpoint(True),
    "checkpoint-unsigned": checkpoint(False),
}
UNKNOWN = {
    "future-event": {"event": "egress.tomorrow", "ts": "2026-11-23T05:21:12.123456Z", "method": "GET",
                     "path": "/x", "stream": "pod/1/t", "seq": 3, "nothing": None},
    "future-field": connection(limit="per_client"),
}


@pytest.mark.parametrize("fmt", ["ecs", "ocsf"])
@pytest.mark.parametrize("name", list(RECORDS))
def test_every_native_field_lands_somewhere_and_comes_back(name, fmt):
    """Mapped and read back, each kind of record gives exactly its native fields (the chain, not yet set, None)."""
    layout = FORMATS[fmt]
    native = RECORDS[name]
    assert layout.to_native(layout.to_format(dict(native))) == {**native, "chain": None}


@pytest.mark.parametrize("fmt", ["ecs", "ocsf"])
@pytest.mark.parametrize("name", list(UNKNOWN))
def test_fields_no_table_names_are_kept_under_the_formats_own_namespace(name, fmt):
    """A record type or field this version does not know is written under egressd.* / unmapped.*, never dropped."""
    layout, native = FORMATS[fmt], UNKNOWN[name]
    mapped = layout.to_format(dict(native))
    spill = mapped["egressd" if fmt == "ecs" else "unmapped"]
    assert all(spill[k] == v for k, v in native.items() if k in ("method", "limit"))
    back = layout.to_native(mapped)
    assert {k: v for k, v in back.items() if v is not None} == {k: v for k, v in native.items() if v is not None}


def leaves(value: Any, path: str = "") -> set[str]:
    """The dotted paths of a record's values (lists of objects contribute their objects' keys)."""
    if isinstance(value, dict) and not path.endswith(("identity", "unmapped.identity")):
        return set().union(*(leaves(v, f"{path}.{k}" if path else k) for k, v in value.items())) if value else {path}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return set().union(*(leaves(v, path) for v in value))
    return {path}


Row = tuple[str, set[str], set[str]]  # a documented place: native field, its paths, the record types


def documented() -> tuple[dict[str, list[Row]], dict[str, set[str]]]:
    """docs/forensics.md: per format, its rows (a native field placed differently per record type has one row per
    place); and the derived fields' paths."""
    text = DOCS.read_text()
    tables: dict[str, list[Row]] = {}
    derived: dict[str, set[str]] = {}
    for fmt, heading in (("ecs", "### ECS"), ("ocsf", "### OCSF")):
        section = text[text.index(heading):]
        section = section[: section.index("\n### ", 5)] if "\n### " in section[5:] else section
        rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
        tables[fmt] = [
            (row[0].strip("| `"), set(re.findall(r"`([^`]+)`", row[1])), {x.strip() for x in row[2].split(",")})
            for row in rows if len(row) == 4
        ]
        derived[fmt] = {p for row in rows if len(row) == 2 for p in re.findall(r"`([^`]+)`", row[0])}
    return tables, derived


def allowed_paths(fmt: str) -> set[str]:
    tables, derived = documented()
    return {p for _, paths, _ in tables[fmt] for p in paths} | derived[fmt]


def is_documented(path: str, allowed: set[str]) -> bool:
    """A documented field, an object documented as ``name.*``, or an empty list of documented objects."""
    return path in allowed or any(a.startswith(path + ".") or a == path + ".*" for a in allowed)


def ocsf_published(record: dict[str, Any]) -> list[str]:
    """The paths of an OCSF record that its class or their objects do not define (unmapped is free-form)."""
    bad = []
    names = OCSF_CLASSES[record["class_uid"]] | {f"{t}_dt" for t in OCSF_TIMESTAMPS}

    def walk(node: dict, names: set[str], path: str) -> None:
        for key, value in node.items():
            where = f"{path}{key}"
            if key not in names:
                bad.append(where)
            elif key in OCSF_TYPES and key != "unmapped":
                for item in value if isinstance(value, list) else [value]:
                    walk(item, set(OCSF_OBJECTS[OCSF_TYPES[key]].split()), where + ".")
    walk({k: v for k, v in record.items() if k != "unmapped"}, names, "")
    return bad


@pytest.mark.parametrize("fmt", ["ecs", "ocsf"])
@pytest.mark.parametrize("name", list(RECORDS))
def test_mapped_records_use_only_published_and_documented_names(name, fmt):
    """Every field of a mapped record is in docs/forensics.md, and, outside egressd.* / unmapped.*, is a field of
    the published schema."""
    mapped = FORMATS[fmt].to_format(dict(RECORDS[name]))
    allowed = allowed_paths(fmt)
    assert [p for p in sorted(leaves(mapped)) if not is_documented(p, allowed)] == []
    if fmt == "ecs":
        assert [p for p in leaves(mapped) if p not in ECS_FIELDS and not p.startswith("egressd.")] == []
    else:
        assert ocsf_published(mapped) == []


@pytest.mark.parametrize("name", list(RECORDS))
def test_ecs_values_are_the_allowed_ones(name):
    """event.kind, category, type, outcome and network.direction take only ECS's allowed values; times and durations
    keep their precision."""
    mapped, native = ECS.to_format(dict(RECORDS[name])), RECORDS[name]
    for path, values in ECS_VALUES.items():
        node: Any = mapped
        for key in path.split("."):
            node = node.get(key, {}) if isinstance(node, dict) else {}
        assert set(node if isinstance(node, list) else [node] if node != {} else []) <= values, path
    assert mapped["@timestamp"] == native["ts"] and mapped["ecs"]["version"] == "8.11.0"
    if native.get("duration_ms") is not None:
        assert mapped["event"]["duration"] == round(native["duration_ms"] * 1e6)


@pytest.mark.parametrize("name", list(RECORDS))
def test_ocsf_ids_and_captions_are_the_published_ones(name):
    """class, category, activity, type, action, disposition, status and severity ids come with their OCSF captions
    and type_uid = class_uid * 100 + activity_id; time is the record's ts in ms."""
    mapped, native = OCSF.to_format(dict(RECORDS[name])), RECORDS[name]
    uid = mapped["class_uid"]
    assert (mapped["class_name"], mapped["category_uid"], mapped["category_name"]) == OCSF_CAPTIONS[uid]
    assert mapped["activity_id"] in OCSF_ACTIVITIES[uid] and mapped["type_uid"] == uid * 100 + mapped["activity_id"]
    assert mapped["type_name"] == f"{mapped['class_name']}: {OCSF_ACTIVITIES[uid][mapped['activity_id']]}"
    for attribute, captions in OCSF_ENUMS.items():
        if attribute in mapped:
            caption = mapped[attribute.removesuffix("_id")]
            assert captions[mapped[attribute]] == caption, attribute
    assert mapped["time"] == epoch_ms(native["ts"]) and mapped["time_dt"] == native["ts"]
    assert mapped["metadata"]["version"] == "1.3.0" and mapped["metadata"]["sequence"] == native["seq"]


@pytest.mark.parametrize("fmt", ["ecs", "ocsf"])
def test_the_docs_tables_are_the_codes_tables(fmt):
    """Each documented row names one of the code's places for that native field (its paths under it) and the record
    types that place serves; no place is undocumented, no row stale."""
    mapping = {"ecs": ECS, "ocsf": OCSF}[fmt]
    code: dict[tuple[str, str], set[str]] = {}  # (native field, path) -> record types
    for place in mapping.common:
        code[(place.native, ".".join(place.path))] = {"all"}
    for event, table in mapping.events.items():
        for place in table.places:
            code.setdefault((place.native, ".".join(place.path)), set()).add(event.removeprefix("egress."))
    docs: dict[tuple[str, str], set[str]] = {}
    for native, paths, kinds in documented()[0][fmt]:
        under = [path for name, path in code if name == native and all(p == path or p.startswith(path + ".")
                                                                          for p in paths)]
        assert len(under) == 1, (native, paths, under)
        assert (native, under[0]) not in docs, f"two rows for {native} at {under[0]}"
        docs[(native, under[0])] = kinds
    assert docs == code


@pytest.mark.parametrize(
    ("fmt", "expected"), [("native", "native"), ("ecs", "ecs"), ("ocsf", "ocsf")], ids=["native", "ecs", "ocsf"],
)
def test_a_written_line_is_read_back_in_its_own_format(fmt, expected):
    """audit verify tells the formats apart by ECS's ecs.version and OCSF's class_uid."""
    line = Chain("pod/1/t", FORMATS[fmt]).record(sample(1))
    assert detect(json.loads(line)).name == expected
    assert detect({"event": "egress.connection"}) is NATIVE


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
fields = st.fixed_dictionaries({
    "host": st.one_of(st.none(), texts, st.sampled_from(["10.0.0.1", "2001:db8::1"])), "detail": st.none() | texts,
    "bytes_up": st.integers(0, 2**53), "duration_ms": st.integers(0, 10**9).map(lambda n: n / 1000),
    "service": st.none() | texts, "decision": st.sampled_from(["allow", "deny"]), "reason": texts,
    "identity": st.none() | st.dictionaries(st.sampled_from(["source", "namespace", "pod"]), texts),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=fields, fmt=st.sampled_from(["ecs", "ocsf"]))
def test_any_connection_record_round_trips_and_its_chain_verifies(changes, fmt):
    """Whatever text and numbers a record holds, its mapping reads back unchanged and the chain over it verifies."""
    native = connection(**changes)
    layout = FORMATS[fmt]
    assert layout.to_native(layout.to_format(dict(native))) == {**native, "chain": None}
    chain = Chain("pod/1/t", layout)
    lines = [chain.record(dict(native)), chain.checkpoint(1.0, final=True)]
    report = verify([Line(f"l:{n}", raw) for n, raw in enumerate(lines, 1)], detect=detect, require_final=True)
    assert report.ok and not report.findings, report.findings


requests = st.fixed_dictionaries({
    "method": st.none() | texts | st.sampled_from(["GET", "PATCH", "get"]),
    "path": st.none() | texts | st.sampled_from(["/a?b=1", "/a?", "?", "/a?b?c", ""]),
    "http_version": st.none() | texts | st.sampled_from(["HTTP/1.1", "HTTP/2.0", "HTTP/"]),
    "status": st.none() | st.integers(100, 599), "bytes_up": st.integers(0, 2**53), "detail": st.none() | texts,
    "decision": st.sampled_from(["allow", "deny"]), "duration_ms": st.integers(0, 10**9).map(lambda n: n / 1000),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=requests, fmt=st.sampled_from(["ecs", "ocsf"]))
def test_any_request_record_round_trips(changes, fmt):
    """Whatever method, target (with or without a query) and version a request holds, its mapping reads back
    unchanged."""
    native = request(**changes)
    layout = FORMATS[fmt]
    assert layout.to_native(layout.to_format(dict(native))) == {**native, "chain": None}


def dig(record: dict[str, Any], path: str) -> Any:
    node: Any = record
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


@pytest.mark.parametrize(
    ("fmt", "path", "expected"),
    [
        ("ecs", "event.category", ["network", "web"]), ("ecs", "event.type", ["access", "allowed"]),
        ("ecs", "event.action", "egress.request"), ("ecs", "http.request.method", "POST"),
        ("ecs", "url", {"path": "/v1/items", "query": "page=2&q="}), ("ecs", "http.version", "1.1"),
        ("ecs", "http.response.status_code", 200), ("ecs", "http.request.body.bytes", 12),
        ("ecs", "http.response.body.bytes", 3400), ("ecs", "destination.address", "api.test"),
        ("ecs", "destination.domain", "api.test"), ("ecs", "destination.ip", "2001:db8::2"),
        ("ecs", "destination.port", 443), ("ecs", "network.protocol", "http"), ("ecs", "event.duration", 12_500_000),
        ("ecs", "egressd", {"conn_id": "c9", "request": 2, "upstream": "[2001:db8::2]:443", "http_version": "HTTP/1.1",
                            "stream": "pod/1/t"}),
        ("ocsf", "class_uid", 4002), ("ocsf", "activity_id", 6), ("ocsf", "type_name", "HTTP Activity: Post"),
        ("ocsf", "http_request", {"http_method": "POST", "url": {"path": "/v1/items", "query_string": "page=2&q="},
                                  "version": "1.1"}),
        ("ocsf", "http_response", {"code": 200}),
        ("ocsf", "dst_endpoint", {"hostname": "api.test", "ip": "2001:db8::2", "port": 443}),
        ("ocsf", "traffic", {"bytes_out": 12, "bytes_in": 3400, "bytes": 3412}),
        ("ocsf", "connection_info.uid", "c9"), ("ocsf", "duration", 12), ("ocsf", "action_id", 1),
        ("ocsf", "firewall_rule", {"uid": "svc.yaml:7", "version": "abc"}),
        ("ocsf", "unmapped", {"request": 2, "upstream": "[2001:db8::2]:443", "http_version": "HTTP/1.1",
                              "duration_ms": 12.5, "stream": "pod/1/t"}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_request_lands_in_the_http_fields(fmt, path, expected):
    """A request's method, target, version, status and body bytes land in the schemas' HTTP fields, the rest in
    the format's own namespace."""
    assert dig(FORMATS[fmt].to_format(dict(RECORDS["request-with-query"])), path) == expected


@pytest.mark.parametrize(
    ("method", "activity_id", "activity_name", "type_name"),
    [
        ("CONNECT", 1, "Connect", "Connect"), ("DELETE", 2, "Delete", "Delete"), ("GET", 3, "Get", "Get"),
        ("HEAD", 4, "Head", "Head"), ("OPTIONS", 5, "Options", "Options"), ("POST", 6, "Post", "Post"),
        ("PUT", 7, "Put", "Put"), ("TRACE", 8, "Trace", "Trace"), ("PATCH", 99, "PATCH", "Other"),
        ("get", 99, "get", "Other"), (None, 0, "Unknown", "Unknown"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_an_http_activity_takes_its_activity_from_the_method(method, activity_id, activity_name, type_name):
    """OCSF 1.3.0's HTTP Activity has an activity per method (as sent); any other is 99 named by the method, none
    is 0 Unknown."""
    mapped = OCSF.to_format(dict(request(method=method)))
    assert (mapped["activity_id"], mapped["activity_name"], mapped["type_uid"], mapped["type_name"]) == (
        activity_id, activity_name, 400200 + activity_id, f"HTTP Activity: {type_name}")


def config(argv: list[str], env: dict[str, str], monkeypatch) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return run.config_from(build_parser().parse_args(["run", "--service", "svc", *argv]))


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, (None, 1000, 60.0, "native")),
        (["--audit-signing-key", "/k", "--audit-checkpoint-records", "5", "--audit-checkpoint-seconds", "2.5",
          "--audit-format", "ecs"], {}, ("/k", 5, 2.5, "ecs")),
        ([], {"EGRESSD_AUDIT_SIGNING_KEY": "/e", "EGRESSD_AUDIT_CHECKPOINT_RECORDS": "7",
              "EGRESSD_AUDIT_CHECKPOINT_SECONDS": "9", "EGRESSD_AUDIT_FORMAT": "ocsf"}, ("/e", 7, 9.0, "ocsf")),
    ],
    ids=["defaults", "flags", "environment"],
)
def test_the_audit_flags_and_their_variables_reach_the_config(monkeypatch, argv, env, expected):
    """Each audit flag is also read from EGRESSD_<FLAG>, with the documented defaults."""
    cfg = config(argv, env, monkeypatch)
    assert (cfg.audit_signing_key, cfg.audit_checkpoint_records, cfg.audit_checkpoint_seconds,
            cfg.audit_format) == expected


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--audit-checkpoint-records", "0"], {}, "--audit-checkpoint-records must be at least 1"),
        (["--audit-checkpoint-seconds", "0"], {}, "--audit-checkpoint-seconds positive"),
        ([], {"EGRESSD_AUDIT_FORMAT": "xml"}, "--audit-format must be one of native, ecs, ocsf"),
    ],
    ids=["no-records", "no-seconds", "unknown-format"],
)
def test_bad_audit_settings_are_refused_naming_the_flag(monkeypatch, argv, env, message):
    """A checkpoint interval of zero or an unknown format is refused with the flag's name."""
    with pytest.raises(ConfigError, match=message):
        config(argv, env, monkeypatch)
