"""Fuzzing the token identity (:mod:`egressd.identity.token`): Proxy-Authorization values, unsigned garbage, and
signed tokens whose claims have every wrong type.

Three layers, as an attacker meets them: the header value (schemes, spacing,
base64, bytes that are not ASCII), a token that fails before any signature work
(segments, base64url, headers of any JSON shape, nested thousands deep, 16 KiB
long), and a token signed with the cluster's key whose claims are hostile (exp
as NaN, infinity or 10**400, audiences of mixed types, sub and kubernetes.io of
the wrong shape). Properties: BadIdentity is the only error and its message
never quotes the token; values round-trip through ``credentials``; and a token
we accept, PyJWT's own full verification (the independent oracle) accepts too.
"""

from __future__ import annotations

import base64
import inspect
import json
import re
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from egressd.identity import BadIdentity, Identity
from egressd.identity import token as token_module
from egressd.identity.jwks import JwksError, KeySource, parse_jwks
from egressd.identity.token import MAX_TOKEN_CHARS, TokenVerifier, credentials

FUZZ = settings.get_profile("egressd-fuzz")
FUZZ_HEAVY = settings.get_profile("egressd-fuzz-heavy")
ISSUER = "https://kubernetes.default.svc.cluster.local"
KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = json.dumps({"keys": [{**ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "ec", "alg": "ES256",
                             "use": "sig"}]}).encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verifier() -> TokenVerifier:
    """A verifier over a key set holding the test key, on the real clock (PyJWT, the oracle, reads it too)."""
    source = KeySource("jwks.json", None)
    source.keys = parse_jwks(JWKS, "jwks.json")
    return TokenVerifier(ISSUER, keys=source, cache_size=16)


_MESSAGES = inspect.getsource(token_module)  # the words messages are made of


def not_quoted(message: str, secret: str) -> bool:
    """No 12 characters in a row of ``secret`` appear in ``message``, unless they are words of the module's own
    messages (hypothesis draws strings from the source it tests: "uthorization" is no leak)."""
    windows = (secret[i : i + 12] for i in range(max(len(secret) - 11, 0)))
    return not any(window in message for window in windows if window.strip() and window not in _MESSAGES)


# -- Proxy-Authorization ------------------------------------------------------------------------------------------

_SCHEMES = st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "basic", "Digest", "Negotiate", "", "Bearer:"])
_SPACES = st.sampled_from([" ", " ", "  ", "\t", "", " \t "])
_TOKENS = st.one_of(st.from_regex(r"[A-Za-z0-9_=.-]{1,60}", fullmatch=True),
                    st.text(max_size=40), st.just("a" * MAX_TOKEN_CHARS))


@st.composite
def authorization(draw: st.DrawFn) -> bytes:
    """A Proxy-Authorization value: a scheme, spacing, and a token, base64 of user:token, or anything."""
    scheme, space = draw(_SCHEMES), draw(_SPACES)
    kind = draw(st.sampled_from(["token", "basic", "bytes"]))
    if kind == "token":
        rest = draw(_TOKENS).encode("utf-8", "surrogatepass")
    elif kind == "basic":
        pair = f"{draw(st.text(max_size=8))}{draw(st.sampled_from([':', '', '::']))}{draw(_TOKENS)}"
        rest = base64.b64encode(pair.encode("utf-8", "surrogatepass"))
        rest = draw(st.sampled_from([rest, rest.rstrip(b"="), rest + b"=", rest[:-1], rest.replace(b"+", b"-")]))
    else:
        rest = draw(st.binary(max_size=60))
    return scheme.encode() + space.encode() + rest + draw(st.sampled_from([b"", b" ", b"\t", b" more"]))


@FUZZ
@given(authorization())
def test_credentials_gives_a_token_none_or_bad_identity(value: bytes) -> None:
    """Any Proxy-Authorization gives a token, None or BadIdentity (never another error), never quoting the value."""
    try:
        token = credentials(value)
    except BadIdentity as exc:
        assert not_quoted(str(exc), value.decode("latin-1"))
        return
    assert token is None or (isinstance(token, str) and token)


@FUZZ
@given(st.from_regex(r"[!-~]{1,200}", fullmatch=True),
       st.text(st.characters(exclude_characters=":", exclude_categories=["Cs"]), max_size=12),
       st.sampled_from(["Bearer", "bearer", "Basic", "BASIC"]))
