"""Address classification: which resolved addresses egressd refuses to dial, and allow_cidrs re-admission."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.addresses import AddressCheck, check, classify, embedded_ipv4, parse_cidr
from egressd.hostport import ip_text

ip = ipaddress.ip_address
net = ipaddress.ip_network

# Each range at its first and last address and just outside, plus a few well-known addresses.
IPV4_CASES = [
    ("0.0.0.0", "this_network"),
    ("0.255.255.255", "this_network"),
    ("1.0.0.0", None),
    ("1.1.1.1", None),
    ("8.8.8.8", None),
    ("9.255.255.255", None),
    ("10.0.0.0", "private"),
    ("10.255.255.255", "private"),
    ("11.0.0.0", None),
    ("100.63.255.255", None),
    ("100.64.0.0", "cgnat"),
    ("100.127.255.255", "cgnat"),
    ("100.128.0.0", None),
    ("126.255.255.255", None),
    ("127.0.0.0", "loopback"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.255", "loopback"),
    ("128.0.0.0", None),
    ("169.253.255.255", None),
    ("169.254.0.0", "link_local"),
    ("169.254.169.253", "link_local"),
    ("169.254.169.254", "metadata"),
    ("169.254.169.255", "link_local"),
    ("169.254.255.255", "link_local"),
    ("169.255.0.0", None),
    ("172.15.255.255", None),
    ("172.16.0.0", "private"),
    ("172.31.255.255", "private"),
    ("172.32.0.0", None),
    ("191.255.255.255", None),
    ("192.0.0.0", "ietf_protocol"),
    ("192.0.0.9", "ietf_protocol"),
    ("192.0.0.255", "ietf_protocol"),
    ("192.0.1.0", None),
    ("192.0.1.255", None),
    ("192.0.2.0", "documentation"),
    ("192.0.2.255", "documentation"),
    ("192.0.3.0", None),
    ("192.31.196.1", None),
    ("192.88.98.255", None),
    ("192.88.99.0", "reserved"),
    ("192.88.99.255", "reserved"),
    ("192.88.100.0", None),
    ("192.167.255.255", None),
    ("192.168.0.0", "private"),
    ("192.168.255.255", "private"),
    ("192.169.0.0", None),
    ("192.175.48.1", None),
    ("198.17.255.255", None),
    ("198.18.0.0", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.20.0.0", None),
    ("198.51.99.255", None),
    ("198.51.100.0", "documentation"),
    ("198.51.100.255", "documentation"),
    ("198.51.101.0", None),
    ("203.0.112.255", None),
    ("203.0.113.0", "documentation"),
    ("203.0.113.255", "documentation"),
    ("203.0.114.0", None),
    ("223.255.255.255", None),
    ("224.0.0.0", "multicast"),
    ("239.255.255.255", "multicast"),
    ("240.0.0.0", "reserved"),
    ("255.255.255.254", "reserved"),
    ("255.255.255.255", "broadcast"),
]

IPV6_CASES = [
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::2", "reserved"),
    ("::a00:1", "reserved"),  # IPv4-compatible ::10.0.0.1
    ("::808:808", "reserved"),  # IPv4-compatible ::8.8.8.8
    ("::ffff:ffff", "reserved"),
    ("::fffe:ffff:ffff", "reserved"),
    ("::ffff:0:0", "ipv4_mapped(this_network)"),
    ("::ffff:127.0.0.1", "ipv4_mapped(loopback)"),
    ("::ffff:10.1.2.3", "ipv4_mapped(private)"),
    ("::ffff:169.254.169.254", "ipv4_mapped(metadata)"),
    ("::ffff:8.8.8.8", "ipv4_mapped"),
    ("::ffff:255.255.255.255", "ipv4_mapped(broadcast)"),
    ("::1:0:0:0", "reserved"),
    ("64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("64:ff9b::", "nat64(this_network)"),
    ("64:ff9b::7f00:1", "nat64(loopback)"),
    ("64:ff9b::a9fe:a9fe", "nat64(metadata)"),
    ("64:ff9b::808:808", None),
    ("64:ff9b::ffff:ffff", "nat64(broadcast)"),
    ("64:ff9b::1:0:0", "reserved"),
    ("64:ff9b:1::", "nat64_local"),
    ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "nat64_local"),
    ("64:ff9b:2::", "reserved"),
    ("100::", "discard"),
    ("100::ffff:ffff:ffff:ffff", "discard"),
    ("100:0:0:1::", "reserved"),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("2000::", None),
    ("2001::", "teredo(broadcast)"),  # client 255.255.255.255 (checked first), server 0.0.0.0
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo(documentation)"),  # RFC 4380 example client 192.0.2.45
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "teredo(private)"),  # client 10.0.0.1
    ("2001:0:a00:1:8000:63bf:f7f7:f7f7", "teredo(private)"),  # server 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),  # server 65.54.227.120, client 8.8.8.8
    ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", "teredo(this_network)"),  # client 0.0.0.0
    ("2001:1::", "ietf_protocol"),
    ("2001:1::1", "ietf_protocol"),
    ("2001:2::", "benchmarking"),
    ("2001:2:0:ffff:ffff:ffff:ffff:ffff", "benchmarking"),
    ("2001:2:1::", "ietf_protocol"),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", "ietf_protocol"),
    ("2001:200::", None),
    ("2001:4860:4860::8888", None),
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("2001:db8::", "documentation"),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
    ("2001:db9::", None),
    ("2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("2002::", "6to4(this_network)"),
    ("2002:7f00:1::1", "6to4(loopback)"),
    ("2002:a9fe:a9fe::1", "6to4(metadata)"),
    ("2002:0808:0808::1", None),
    ("2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "6to4(broadcast)"),
    ("2003::", None),
    ("2620:4f:8000::1", None),
    ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("3fff::", "documentation"),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
    ("3fff:1000::", None),
    ("3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("4000::", "reserved"),
    ("5eff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("5f00::", "reserved"),
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("fc00::", "ula"),
    ("fd00:ec2::253", "ula"),
    ("fd00:ec2::254", "metadata"),
    ("fd00:ec2::255", "ula"),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "ula"),
    ("fe00::", "reserved"),
    ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("fe80::", "link_local"),
    ("fe80::1%eth0", "link_local"),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "link_local"),
    ("fec0::", "site_local"),
    ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "site_local"),
    ("ff00::", "multicast"),
    ("ff02::1", "multicast"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "multicast"),
]


@pytest.mark.parametrize(("address", "expected"), IPV4_CASES + IPV6_CASES)
def test_classify(address: str, expected: str | None) -> None:
    """Each address falls in the range the IANA special-purpose registries give it, most specific first."""
    assert classify(ip(address)) == expected


# (address, allow_cidrs, expected allowed_by or None when refused)
CHECK_CASES = [
    ("8.8.8.8", [], None),
    ("10.1.2.3", ["10.0.0.0/8"], "10.0.0.0/8"),
    ("10.1.2.3", ["192.168.0.0/16", "10.1.2.0/24", "10.0.0.0/8"], "10.1.2.0/24"),
    ("10.1.2.3", ["192.168.0.0/16"], None),
    ("169.254.169.254", ["169.254.0.0/16"], "169.254.0.0/16"),
    ("169.254.169.254", [], None),
    ("fd00::1", ["10.0.0.0/8"], None),  # an IPv4 network never contains an IPv6 address
    ("fd00::1", ["fd00::/8"], "fd00::/8"),
    ("10.0.0.1", ["fd00::/8", "::ffff:0:0/96"], None),  # nor an IPv6 network an IPv4 address
    ("::ffff:10.1.2.3", ["10.0.0.0/8"], "10.0.0.0/8"),
    ("::ffff:10.1.2.3", ["::ffff:0:0/96"], "::ffff:0:0/96"),
    ("::ffff:8.8.8.8", ["8.8.8.8/32"], "8.8.8.8/32"),
    ("::ffff:8.8.8.8", ["1.1.1.1/32"], None),
    ("64:ff9b::a00:1", ["10.0.0.0/8"], "10.0.0.0/8"),
    ("64:ff9b::a00:1", ["192.168.0.0/16"], None),
    ("2002:a00:1::1", ["10.0.0.0/8"], "10.0.0.0/8"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", ["10.0.0.0/8"], "10.0.0.0/8"),
    ("2001:0:c0a8:1:8000:63bf:f5ff:fffe", ["10.0.0.0/8"], None),  # server 192.168.0.1 is not covered
    ("2001:0:c0a8:1:8000:63bf:f5ff:fffe", ["10.0.0.0/8", "192.168.0.0/16"], "10.0.0.0/8"),
    ("::a00:1", ["10.0.0.0/8"], None),  # IPv4-compatible is not an embedding form that re-admits
]


@pytest.mark.parametrize(("address", "allow", "allowed_by"), CHECK_CASES)
def test_check_allow_cidrs(address: str, allow: list[str], allowed_by: str | None) -> None:
    """A forbidden address is dialled only when an allow_cidrs entry contains it or every forbidden embedded IPv4."""
    result = check(ip(address), [net(n) for n in allow])
    assert result.category == classify(ip(address))
    if result.category is None:
        assert (result.allowed, result.allowed_by) == (True, None)
    else:
        assert result.allowed == (allowed_by is not None)
        assert result.allowed_by == (net(allowed_by) if allowed_by else None)


DESCRIBE_CASES = [
    ("169.254.169.254", [], "169.254.169.254 is link-local (cloud metadata endpoint)"),
    ("fd00:ec2::254", [], "fd00:ec2::254 is unique local (cloud metadata endpoint)"),
    ("8.8.8.8", [], "8.8.8.8 is global unicast"),
    ("10.1.2.3", ["10.0.0.0/8"], "10.1.2.3 is private (RFC 1918); re-admitted by allow_cidrs entry 10.0.0.0/8"),
    ("100.64.0.1", [], "100.64.0.1 is shared address space (CGNAT, RFC 6598)"),
    ("64:ff9b::7f00:1", [], "64:ff9b::7f00:1 is a NAT64 address embedding 127.0.0.1, which is loopback"),
    ("2002:7f00:1::1", [], "2002:7f00:1::1 is a 6to4 address embedding 127.0.0.1, which is loopback"),
    (
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
        [],
        "2001:0:4136:e378:8000:63bf:f5ff:fffe is a Teredo address embedding 10.0.0.1, which is private (RFC 1918)",
    ),
]


@pytest.mark.parametrize(("address", "allow", "line"), DESCRIBE_CASES)
def test_describe(address: str, allow: list[str], line: str) -> None:
    """describe() gives one line naming the address, its class and the entry that re-admitted it."""
    assert check(ip(address), [net(n) for n in allow]).describe() == line


@pytest.mark.parametrize(
    ("address", "tail"),
    [
        ("::ffff:127.0.0.1", " is an IPv4-mapped address embedding 127.0.0.1, which is loopback"),
        ("::ffff:8.8.8.8", " is an IPv4-mapped address (embedding 8.8.8.8); mapped addresses are never dialled"),
    ],
)
def test_describe_mapped(address: str, tail: str) -> None:
    """describe() of a mapped address writes it as ::ffff:a.b.c.d on every Python and names the embedded IPv4."""
    assert check(ip(address)).describe() == f"{address}{tail}"


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("8.8.8.8", ()),
        ("fd00::1", ()),
        ("::ffff:10.0.0.1", ("10.0.0.1",)),
        ("64:ff9b::808:808", ("8.8.8.8",)),
        ("2002:0808:0808::1", ("8.8.8.8",)),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ("192.0.2.45", "65.54.227.120")),
    ],
)
def test_embedded_ipv4(address: str, embedded: tuple[str, ...]) -> None:
    """embedded_ipv4() returns the IPv4 addresses an embedding form carries (Teredo: client, then server)."""
    assert embedded_ipv4(ip(address)) == tuple(ip(e) for e in embedded)


def test_address_check_is_consistent_by_construction() -> None:
    """An AddressCheck whose allowed flag contradicts its category and allowed_by cannot be built."""
    with pytest.raises(ValueError):
        AddressCheck(ip("10.0.0.1"), "private", True, None)
    with pytest.raises(ValueError):
        AddressCheck(ip("8.8.8.8"), None, False, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/32", "10.1.2.3/32"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("fd00:ec2::254", "fd00:ec2::254/128"),
        ("::ffff:0:0/96", "::ffff:0:0/96"),
    ],
)
def test_parse_cidr_accepts(text: str, expected: str) -> None:
    """parse_cidr() accepts an address with a decimal prefix length, or a bare address as one host."""
    assert parse_cidr(text) == net(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/8", "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"),
        ("2001:db8::1/32", "2001:db8::1/32 has host bits set; did you mean 2001:db8::/32?"),
        ("10.0.0.0/33", "10.0.0.0/33: prefix length 33 is out of range 0-32 for IPv4"),
        ("fd00::/129", "fd00::/129: prefix length 129 is out of range 0-128 for IPv6"),
        (
            "10.0.0.0/255.0.0.0",
            "10.0.0.0/255.0.0.0: write the prefix length, not a mask or padded number: 10.0.0.0/8",
        ),
        ("10.0.0.0/08", "10.0.0.0/08: write the prefix length, not a mask or padded number: 10.0.0.0/8"),
        ("10.0.0.0/", "10.0.0.0/: the prefix length must be a decimal number 0-32"),
        ("10.0.0.0/-1", "10.0.0.0/-1: the prefix length must be a decimal number 0-32"),
        ("010.0.0.0/8", "010.0.0.0/8 is not a CIDR; write an IP address and prefix length, e.g. 10.0.0.0/8"),
        ("example.com/8", "example.com/8 is not a CIDR; write an IP address and prefix length, e.g. 10.0.0.0/8"),
        ("fe80::%eth0/64", "fe80::%eth0/64: zone identifiers are not accepted; write the network without '%zone'"),
        (" 10.0.0.0/8", "' 10.0.0.0/8' is not a CIDR; write one without spaces, e.g. 10.0.0.0/8"),
        ("", "'' is not a CIDR; write one without spaces, e.g. 10.0.0.0/8"),
    ],
)
def test_parse_cidr_rejects(text: str, message: str) -> None:
    """parse_cidr() rejects anything but a canonical network, naming the text and the fix."""
    with pytest.raises(ValueError) as info:
        parse_cidr(text)
    assert str(info.value) == message


# An independent oracle: the contract's ranges as a plain list, resolved by "most specific containing network".
ORACLE_V4 = [
    ("0.0.0.0/8", "this_network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link_local"),
    ("169.254.169.254/32", "metadata"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf_protocol"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
]
ORACLE_V4_NETS = [(net(n), name) for n, name in ORACLE_V4]


def oracle_v4(address: ipaddress.IPv4Address) -> str | None:
    containing = [(n.prefixlen, name) for n, name in ORACLE_V4_NETS if address in n]
    return max(containing)[1] if containing else None


def addresses_in(networks: list[str]) -> st.SearchStrategy[int]:
    """Integers inside the given networks, weighted towards their edges (and the addresses just outside)."""

    def inside(n: ipaddress.IPv4Network | ipaddress.IPv6Network) -> st.SearchStrategy[int]:
        lo, hi = int(n.network_address), int(n.broadcast_address)
        edges = [lo, hi, max(lo - 1, 0), min(hi + 1, 2**n.max_prefixlen - 1)]
        return st.one_of(st.sampled_from(edges), st.integers(lo, hi))

    return st.sampled_from([net(n) for n in networks]).flatmap(inside)


v4_ints = st.one_of(st.integers(0, 2**32 - 1), addresses_in([n for n, _ in ORACLE_V4]))


@given(v4_ints)
def test_classify_v4_matches_oracle(value: int) -> None:
    """For any IPv4 address, classify() names the most specific contract range containing it, else None."""
    address = ipaddress.IPv4Address(value)
    assert classify(address) == oracle_v4(address)


@given(st.integers(0, 2**32 - 1))
def test_mapped_is_always_forbidden(value: int) -> None:
    """Every ::ffff:a.b.c.d address is forbidden, tagged with the class of a.b.c.d when that is forbidden."""
    v4 = ipaddress.IPv4Address(value)
    inner = oracle_v4(v4)
    assert classify(ipaddress.IPv6Address(f"::ffff:{v4}")) == (f"ipv4_mapped({inner})" if inner else "ipv4_mapped")


@given(addresses_in(["64:ff9b::/96", "2002::/16", "2001::/32"]))
def test_embedding_forms_match_ipaddress_decoding(value: int) -> None:
    """NAT64, 6to4 and Teredo addresses are judged by the IPv4 addresses ipaddress itself decodes from them."""
    address = ipaddress.IPv6Address(value)
    if address in net("64:ff9b::/96"):
        form, inner = "nat64", [ipaddress.IPv4Address(address.packed[-4:])]
    elif address.sixtofour is not None:
        form, inner = "6to4", [address.sixtofour]
    elif address.teredo is not None:
        form, inner = "teredo", [address.teredo[1], address.teredo[0]]
    else:
        return  # an edge just outside the three prefixes; test_classify covers those
    forbidden = [oracle_v4(v4) for v4 in inner if oracle_v4(v4)]
    assert classify(address) == (f"{form}({forbidden[0]})" if forbidden else None)


@given(st.ip_addresses())
def test_classify_never_raises(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """classify() and check() return a verdict for every IPv4 and IPv6 address."""
    result = check(address, [net("10.0.0.0/8"), net("fd00::/8")])
    assert result.category == classify(address)
    assert result.describe().startswith(ip_text(address))


@given(st.integers(0, 2**128 - 1))
def test_v6_global_only_inside_2000_3(value: int) -> None:
    """An IPv6 address outside 2000::/3 is never global, except a NAT64 address of a global IPv4."""
    address = ipaddress.IPv6Address(value)
    if address not in net("2000::/3") and address not in net("64:ff9b::/96"):
        assert classify(address) is not None
