"""Service-account tokens: Proxy-Authorization parsing, JWT verification against real keys, JWKS sources, cache."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import http.server
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from egressd.identity import BadIdentity, Identity
from egressd.identity import token as token_mod
from egressd.identity.jwks import JwksError, JwksFile, JwksUrl, parse_jwks
from egressd.identity.token import NEGATIVE_TTL, TokenVerifier, credentials
from egressd.metrics import Metrics
from harness import Clock

ISSUER = "https://kubernetes.default.svc.cluster.local"
NOW = 1_800_000_000.0




@functools.cache
def key(name: str):
    """Private keys made once per run: rsa, rsa2 (another RSA key), ec."""
    if name.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def jwk(name: str, kid: str) -> dict:
    """The public JWK of a key, as the API server publishes it."""
    pub = key(name).public_key()
    if name.startswith("rsa"):
        return {**RSAAlgorithm.to_jwk(pub, as_dict=True), "kid": kid, "use": "sig", "alg": "RS256"}
    return {**ECAlgorithm.to_jwk(pub, as_dict=True), "kid": kid, "use": "sig", "alg": "ES256"}


def jwks(*keys: dict) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def claims(**changes) -> dict:
    """A bound projected token's claims (pod-bound, audience egressd), one hour long."""
    base = {
        "aud": ["egressd"],
        "exp": int(NOW) + 3600,
        "iat": int(NOW) - 60,
        "nbf": int(NOW) - 60,
        "iss": ISSUER,
        "sub": "system:serviceaccount:shop:checkout",
        "kubernetes.io": {
            "namespace": "shop",
            "serviceaccount": {"name": "checkout", "uid": "6a1b3c2d-0000-4000-8000-000000000001"},
            "pod": {"name": "checkout-7d9f-abcde", "uid": "6a1b3c2d-0000-4000-8000-000000000002"},
        },
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(body: dict | bytes | None = None, name: str = "rsa", kid: str = "rsa-1", alg: str = "RS256") -> str:
    if isinstance(body, bytes):
        return jwt.api_jws.encode(body, key(name), algorithm=alg, headers={"kid": kid})
    return jwt.encode(claims() if body is None else body, key(name), algorithm=alg, headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_pem() -> str:
    """The classic confusion: HS256 with the RSA public key's PEM as the HMAC secret."""
    pem = key("rsa").public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def unsigned(alg: str = "none") -> str:
    head = b64(json.dumps({"alg": alg, "kid": "rsa-1"}).encode())
    return f"{head}.{b64(json.dumps(claims()).encode())}."


def assert_not_quoted(message: str, token: str) -> None:
    """No 20-character slice of the token (so not the token either, when it is that long) appears in ``message``."""
    for i in range(max(0, len(token) - 19)):
        assert token[i:i + 20] not in message, "the message quotes the token"


def write_jwks(path: Path, data: bytes) -> None:
    """Replace the file atomically (a new inode), as the kubelet updates a mounted ConfigMap."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwks(jwk("rsa", "rsa-1"), jwk("ec", "ec-1")))
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def verifier(jwks_file: Path, clock: Clock) -> TokenVerifier:
    return TokenVerifier(ISSUER, keys=JwksFile(jwks_file), clock=clock)


POD_BOUND = Identity(
    "token", namespace="shop", serviceaccount="checkout",
    pod="checkout-7d9f-abcde", pod_uid="6a1b3c2d-0000-4000-8000-000000000002",
)

ACCEPTED: list[tuple[str, Callable[[], str], Identity]] = [
    ("valid RS256", lambda: sign(), POD_BOUND),
    ("valid ES256", lambda: sign(name="ec", kid="ec-1", alg="ES256"), POD_BOUND),
    (
        "within leeway (exp 10 s ago, nbf and iat 10 s ahead)",
        lambda: sign(claims(exp=int(NOW) - 10, nbf=int(NOW) + 10, iat=int(NOW) + 10)),
        POD_BOUND,
    ),
    ("aud as a plain string", lambda: sign(claims(aud="egressd")), POD_BOUND),
    (
        "no kubernetes.io claim: sub names the service account",
        lambda: sign(claims(**{"kubernetes.io": None})),
        Identity("token", namespace="shop", serviceaccount="checkout"),
    ),
    (
        "not bound to a pod",
        lambda: sign(claims(**{"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "checkout"}}})),
        Identity("token", namespace="shop", serviceaccount="checkout"),
    ),
]


@pytest.mark.parametrize(("case", "make", "expected"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted(verifier: TokenVerifier, case: str, make: Callable[[], str], expected: Identity) -> None:
    """A token signed by a key of the JWKS, for egressd, from the issuer and in its lifetime names its pod."""
    assert verifier.verify(make()) == expected


REFUSED: list[tuple[str, Callable[[], str], str]] = [
    ("expired", lambda: sign(claims(exp=int(NOW) - 100)), "expired 100 s ago"),
    ("not yet valid", lambda: sign(claims(nbf=int(NOW) + 100)), "not yet valid (nbf is 100 s ahead)"),
    ("iat in the future", lambda: sign(claims(iat=int(NOW) + 100)), "issued in the future (iat is 100 s ahead)"),
    ("wrong audience", lambda: sign(claims(aud=["https://kubernetes.default.svc"])), "wrong audience"),
    ("no audience", lambda: sign(claims(aud=None)), "wrong audience none"),
    ("wrong issuer", lambda: sign(claims(iss="https://evil.example")), "wrong issuer 'https://evil.example'"),
    ("no issuer", lambda: sign(claims(iss=None)), "wrong issuer none"),
    ("no exp", lambda: sign(claims(exp=None)), "malformed token (no exp)"),
    ("exp not a number", lambda: sign(claims(exp="soon")), "malformed token (exp is not a number)"),
    ("bad signature: another key under the same kid", lambda: sign(name="rsa2"), "bad signature"),
    ("alg none", lambda: unsigned("none"), "alg none not allowed"),
    ("HS256 with the public key's PEM as secret", hs256_with_public_pem, "alg HS256 not allowed"),
    ("RS384", lambda: sign(alg="RS384"), "alg RS384 not allowed"),
    ("ES256 header over an RSA key", lambda: sign(name="ec", kid="rsa-1", alg="ES256"), "does not match key"),
    ("unknown kid", lambda: sign(kid="rotated-away"), "unknown key id 'rotated-away'"),
    ("no kid", lambda: jwt.encode(claims(), key("rsa"), algorithm="RS256"), "no kid"),
    ("two parts", lambda: ".".join(sign().split(".")[:2]), "not header.payload.signature"),
    ("four parts", lambda: sign() + ".x", "not header.payload.signature"),
    ("header not base64", lambda: "!!!!." + sign().split(".", 1)[1], "header is not base64url JSON"),
    ("header not JSON", lambda: b64(b"{alg") + "." + sign().split(".", 1)[1], "header is not base64url JSON"),
    ("header a list", lambda: b64(b"[1]") + "." + sign().split(".", 1)[1], "header is not a JSON object"),
    ("payload not JSON (signed)", lambda: sign(b"not json"), "payload or signature is not base64url JSON"),
    ("signature not base64", lambda: sign().rsplit(".", 1)[0] + ".%%%", "malformed token"),
    (
        "neither kubernetes.io nor a service-account sub",
        lambda: sign(claims(sub="alice", **{"kubernetes.io": None})),
        "not a service-account token",
    ),
    (
        "sub and kubernetes.io disagree",
        lambda: sign(claims(sub="system:serviceaccount:other:admin")),
        "sub and kubernetes.io name different service accounts",
    ),
    ("too long", lambda: "a" * 20000, "longer than 16384"),
]


@pytest.mark.parametrize(("case", "make", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(verifier: TokenVerifier, case: str, make: Callable[[], str], message: str) -> None:
    """A token that is not valid is refused with BadIdentity naming what was wrong, never quoting the token."""
    token = make()
    with pytest.raises(BadIdentity) as info:
        verifier.verify(token)
    assert message in str(info.value)
    assert_not_quoted(str(info.value), token)
    exc = info.value  # no library exception chained (its text could carry token parts into a log)
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


class Counting:
    """Counts signature verifications (calls of the PyJWT decoder)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def decode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.decode(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counting:
    counting = Counting(token_mod._JWT)
    monkeypatch.setattr(token_mod, "_JWT", counting)
    return counting


def test_cache_hit_does_not_verify_again(verifier: TokenVerifier, counted: Counting) -> None:
    """The second verification of the same token is answered from the cache, without a signature check."""
    token = sign()
    assert verifier.verify(token) == verifier.verify(token) == POD_BOUND
    assert counted.calls == 1
    assert verifier.verify(sign(name="ec", kid="ec-1", alg="ES256")) == POD_BOUND
    assert counted.calls == 2


def test_cached_token_refused_once_expired(verifier: TokenVerifier, clock: Clock, counted: Counting) -> None:
    """A cached token is refused as expired once its exp (plus leeway) has passed."""
    token = sign(claims(exp=int(NOW) + 60))
    verifier.verify(token)
    clock.now = NOW + 60 + 29
    assert verifier.verify(token) == POD_BOUND
    clock.now = NOW + 60 + 31
    with pytest.raises(BadIdentity, match="expired 31 s ago"):
        verifier.verify(token)
    with pytest.raises(BadIdentity, match="expired"):
        verifier.verify(token)
    assert counted.calls == 2  # the last refusal was a full verification again, refused all the same


def test_negative_cache(verifier: TokenVerifier, clock: Clock, counted: Counting) -> None:
    """A token refused after a signature check is refused again from memory for NEGATIVE_TTL seconds."""
    token = sign(name="rsa2")
    for _ in range(3):
        with pytest.raises(BadIdentity, match="bad signature"):
            verifier.verify(token)
    assert counted.calls == 1
    clock.now = NOW + NEGATIVE_TTL
    with pytest.raises(BadIdentity, match="bad signature"):
        verifier.verify(token)
    assert counted.calls == 2


def test_cache_is_bounded(jwks_file: Path, clock: Clock, counted: Counting) -> None:
    """Past cache_size tokens the oldest is forgotten and costs a verification again."""
    verifier = TokenVerifier(ISSUER, keys=JwksFile(jwks_file), clock=clock, cache_size=2)
    tokens = [sign(claims(jti=str(n))) for n in range(3)]
    for token in tokens:
        verifier.verify(token)
    verifier.verify(tokens[2])
    assert counted.calls == 3
    verifier.verify(tokens[0])
    assert counted.calls == 4


def test_verifier_needs_an_issuer(jwks_file: Path) -> None:
    """An empty issuer is a configuration error, not a verifier that accepts any issuer."""
    with pytest.raises(ValueError, match="issuer is required"):
        TokenVerifier("", keys=JwksFile(jwks_file))


CREDENTIALS: list[tuple[str, bytes | str | None, str | None]] = [
    ("absent", None, None),
    ("empty", b"", None),
    ("Basic user:token", b"Basic " + base64.b64encode(b"egressd:eyJ.a.b"), "eyJ.a.b"),
    ("Basic :token", b"Basic " + base64.b64encode(b":eyJ.a.b"), "eyJ.a.b"),
    ("Basic user: (no token)", b"Basic " + base64.b64encode(b"egressd:"), None),
    ("Basic alone", b"Basic", None),
    ("Bearer", b"Bearer eyJ.a.b", "eyJ.a.b"),
    ("lower-case scheme", b"bearer eyJ.a.b", "eyJ.a.b"),
    ("lower-case basic", "basic " + base64.b64encode(b"x:eyJ.a.b").decode(), "eyJ.a.b"),
    ("extra spaces", b"  Bearer   eyJ.a.b  ", "eyJ.a.b"),
    ("Bearer alone", b"Bearer", None),
]


@pytest.mark.parametrize(("case", "value", "expected"), CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
def test_credentials(case: str, value: bytes | str | None, expected: str | None) -> None:
    """The JWT is the Bearer credential or the Basic password; no header or no token gives None."""
    assert credentials(value) == expected


SECRET = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0.c2lnbmF0dXJlc2lnbmF0dXJl"
BAD_CREDENTIALS: list[tuple[str, bytes, str]] = [
    ("Basic not base64", b"Basic " + SECRET.encode() + b"!!", "not base64"),
    ("Basic without ':'", b"Basic " + base64.b64encode(SECRET.encode()), "no ':'"),
    ("Basic not UTF-8", b"Basic " + base64.b64encode(b"u:\xff" + SECRET.encode()), "not base64 of UTF-8"),
    ("unknown scheme", b"Digest " + SECRET.encode(), "unsupported scheme"),
    ("no scheme: a bare token", SECRET.encode(), "unsupported scheme"),
    ("Bearer with two words", b"Bearer " + SECRET.encode() + b" more", "more than one word"),
]


@pytest.mark.parametrize(("case", "value", "message"), BAD_CREDENTIALS, ids=[c[0] for c in BAD_CREDENTIALS])
def test_credentials_malformed(case: str, value: bytes, message: str) -> None:
    """A malformed Proxy-Authorization raises BadIdentity whose message never quotes the value."""
    with pytest.raises(BadIdentity) as info:
        credentials(value)
    assert message in str(info.value)
    assert_not_quoted(str(info.value), SECRET)
    assert_not_quoted(str(info.value), value.decode("latin-1"))


@given(st.one_of(st.binary(max_size=200), st.builds(lambda b: b"Basic " + base64.b64encode(b), st.binary())))
def test_credentials_any_bytes(value: bytes) -> None:
    """Any header value gives a string, None or BadIdentity, never another exception."""
    try:
        assert credentials(value) is None or isinstance(credentials(value), str)
    except BadIdentity as exc:
        assert_not_quoted(str(exc), value.decode("latin-1"))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=80),
                 min_size=3, max_size=3).map(".".join),
        st.builds(lambda head: b64(head) + "." + sign().split(".", 1)[1], st.binary(max_size=80)),
    )
)
def test_verify_any_text(verifier: TokenVerifier, token: str) -> None:
    """Any text that is not a signed token is refused with BadIdentity, never another exception."""
    with pytest.raises(BadIdentity) as info:
        verifier.verify(token)
    assert_not_quoted(str(info.value), token)


