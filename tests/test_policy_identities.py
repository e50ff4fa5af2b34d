"""Who a service is for: Policy.service_for and Policy.cidr_identity over the allowlists' identities:."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.identity import Identity
from egressd.policy import IdentityIndex, Mode, Policy, RuleSet, ServiceIdentity, ServicePolicy, load_policy
from egressd.policy.identities import clashes

FILES = {
    "payments-api.yaml": """version: v1
service: payments-api
identities:
  - namespace: payments
    serviceAccount: payments-api
  - namespace: payments
    serviceAccount: payments-worker
  - cidr: 10.20.0.0/24
  - cidr: 2001:db8:20::/64
""",
    "checkout-web.yaml": """version: v1
service: checkout-web
identities:
  - namespace: shop
    serviceAccount: checkout-web
  - cidr: 10.20.1.0/28
  - cidr: 10.20.1.16/32
  - cidr: 10.0.0.0/12
  - cidr: 2001:db8:20:1::/64
""",
    "refunds.yaml": """version: v1
service: refunds
allow: []
""",
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    directory = tmp_path_factory.mktemp("allowlists")
    for name, text in FILES.items():
        (directory / name).write_text(text)
    return load_policy(directory)


def _token(namespace: str | None, serviceaccount: str | None, source: str = "token") -> Identity:
    return Identity(source=source, namespace=namespace, serviceaccount=serviceaccount, pod="p", pod_uid="u")


SERVICE_FOR = {
    "token of a listed account": (_token("payments", "payments-api"), "payments-api"),
    "second account of the same service": (_token("payments", "payments-worker"), "payments-api"),
    "pod ip of a listed account": (_token("shop", "checkout-web", "pod-ip"), "checkout-web"),
    "account name right, namespace wrong": (_token("shop", "payments-api"), None),
    "namespace right, account unknown": (_token("payments", "default"), None),
    "a service without identities: is never guessed from a same-named account": (_token("refunds", "refunds"), None),
    "nor from its namespace": (_token("payments", "refunds"), None),
    "token without a namespace": (_token(None, "payments-api"), None),
    "cidr identity as cidr_identity makes it": (Identity(source="cidr", cidr="10.20.0.0/24"), "payments-api"),
    "cidr identity naming a range nobody lists": (Identity(source="cidr", cidr="10.20.0.0/25"), None),
    "cidr identity without a range": (Identity(source="cidr"), None),
    "fixed: the --service name itself": (Identity(source="fixed", service="refunds"), "refunds"),
    "fixed without a name": (Identity(source="fixed"), None),
    "an unknown source": (Identity(source="header", namespace="payments", serviceaccount="payments-api"), None),
}


@pytest.mark.parametrize("case", sorted(SERVICE_FOR))
def test_service_for(policy: Policy, case: str) -> None:
    """An identity maps to the one service whose identities: list it, and to nothing by a guess from names."""
    identity, expected = SERVICE_FOR[case]
    assert policy.service_for(identity) == expected


CIDR_IDENTITY = {
    "first address of a range": ("10.20.0.0", ("payments-api", "10.20.0.0/24")),
    "last address of a range": ("10.20.0.255", ("payments-api", "10.20.0.0/24")),
    "next to it, another service's small range": ("10.20.1.0", ("checkout-web", "10.20.1.0/28")),
    "just after the /28": ("10.20.1.15", ("checkout-web", "10.20.1.0/28")),
    "a one-host range": ("10.20.1.16", ("checkout-web", "10.20.1.16/32")),
    "just after the one host": ("10.20.1.17", None),
    "inside the /12": ("10.15.255.255", ("checkout-web", "10.0.0.0/12")),
    "just after the /12": ("10.16.0.0", None),
    "below every range": ("9.255.255.255", None),
    "IPv6": ("2001:db8:20::1", ("payments-api", "2001:db8:20::/64")),
    "IPv6, the neighbouring /64": ("2001:db8:20:1:ffff::", ("checkout-web", "2001:db8:20:1::/64")),
    "IPv6 outside": ("2001:db8:20:2::", None),
    "IPv4 as a dual-stack listener reports it": ("::ffff:10.20.0.7", ("payments-api", "10.20.0.0/24")),
    "IPv4-compatible IPv6 is not IPv4": ("::10.20.0.7", None),
    "IPv6 with a zone": ("2001:db8:20::1%eth0", ("payments-api", "2001:db8:20::/64")),
    "not an address": ("payments-api", None),
}


@pytest.mark.parametrize("case", sorted(CIDR_IDENTITY))
def test_cidr_identity(policy: Policy, case: str) -> None:
    """A client address maps to the service and the one identity range containing it, given as text or value."""
    text, expected = CIDR_IDENTITY[case]
    want = None if expected is None else (expected[0], Identity(source="cidr", cidr=expected[1]))
    assert policy.cidr_identity(text) == want
    if "%" not in text and text != "payments-api":
        assert policy.cidr_identity(ipaddress.ip_address(text)) == want


def test_cidr_identity_round_trips_through_service_for(policy: Policy) -> None:
    """The Identity that cidr_identity returns maps back to the same service through service_for."""
    service, identity = policy.cidr_identity("10.20.1.3")  # type: ignore[misc]
    assert identity.fields() == {"source": "cidr", "cidr": "10.20.1.0/28"}
    assert policy.service_for(identity) == service == "checkout-web"


def test_without_identities_nothing_is_found(tmp_path: Path) -> None:
    """Allowlists without identities: map no token, pod or address to a service; --service still names one."""
    for name in ("payments-api.yaml", "refunds.yaml"):
        (tmp_path / name).write_text(FILES[name].split("identities:")[0])
    policy = load_policy(tmp_path)
    assert len(policy.identities) == 0
    assert policy.service_for(_token("payments", "payments-api")) is None
    assert policy.cidr_identity("10.20.0.1") is None and policy.cidr_identity("2001:db8:20::1") is None
    assert policy.service_for(Identity(source="fixed", service="payments-api")) == "payments-api"


def test_shipped_allowlists_map_the_payments_account() -> None:
    """The shipped allowlists map payments/payments-api to payments-api and no account to checkout-web."""
    policy = load_policy(Path(__file__).resolve().parent.parent / "allowlists")
    assert policy.service_for(_token("payments", "payments-api")) == "payments-api"
    assert policy.service_for(_token("checkout-web", "checkout-web")) is None


def test_index_is_immutable_and_refuses_clashes() -> None:
    """An IdentityIndex cannot be changed, and cannot be built from identities that two services claim."""
    index = IdentityIndex([_service("a", "10.0.0.0/8")])
    with pytest.raises(AttributeError):
        index._accounts = {}  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"identities claimed twice: a.yaml:1 and b.yaml:1"):
        IdentityIndex([_service("a", "10.0.0.0/8"), _service("b", "10.1.0.0/16")])


# Property tests: random ranges against a brute-force scan.


def _service(name: str, *cidrs: str) -> ServicePolicy:
    identities = tuple(
        ServiceIdentity(f"{name}.yaml", line, cidr=ipaddress.ip_network(cidr)) for line, cidr in enumerate(cidrs, 1)
    )
    return ServicePolicy(name, Mode.ENFORCE, RuleSet(), f"{name}.yaml", identities)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(base: int, offset: int, prefix: int, v6: bool) -> Network:
    address = (ipaddress.IPv6Address if v6 else ipaddress.IPv4Address)(base + offset)
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


# Anywhere in either family, and near each other (in 10.0.0.0/16, 2001:db8::/112) so that overlaps are common.
_NETS = st.one_of(
    st.builds(_network, st.just(0), st.integers(0, 2**32 - 1), st.integers(1, 32), st.just(False)),
    st.builds(_network, st.just(0), st.integers(0, 2**128 - 1), st.integers(1, 128), st.just(True)),
    st.builds(_network, st.just(0x0A000000), st.integers(0, 2**16 - 1), st.integers(16, 32), st.just(False)),
    st.builds(_network, st.just(0x20010DB8 << 96), st.integers(0, 2**16 - 1), st.integers(112, 128), st.just(True)),
)
_FILES = st.lists(st.lists(_NETS, max_size=6), min_size=1, max_size=4)


def _services(files: list[list[Network]]) -> list[ServicePolicy]:
    return [_service(f"s{index}", *map(str, nets)) for index, nets in enumerate(files)]


def _overlap(a: Network, b: Network) -> bool:
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


def _earlier_named(message: str, file: str) -> tuple[str, int]:
    """The file:line a clash message names: "(s0.yaml:3)" in another file, "on line 3" in the same one."""
    other = re.search(r"\((\S+\.yaml):(\d+)\)", message)
    if other:
        return other[1], int(other[2])
    same = re.search(r"on line (\d+)", message)
    assert same is not None, message
    return file, int(same[1])


@given(_FILES)
def test_clashes_are_exactly_the_overlapping_pairs(files: list[list[Network]]) -> None:
    """clashes() reports one error per pair of overlapping ranges, at the later one, naming the earlier one."""
    services = _services(files)
    claims = [identity for service in services for identity in service.identities]
    expected = sorted(
        (later.file, later.line, earlier.file, earlier.line)
        for index, later in enumerate(claims)
        for earlier in claims[:index]
        if _overlap(later.cidr, earlier.cidr)  # type: ignore[arg-type]
    )
    found = [(error.file, error.line, *_earlier_named(error.message, error.file)) for error in clashes(services)]
    assert sorted(found) == expected


def _disjoint(files: list[list[Network]]) -> list[list[Network]]:
    """The ranges of ``files`` minus every one that overlaps a range kept before it."""
    kept: list[Network] = []
    result: list[list[Network]] = []
    for nets in files:
        result.append([])
        for net in nets:
            if not any(_overlap(net, other) for other in kept):
                kept.append(net)
                result[-1].append(net)
    return result


@given(_FILES, st.data())
def test_cidr_identity_matches_a_scan(files: list[list[Network]], data: st.DataObject) -> None:
    """cidr_identity finds the most specific range containing an address (the only one: ranges are disjoint);
    an IPv4-mapped address counts as the IPv4 address it carries."""
    services = _services(_disjoint(files))
    index = IdentityIndex(services)
    ranges = [(service.name, identity.cidr) for service in services for identity in service.identities]
    probes = [data.draw(st.ip_addresses())]
    for _, net in ranges:
        assert net is not None
        first, last = int(net.network_address), int(net.broadcast_address)
        inside = data.draw(st.integers(first, last))
        around = [value for value in (first - 1, last + 1) if 0 <= value < 2**net.max_prefixlen]
        family = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        probes += [family(value) for value in (first, inside, last, *around)]
    for ip in probes:
        client = ip.ipv4_mapped or ip if ip.version == 6 else ip  # type: ignore[union-attr]
        containing = [
            (net.prefixlen, name, str(net))
            for name, net in ranges
            if net is not None and net.version == client.version and client in net  # type: ignore[operator]
        ]
        expected = None
        if containing:
            _, name, cidr = max(containing)
            expected = (name, Identity(source="cidr", cidr=cidr))
        assert index.cidr_identity(ip) == expected
        assert index.cidr_identity(str(ip)) == expected
        if expected is not None:
            assert index.service_for(expected[1]) == expected[0]
