"""Configuration values: resolv.conf defaults and flag address parsing."""

from __future__ import annotations

import pytest

from egressd.config import ConfigError, parse_hostport, system_resolvers


def test_resolvers_default_to_resolv_conf(tmp_path):
    """Without --resolver the nameservers of resolv.conf are used, port 53, scoped IPv6 zones dropped."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n"
                    "nameserver not-an-ip\noptions ndots:5\n")
    assert system_resolvers(str(conf)) == (("10.96.0.10", 53), ("fe80::1", 53))
    assert system_resolvers(str(tmp_path / "missing")) == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:3128", ("::1", 3128)),
        ("::1", ("::1", 53)),
        ("10.0.0.2", ("10.0.0.2", 53)),
    ],
)
def test_hostport_flags(text, expected):
    """Listen and resolver flags take IP[:PORT], IPv6 in brackets when a port follows."""
    assert parse_hostport(text, "--resolver", 53) == expected


@pytest.mark.parametrize("text", ["dns.example:53", "127.0.0.1:65536", "127.0.0.1:x", "[::1]x"])
def test_bad_hostport_flags_name_the_flag(text):
    """A bad address says which flag and what to write."""
    with pytest.raises(ConfigError, match="--resolver"):
        parse_hostport(text, "--resolver", 53)