# JWKS parsing and the file source


def test_jwks_skips_unusable_keys() -> None:
    """Keys of another type, curve or alg, without kid or with private parts are skipped, each with a reason."""
    p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
    private = RSAAlgorithm.to_jwk(key("rsa"), as_dict=True)
    short = RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 1024).public_key(), as_dict=True)
    doc = jwks(
        jwk("rsa", "good"),
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**p384, "kid": "p384"},
        {**jwk("rsa2", "ps"), "alg": "PS256"},
        {k: v for k, v in jwk("ec", "x").items() if k != "kid"},
        {**private, "kid": "private"},
        {**short, "kid": "short"},
        {**jwk("ec", "enc"), "use": "enc"},
        "not an object",
    )
    keys = parse_jwks(doc, "jwks.json")
    assert list(keys.keys) == ["good"]
    assert len(keys.skipped) == 8
    for why in ("kty 'oct'", "crv 'P-384'", "alg 'PS256'", "no kid", "private key", "RSA key of 1024 bits",
                "use is not sig", "not a JSON object"):
        assert any(why in s for s in keys.skipped), why


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "not JSON"),
        (b"[]", "not a JWKS"),
        (b'{"keys": []}', "no usable key"),
        (json.dumps({"keys": [{"kty": "oct", "k": "eA", "kid": "h"}]}).encode(), "no usable key"),
        (jwks(jwk("rsa", "same"), jwk("rsa2", "same")), "two different keys have kid 'same'"),
    ],
)
def test_jwks_refused(data: bytes, message: str) -> None:
    """A document that is not a JWKS, has no usable key or two keys under one kid is refused, naming where."""
    with pytest.raises(JwksError, match="^jwks.json: ") as info:
        parse_jwks(data, "jwks.json")
    assert message in str(info.value)