def test_a_token_comes_back_out_of_either_scheme(token: str, user: str, scheme: str) -> None:
    """A token sent as Bearer, or as Basic user:token, is the token credentials() takes out."""
    if scheme.lower() == "bearer":
        value = f"{scheme} {token}".encode()
    else:
        value = scheme.encode() + b" " + base64.b64encode(f"{user}:{token}".encode("utf-8", "surrogatepass"))
    assert credentials(value) == token


# -- tokens that fail before any signature work --------------------------------------------------------------------

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
_ALGS = st.one_of(st.sampled_from(["ES256", "RS256", "none", "HS256", "es256", "ES256 ", "ES256\x00"]), _JSON)
_KIDS = st.one_of(st.sampled_from(["ec", "unknown", "", "ec\x00", "x" * 5000]), _JSON)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A JOSE header of any shape: alg and kid of every JSON type, extra members, not an object, nested deep."""
    kind = draw(st.sampled_from(["object"] * 6 + ["other json", "deep", "not json", "not utf-8"]))
    if kind == "object":
        header = {"alg": draw(_ALGS), "kid": draw(_KIDS), **draw(st.dictionaries(st.text(max_size=5), _JSON,
                                                                                  max_size=2))}
        return json.dumps(header).encode()
    if kind == "other json":
        return json.dumps(draw(_JSON)).encode()
    if kind == "deep":
        depth = draw(st.integers(500, 6000))
        return b"[" * depth + b"]" * depth
    if kind == "not json":
        return draw(st.binary(max_size=40))
    return b'{"alg": "ES256", "kid": "\xff\xfe"}'


@st.composite
def unsigned_tokens(draw: st.DrawFn) -> str:
    """header.payload.signature with a hostile header and anything after it, its segments mangled now and then."""
    segments = [b64(draw(headers())), b64(draw(st.binary(max_size=40))), b64(draw(st.binary(max_size=64)))]
    mangle = draw(st.sampled_from(["none"] * 6 + ["padding", "standard alphabet", "non-ascii", "segments",
                                                  "empty segments", "spaces"]))
    if mangle == "padding":
        segments[0] += "=="
    elif mangle == "standard alphabet":
        segments[0] = base64.b64encode(base64.urlsafe_b64decode(segments[0] + "=" * (-len(segments[0]) % 4))).decode()
    elif mangle == "non-ascii":
        segments[draw(st.integers(0, 2))] += draw(st.sampled_from(["é", "\u0660", "\ud800", "\x00"]))
    elif mangle == "segments":
        segments = segments[: draw(st.integers(1, 2))] + ([] if draw(st.booleans()) else segments * 2)
    elif mangle == "empty segments":
        segments = ["", "", ""]
    elif mangle == "spaces":
        segments[1] = " " + segments[1]
    return ".".join(segments)


@FUZZ
@given(unsigned_tokens())
@example(b64(b'{"alg": ["ES256"], "kid": "ec"}') + ".e30.c2ln")
@example(b64(b'{"alg": {"a": 1}, "kid": "ec"}') + ".e30.c2ln")
@example(b64(b'{"alg": "ES256", "kid": ["ec"]}') + ".e30.c2ln")
@example(b64(b"[" * 5000 + b"]" * 5000) + ".e30.c2ln")
@example("a" * (MAX_TOKEN_CHARS * 64))
def test_a_token_that_is_not_signed_is_bad_identity(token: str) -> None:
    """Any token that is not signed by the cluster's key is refused with BadIdentity (not TypeError, RecursionError
    or any other), and the message never quotes it."""
    with pytest.raises(BadIdentity) as info:
        verifier().verify(token)
    assert not_quoted(str(info.value), token)


# -- signed tokens with hostile claims -----------------------------------------------------------------------------

_NUMBERS = st.sampled_from([3600, -3600, 100, -100, 0.5, float("nan"), float("inf"), float("-inf"), 10**400, True,
                            "3600", None, [3600], 2**63])


def _time_claim(draw: st.DrawFn, offset_from_now: bool = True) -> object:
    value = draw(_NUMBERS)
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 10**6 and offset_from_now:
        return int(time.time()) + value if isinstance(value, int) else time.time() + 3600 + value
    return value


@st.composite
def claim_sets(draw: st.DrawFn) -> dict:
    """A service-account token's claims, each right, missing or of a wrong type or value."""
    claims: dict = {}

    def maybe(name: str, good: object, bad: st.SearchStrategy) -> None:
        choice = draw(st.integers(0, 9))
        if choice < 7:
            claims[name] = good
        elif choice < 9:
            claims[name] = draw(bad)

    maybe("iss", ISSUER, st.sampled_from(["https://evil", ISSUER + " ", None, [ISSUER], 1]))
    maybe("aud", draw(st.sampled_from([["egressd"], "egressd", ["other", "egressd"]])),
          st.sampled_from([["egressd", 5], ["egressd", None], {"egressd": 1}, ["other"], "", None, [["egressd"]],
                           ["egressd"] * 1000]))
    claims["exp"] = _time_claim(draw) if draw(st.integers(0, 9)) else int(time.time()) + 3600
    if draw(st.booleans()):
        claims["nbf"] = _time_claim(draw)
    if draw(st.booleans()):
        claims["iat"] = _time_claim(draw)
    maybe("sub", "system:serviceaccount:shop:checkout",
          st.sampled_from(["system:serviceaccount:shop", "system:serviceaccount:a:b:c", "system:serviceaccount::x",
                           "user", 5, None, ["system:serviceaccount:shop:checkout"], {"a": 1}]))
    good_k8s = {"namespace": "shop", "serviceaccount": {"name": "checkout", "uid": "u"},
                "pod": {"name": "checkout-1", "uid": "p"}}
    maybe("kubernetes.io", good_k8s, st.one_of(_JSON, st.fixed_dictionaries({
        "namespace": st.one_of(st.just("shop"), _JSON, st.just("x" * 300)),
        "serviceaccount": st.one_of(st.just({"name": "checkout"}), _JSON),
        "pod": st.one_of(st.none(), st.just({"name": 5, "uid": ["u"]}), _JSON),
    })))
    return claims


