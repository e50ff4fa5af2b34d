"""Gateway identity against hostile credentials: oversized and malformed JWTs, odd Proxy-Authorization, huge JWKS.

One gateway egressd (``--identity token,cidr``, a JWKS file, ``--max-header-bytes
65536`` so that tokens past egressd's own 16,384-character bound reach the
verifier) serves every row. A row is one plain-HTTP request to ``web.test``,
which the service ``checkout`` may reach, with the row's ``Proxy-Authorization``;
it must get its answer and one record whose ``identity`` is null unless the
token was good. No row's token may appear in a record. The JWKS cases start
key sources of their own. Rows ``tests/test_gateway.py`` already holds are
marked "(regression)".
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import ProxyProcess
from hostile.table import Case, Ledger, check_answer, check_record, params
from hostile.wire import Target, raw

ISSUER = "https://kubernetes.default.svc.cluster.local"


class Cluster:
    """The key of a cluster's service-account issuer, its JWKS, and tokens it signs."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key())), "use": "sig",
                    "alg": "RS256"}

    def jwks(self, kids: tuple[str, ...] = ("k1",)) -> str:
        return json.dumps({"keys": [{**self.jwk, "kid": kid} for kid in kids]})

    def token(self, account: str = "checkout-web", *, audience: str = "egressd", lifetime: float = 3600,
              kid: str = "k1", extra: dict | None = None) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": [audience], "sub": f"system:serviceaccount:checkout:{account}",
                  "iat": now - 10, "nbf": now - 10, "exp": now + int(lifetime), **(extra or {})}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def with_header(header: bytes) -> Callable[[Cluster], str]:
    """A token with this (base64url-encoded) header in front of a real token's payload and signature."""
    return lambda c: "Bearer " + b64(header) + "." + c.token().split(".", 1)[1]


def bearer(make: Callable[[Cluster], str]) -> Callable[[Cluster], str]:
    return lambda c: "Bearer " + make(c)


def basic(user_password: bytes) -> Callable[[Cluster], str]:
    return lambda c: "Basic " + base64.b64encode(user_password).decode()


def deny(name: str, auth: Callable[[Cluster], str], detail: str, answer: str = "403", reason: str = "bad_identity",
         marks: tuple = ()) -> Case:
    """A row refused with ``reason``; the record's detail holds ``detail`` and no identity."""
    return Case(name, auth, answer, reason, {"identity": None, "detail": detail}, marks)


NESTED = b"[" * 5500 + b"]" * 5500  # within the 16,384-character token bound once base64url-encoded
ROWS = [
    Case("valid-token", bearer(lambda c: c.token()), "200", "allowed", {"service": "checkout"}),
    Case("valid-token-in-basic", lambda c: "Basic " + base64.b64encode(b"egressd:" + c.token().encode()).decode(),
         "200", "allowed", {"service": "checkout"}),
    deny("token-for-another-audience", bearer(lambda c: c.token(audience="kubernetes")), "wrong audience"),
    deny("expired-token", bearer(lambda c: c.token(lifetime=-600)), "expired"),  # (regression)
    deny("token-over-16384-characters", bearer(lambda c: c.token(extra={"pad": "x" * 20_000})), "longer than 16384"),
    deny("token-of-two-parts", bearer(lambda c: ".".join(c.token().split(".")[:2])), "not header.payload.signature"),
    deny("token-of-empty-parts", bearer(lambda c: ".."), "not base64url JSON"),
    deny("token-header-not-base64", lambda c: "Bearer !!!." + c.token().split(".", 1)[1], "not base64url JSON"),
    deny("token-header-not-json", with_header(b"{alg"), "not base64url JSON"),
    deny("token-header-a-list", with_header(b"[1]"), "not a JSON object"),
    deny("token-header-nested-5500-deep", with_header(NESTED), "malformed token"),
    deny("token-header-huge-number", with_header(b'{"alg":' + b"9" * 5000 + b"}"), "not base64url JSON"),
    deny("token-alg-none", with_header(b'{"alg":"none","kid":"k1"}'), "alg none not allowed"),  # (regression)
    deny("token-alg-hs256", with_header(b'{"alg":"HS256","kid":"k1"}'), "alg HS256 not allowed"),
    deny("token-kid-unknown", bearer(lambda c: c.token(kid="rotated")), "unknown key id"),
    deny("token-kid-10000-characters", bearer(lambda c: c.token(kid="k" * 10_000)), "unknown key id"),
    deny("token-kid-not-a-string", with_header(b'{"alg":"RS256","kid":{"k":1}}'), "no kid"),
    deny("token-signature-garbage", bearer(lambda c: c.token().rsplit(".", 1)[0] + ".AAAA"), "bad signature"),
    deny("basic-not-base64", lambda c: "Basic %%%", "not base64"),
    deny("basic-without-colon", basic(b"just-a-token"), "no ':'"),
    deny("basic-not-utf8", basic(b"egressd:\xff\xfe"), "not base64 of UTF-8"),
    deny("scheme-digest", lambda c: "Digest username=x", "unsupported scheme"),
    deny("bearer-two-words", lambda c: "Bearer a b", "more than one word"),
    deny("bearer-latin1-bytes", lambda c: "Bearer \xe9t\xe9.\xe9.\xe9", "not base64url JSON"),
    deny("token-of-an-unlisted-account", bearer(lambda c: c.token("intruder")), "no service lists the identity",
         reason="no_identity"),
    Case("bearer-without-token", lambda c: "Bearer", "403", "no_identity", {"identity": None}),
    Case("nul-in-credentials", lambda c: "Bearer a\x00b", "400", "bad_request", {"identity": None}),
    Case("token-past-the-head-limit", bearer(lambda c: c.token(extra={"pad": "x" * 70_000})), "431", "bad_request"),
    Case("two-proxy-authorization-headers", lambda c: "Bearer " + c.token() + "\r\nProxy-Authorization: Bearer x",
         "400", "bad_request", {"identity": None}),
]