def test_jwks_same_key_twice_is_one_key() -> None:
    """The same key listed twice under its kid is one key, not an ambiguity."""
    assert list(parse_jwks(jwks(jwk("rsa", "k"), jwk("rsa", "k")), "x").keys) == ["k"]


def test_jwks_file_missing_or_unparsable(tmp_path: Path) -> None:
    """A JWKS file that is missing or not JSON stops start-up with an error naming the file and the fix."""
    with pytest.raises(JwksError, match=r"nope\.json: cannot read the JWKS .*kubectl get --raw /openid/v1/jwks"):
        JwksFile(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(JwksError, match=r"bad\.json: not JSON"):
        JwksFile(tmp_path / "bad.json")


def test_jwks_file_rotation(jwks_file: Path, clock: Clock) -> None:
    """A rewritten JWKS file is picked up without a restart: the new key verifies, the removed one no longer does."""
    metrics = Metrics()
    source = JwksFile(jwks_file, metrics=metrics)
    verifier = TokenVerifier(ISSUER, keys=source, clock=clock)
    old, new = sign(), sign(name="rsa2", kid="rsa-2")
    assert verifier.verify(old) == POD_BOUND  # and now cached
    with pytest.raises(BadIdentity, match="unknown key id 'rsa-2'"):
        verifier.verify(new)

    assert asyncio.run(source.refresh()) is False  # unchanged file: nothing read
    write_jwks(jwks_file, jwks(jwk("rsa2", "rsa-2"), jwk("ec", "ec-1")))
    assert asyncio.run(source.refresh()) is True
    assert verifier.verify(new) == POD_BOUND
    with pytest.raises(BadIdentity, match="unknown key id 'rsa-1'"):
        verifier.verify(old)
    assert metrics.jwks_refresh == {"success": 2}

    write_jwks(jwks_file, b"{ truncated")
    assert asyncio.run(source.refresh()) is False
    assert verifier.verify(sign(claims(jti="another"), name="rsa2", kid="rsa-2")) == POD_BOUND
    assert metrics.jwks_refresh == {"success": 2, "error": 1}
    jwks_file.unlink()
    assert asyncio.run(source.refresh()) is False
    assert metrics.jwks_refresh["error"] == 2


def test_jwks_file_unchanged_keys_keep_the_cache(jwks_file: Path, clock: Clock, counted: Counting) -> None:
    """A reload that adds a key keeps cached tokens of the keys that stayed (no verification again)."""
    source = JwksFile(jwks_file)
    verifier = TokenVerifier(ISSUER, keys=source, clock=clock)
    token = sign()
    verifier.verify(token)
    write_jwks(jwks_file, jwks(jwk("ec", "ec-1"), jwk("rsa2", "rsa-2"), jwk("rsa", "rsa-1")))
    assert asyncio.run(source.refresh()) is True
    verifier.verify(token)
    assert counted.calls == 1


def test_jwks_file_run_polls(jwks_file: Path) -> None:
    """run() notices a rewritten file by itself within its polling interval."""
    source = JwksFile(jwks_file)

    async def go() -> None:
        task = asyncio.create_task(source.run(interval=0.01))
        try:
            write_jwks(jwks_file, jwks(jwk("rsa2", "rsa-2")))
            await poll(lambda: "rsa-2" in source.keys.keys)
        finally:
            task.cancel()

    asyncio.run(go())


async def poll(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        await asyncio.sleep(0.01)


# The API server's JWKS over HTTPS


class JwksServer:
    """A tiny HTTPS server on 127.0.0.1 serving one JWKS document, in a thread; records what it was asked."""

    def __init__(self, ca: trustme.CA, token: str | None) -> None:
        self.document = jwks(jwk("rsa", "rsa-1"))
        self.status = 200
        self.token = token
        self.authorizations: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.authorizations.append(self.headers.get("Authorization"))
                status, body = server.status, server.document
                if self.path != "/openid/v1/jwks":
                    status, body = 404, b"not found"
                elif server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
                    status, body = 401, b"Unauthorized"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/openid/v1/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[JwksServer, Path, Path]]:
    """The server, the CA file and the token file (the pod's own service-account token)."""
    ca = trustme.CA()
    ca_file, token_file = tmp_path / "ca.crt", tmp_path / "token"
    ca.cert_pem.write_to_path(str(ca_file))
    token_file.write_text("reader-token-1\n")
    server = JwksServer(ca, "reader-token-1")
    try:
        yield server, ca_file, token_file
    finally:
        server.close()


def test_jwks_url_start_with_ca_and_bearer(api, clock: Clock) -> None:
    """start() fetches the JWKS over HTTPS with the CA, sending the token file's contents as Bearer, read anew."""
    server, ca_file, token_file = api
    metrics = Metrics()
    source = JwksUrl(server.url, ca_file=str(ca_file), token_file=str(token_file), metrics=metrics)

    async def go() -> None:
        await source.start()
        assert TokenVerifier(ISSUER, keys=source, clock=clock).verify(sign()) == POD_BOUND
        token_file.write_text("reader-token-2")
        server.token = "reader-token-2"
        assert await source.refresh() is False  # same keys
        assert server.authorizations == ["Bearer reader-token-1", "Bearer reader-token-2"]
        assert metrics.jwks_refresh == {"success": 2}

    asyncio.run(go())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("token", "HTTP 401; bind the service account to the ClusterRole system:service-account-issuer-discovery"),
        ("ca", "SSLCertVerificationError"),
        ("path", "HTTP 404"),
        ("document", "not a JWKS"),
    ],
)
def test_jwks_url_start_fails(api, tmp_path: Path, change: str, message: str) -> None:
    """start() raises JwksError naming the URL and the cause when the first fetch fails."""
    server, ca_file, token_file = api
    url = server.url
    if change == "token":
        server.token = "someone-else"
    elif change == "ca":
        ca_file = tmp_path / "other-ca.crt"
        trustme.CA().cert_pem.write_to_path(str(ca_file))
    elif change == "path":
        url = url.replace("jwks", "keys")
    else:
        server.document = b"[]"
    source = JwksUrl(url, ca_file=str(ca_file), token_file=str(token_file))
    with pytest.raises(JwksError) as info:
        asyncio.run(source.start())
    assert str(info.value).startswith(url)
    assert message in str(info.value)
    assert "reader-token" not in str(info.value)