def _sign(claims: dict) -> str:
    """The claims signed with the cluster's key as they are (PyJWT's encode would refuse some of them)."""
    return jwt.PyJWS().encode(json.dumps(claims).encode(), KEY, algorithm="ES256", headers={"kid": "ec"})


def _pyjwt_accepts(token: str) -> bool:
    """PyJWT's full verification: signature, exp required and checked, nbf, iat, iss, aud, sub, with our leeway."""
    try:
        jwt.decode(token, KEY.public_key(), algorithms=["ES256"], audience="egressd", issuer=ISSUER, leeway=30,
                   options={"require": ["exp", "iss", "aud"]})
    except Exception:  # noqa: BLE001 - the oracle refuses however it fails (PyJWT leaks OverflowError on exp=inf)
        return False
    return True


@FUZZ_HEAVY
@given(claim_sets())
@example({"iss": ISSUER, "aud": ["egressd"], "exp": float("nan"), "sub": "system:serviceaccount:shop:checkout"})
@example({"iss": ISSUER, "aud": ["egressd"], "exp": float("inf"), "sub": "system:serviceaccount:shop:checkout"})
@example({"iss": ISSUER, "aud": ["egressd"], "exp": 10**400, "sub": "system:serviceaccount:shop:checkout"})
@example({"iss": ISSUER, "aud": ["egressd", 5], "exp": 2**40, "sub": "system:serviceaccount:shop:checkout"})
@example({"iss": ISSUER, "aud": "egressd", "exp": 2**40, "nbf": float("nan"),
          "sub": "system:serviceaccount:shop:checkout"})