@dataclass
class Gateway:
    proxy: ProxyProcess
    ledger: Ledger
    target: Target
    cluster: Cluster


@pytest.fixture(scope="module")
def gateway(lab, module_proxy, tmp_path_factory) -> Gateway:
    """A gateway egressd: checkout (namespace checkout, account checkout-web) may reach web.test."""
    cluster = Cluster()
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(cluster.jwks())
    files = {"checkout.yaml": (
        "version: v1\nservice: checkout\nidentities:\n  - namespace: checkout\n    serviceAccount: checkout-web\n"
        f"allow:\n  - host: web.test\n    ports: [{lab.http.port}]\n")}
    proxy = module_proxy(files, "--identity", "token,cidr", "--token-issuer", ISSUER, "--jwks-file", str(jwks),
                         "--max-header-bytes", "65536", service="")
    return Gateway(proxy, Ledger(proxy), Target(proxy.address, {"http": lab.http.port}), cluster)


def request(authorization: str) -> bytes:
    return (f"GET http://web.test:{{http}}/ HTTP/1.1\r\nHost: web.test:{{http}}\r\n"
            f"Proxy-Authorization: {authorization}\r\nConnection: close\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize("case", params(ROWS))
def test_row(gateway: Gateway, case: Case) -> None:
    """Each hostile credential gets its answer and one record naming no identity unless the token was good; no
    token is ever written to the record."""
    authorization = case.send(gateway.cluster)
    gateway.ledger.begin()
    outcome = raw(request(authorization))(gateway.target)
    [rec] = gateway.ledger.take(1, case.name)
    expected = {k: v for k, v in case.record.items() if k != "detail"}
    check_answer(outcome, Case(case.name, None, case.answer, case.reason))
    check_record(rec, Case(case.name, None, case.answer, case.reason, expected))
    if "detail" in case.record:
        assert case.record["detail"] in (rec["detail"] or ""), (case.name, rec["detail"])
    token = authorization.partition(" ")[2]
    line = json.dumps(rec)
    assert len(token) < 24 or all(token[i:i + 24] not in line for i in range(0, len(token) - 24, 24)), case.name


def test_jwks_larger_than_its_limit_stops_the_start(lab, tmp_path: Path) -> None:
    """A JWKS file over 1 MiB stops egressd at start, naming the file and the limit."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [], "padding": "x" * (1 << 20)}))
    from egressd.identity.jwks import JwksError, JwksFile

    with pytest.raises(JwksError, match=r"jwks\.json: larger than 1048576 bytes"):
        JwksFile(path)


def test_jwks_of_thousands_of_keys_loads_and_verifies(tmp_path: Path) -> None:
    """A JWKS of 2,000 keys (just under 1 MiB) loads, and a token signed under its last kid verifies."""
    from egressd.identity.jwks import JwksFile
    from egressd.identity.token import TokenVerifier

    cluster = Cluster()
    kids = tuple(f"key-{i:04d}" for i in range(2000))
    path = tmp_path / "jwks.json"
    path.write_text(cluster.jwks(kids))
    assert path.stat().st_size < 1 << 20
    verifier = TokenVerifier(ISSUER, keys=JwksFile(path))
    identity = verifier.verify(cluster.token(kid=kids[-1]))
    assert (identity.namespace, identity.serviceaccount) == ("checkout", "checkout-web")


NESTED_JWKS = '{"keys": ' + "[" * 200_000 + "]" * 200_000 + "}"


def test_deeply_nested_jwks_stops_the_start_with_a_message(tmp_path: Path) -> None:
    """A JWKS file of deeply nested JSON stops the start with a JwksError naming the file."""
    from egressd.identity.jwks import JwksError, JwksFile

    path = tmp_path / "jwks.json"
    path.write_text(NESTED_JWKS)
    with pytest.raises(JwksError, match=r"jwks\.json: "):
        JwksFile(path)


def test_deeply_nested_jwks_on_reload_keeps_the_last_good_keys(tmp_path: Path) -> None:
    """A JWKS file rewritten as deeply nested JSON fails its reload: the last good keys stay and the next good
    file is still picked up."""
    from egressd.identity.jwks import JwksFile

    cluster = Cluster()
    path = tmp_path / "jwks.json"
    path.write_text(cluster.jwks())
    source = JwksFile(path)
    good = source.keys
    (tmp_path / "next.json").write_text(NESTED_JWKS)
    (tmp_path / "next.json").replace(path)
    assert asyncio.run(source.refresh()) is False
    assert source.keys is good