def test_jwks_url_bad_configuration(tmp_path: Path) -> None:
    """A plain-HTTP URL, or a CA or token file that cannot be read, is refused when the source is built."""
    with pytest.raises(JwksError, match="give an https:// URL"):
        JwksUrl("http://127.0.0.1/openid/v1/jwks")
    with pytest.raises(JwksError, match="cannot load the CA file"):
        JwksUrl("https://127.0.0.1/openid/v1/jwks", ca_file=str(tmp_path / "none.crt"))
    with pytest.raises(JwksError, match="cannot read the token file"):
        JwksUrl("https://127.0.0.1/openid/v1/jwks", token_file=str(tmp_path / "none"))


def test_jwks_url_timeout() -> None:
    """A server that accepts the connection and never answers fails the fetch after the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        source = JwksUrl(f"https://127.0.0.1:{silent.getsockname()[1]}/openid/v1/jwks", timeout=0.2)
        with pytest.raises(JwksError, match=r"no answer within 0\.2 s"):
            asyncio.run(source.start())


def test_jwks_url_refresh_on_unknown_kid(api, clock: Clock) -> None:
    """An unknown kid refuses that token and wakes a fetch (at most once per 30 s); later tokens verify."""
    server, ca_file, token_file = api
    mono = Clock(1000.0)
    source = JwksUrl(server.url, ca_file=str(ca_file), token_file=str(token_file), clock=mono)
    verifier = TokenVerifier(ISSUER, keys=source, clock=clock)
    new, newer = sign(name="ec", kid="ec-1", alg="ES256"), sign(name="rsa2", kid="rsa-2")

    async def go() -> None:
        await source.start()
        task = asyncio.create_task(source.run())
        try:
            server.document = jwks(jwk("rsa", "rsa-1"), jwk("ec", "ec-1"))
            with pytest.raises(BadIdentity, match="unknown key id 'ec-1'"):
                verifier.verify(new)
            await poll(lambda: "ec-1" in source.keys.keys)
            assert len(server.authorizations) == 2
            assert verifier.verify(new) == POD_BOUND

            server.document = jwks(jwk("rsa", "rsa-1"), jwk("ec", "ec-1"), jwk("rsa2", "rsa-2"))
            mono.now += 29
            with pytest.raises(BadIdentity, match="unknown key id 'rsa-2'"):
                verifier.verify(newer)
            assert not source.pending  # less than 30 s since the last one: no fetch
            mono.now += 1
            with pytest.raises(BadIdentity, match="unknown key id 'rsa-2'"):
                verifier.verify(newer)
            await poll(lambda: "rsa-2" in source.keys.keys)
            assert verifier.verify(newer) == POD_BOUND
            assert len(server.authorizations) == 3
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(go())


def test_jwks_url_keeps_last_good_keys(api, clock: Clock) -> None:
    """When a refresh fails (server error, garbage) the last good keys stay in force and the error is counted."""
    server, ca_file, token_file = api
    metrics = Metrics()
    source = JwksUrl(server.url, ca_file=str(ca_file), token_file=str(token_file), metrics=metrics)
    verifier = TokenVerifier(ISSUER, keys=source, clock=clock)

    async def go() -> None:
        await source.start()
        server.status = 500
        assert await source.refresh() is False
        server.status, server.document = 200, b"<html>"
        assert await source.refresh() is False
        server.close()
        assert await source.refresh() is False

    asyncio.run(go())
    assert verifier.verify(sign()) == POD_BOUND
    assert metrics.jwks_refresh == {"success": 1, "error": 3}


def test_metrics_given_to_the_verifier_count_the_source(jwks_file: Path) -> None:
    """Metrics handed to the verifier count the refreshes of a source built without its own."""
    metrics = Metrics()
    source = JwksFile(jwks_file)
    TokenVerifier(ISSUER, keys=source, metrics=metrics)
    write_jwks(jwks_file, jwks(jwk("rsa2", "rsa-2")))
    asyncio.run(source.refresh())
    assert metrics.jwks_refresh == {"success": 1}