@example({"iss": ISSUER, "aud": "egressd", "exp": 2**40, "iat": None, "sub": "system:serviceaccount:shop:checkout"})
@example({"iss": ISSUER, "aud": "egressd", "exp": 2**40, "sub": 5,
          "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "checkout"}}})
def test_a_signed_token_is_accepted_only_as_pyjwt_would(claims: dict) -> None:
    """A token signed by the cluster's key with any claims gives an Identity or BadIdentity (nothing else); one we
    accept, PyJWT's full verification accepts too, and what it names is text of at most 253 characters."""
    token = _sign(claims)
    try:
        identity = verifier().verify(token)
    except BadIdentity as exc:
        assert not_quoted(str(exc), token)
        return
    assert isinstance(identity, Identity)
    assert _pyjwt_accepts(token), f"egressd accepted claims PyJWT refuses: {claims}"
    for value in (identity.namespace, identity.serviceaccount, identity.pod, identity.pod_uid):
        assert value is None or (isinstance(value, str) and 0 < len(value) <= 253)


# -- findings, kept as regression cases ----------------------------------------------------------------------------

_GOOD_CLAIMS = {"iss": ISSUER, "aud": ["egressd"], "sub": "system:serviceaccount:shop:checkout"}
UNSIGNED = [
    ("alg-list", b'{"alg": ["ES256"], "kid": "ec"}', "alg unknown not allowed"),
    ("alg-object", b'{"alg": {"a": 1}, "kid": "ec"}', "alg unknown not allowed"),
    ("header-nested-5000-deep", b"[" * 5000 + b"]" * 5000, "malformed token (the header is not"),
]


@pytest.mark.parametrize(("case", "header", "message"), UNSIGNED, ids=[c[0] for c in UNSIGNED])
def test_a_header_of_the_wrong_shape_is_bad_identity(case: str, header: bytes, message: str) -> None:
    """An alg of a list or object (TypeError: unhashable) and a header nested thousands deep (RecursionError on
    Python 3.11) are refused as malformed, before any key is looked at."""
    with pytest.raises(BadIdentity, match=re.escape(message)):
        verifier().verify(b64(header) + ".e30.c2ln")


def _in(seconds: float) -> int:
    return int(time.time() + seconds)


SIGNED = [  # (case, claims changed, message, whether PyJWT accepts it)
    ("exp-nan", {"exp": float("nan")}, "exp is not a finite number", False),
    ("exp-infinity", {"exp": float("inf")}, "exp is not a finite number", False),
    ("exp-10**400", {"exp": 10**400}, "exp is not a finite number", True),
    ("nbf-nan", {"exp": _in(3600), "nbf": float("nan")}, "nbf is not a finite number", False),
    ("iat-null", {"exp": _in(3600), "iat": None}, "iat is not a number", False),
    ("aud-mixed-types", {"exp": _in(3600), "aud": ["egressd", 5]}, "aud is not a string or a list of strings", False),
    ("sub-number", {"exp": _in(3600), "sub": 5,
                    "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "checkout"}}},
     "sub is not a string", False),
]


@pytest.mark.parametrize(("case", "changes", "message", "pyjwt"), SIGNED, ids=[c[0] for c in SIGNED])
def test_a_signed_token_with_a_malformed_claim_is_refused(case: str, changes: dict, message: str,
                                                          pyjwt: bool) -> None:
    """Signed claims JSON allows but no valid token has are refused, naming the claim: an exp of NaN or infinity
    never expired, 10**400 raised OverflowError, a null iat or a NaN nbf was ignored, an audience list or sub of
    other types passed."""
    token = _sign({**_GOOD_CLAIMS, **changes})
    with pytest.raises(BadIdentity, match=message):
        verifier().verify(token)
    assert _pyjwt_accepts(token) is pyjwt


# -- JWKS documents ------------------------------------------------------------------------------------------------


@st.composite
def jwks_documents(draw: st.DrawFn) -> bytes:
    """A JWKS: the real key beside keys of every wrong shape (kty, kid, alg, crv of any JSON type), or not JSON."""
    good = json.loads(JWKS)["keys"][0]
    keys = [good] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 4))):
        key = dict(good)
        key[draw(st.sampled_from(["kty", "kid", "alg", "crv", "use", "x"]))] = draw(_JSON)
        keys.insert(draw(st.integers(0, len(keys))), key)
    doc = draw(st.sampled_from([{"keys": keys}, {"keys": keys}, keys, {"keys": "x"}]))
    return draw(st.sampled_from([json.dumps(doc).encode()] * 4 + [b"[" * 100_000 + b"]" * 100_000, b"\xff"]))


@FUZZ
@given(jwks_documents())
@example(json.dumps({"keys": [{"kty": ["EC"], "kid": "x"}]}).encode())
def test_a_jwks_document_gives_keys_or_jwks_error(document: bytes) -> None:
    """Any JWKS document gives a key set or JwksError, never another exception."""
    try:
        parse_jwks(document, "jwks.json")
    except JwksError:
        pass


def test_a_jwks_nested_100000_deep_is_jwks_error() -> None:
    """A JWKS document of JSON nested 100,000 deep (within the 1 MiB allowed) is JwksError, not RecursionError."""
    with pytest.raises(JwksError, match="nested too deeply"):
        parse_jwks(b"[" * 100_000 + b"]" * 100_000, "jwks.json")
