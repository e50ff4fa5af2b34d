"""The ``token`` identity source: a Kubernetes service-account token in ``Proxy-Authorization``.

A client pod sets ``HTTPS_PROXY=http://egressd:$TOKEN@gateway:3128`` with a
projected token of audience ``egressd``; curl, requests, httpx, Go and Java send
that as ``Basic base64("egressd:" + JWT)`` (the user name is ignored). ``Bearer
<JWT>`` is accepted too. :func:`credentials` takes the JWT out of the header;
:meth:`TokenVerifier.verify` checks it locally against the cluster's JWKS
(:mod:`egressd.identity.jwks`) and says who the client is:

1. ``alg`` is RS256 or ES256 (``none`` and HMAC are refused before any key is
   looked at, so a token "signed" with a public key as HMAC secret never verifies);
2. ``kid`` names a key of the set in force, of the type of ``alg``
   (unknown: the source is asked to refresh, this token is refused);
3. the signature (PyJWT);
4. ``iss`` equals the issuer, ``aud`` (strings only) holds the audience, ``exp``
   is required; ``exp``, ``nbf`` and ``iat``, when present finite numbers (JSON
   also carries NaN, Infinity and 10**400), are checked against the clock with
   ``leeway``; ``sub``, when present, is a string;
5. who: the ``kubernetes.io`` claims (namespace, service account, pod and its
   uid), else ``sub`` = ``system:serviceaccount:NS:NAME``.

A verified token is remembered by its SHA-256 (in memory only) until its
``exp``, so a busy client costs one verification per token, not one per
connection; a hit is still refused once ``exp`` has passed, or when the key that
verified it left the set. Refusals that cost a signature check are remembered
for ``NEGATIVE_TTL`` seconds, so one bad token sent in a loop costs one check.
Neither the token nor its hash is ever logged, put in a message or returned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

from jwt import PyJWT, PyJWTError
from jwt.exceptions import DecodeError, InvalidAlgorithmError, InvalidSignatureError

from egressd.identity import BadIdentity, Identity
from egressd.identity.jwks import ALGORITHMS, KeySet, KeySource
from egressd.metrics import Metrics

ALLOWED_ALGS = frozenset(ALGORITHMS.values())  # RS256, ES256
MAX_TOKEN_CHARS = 16384
CACHE_SIZE = 10_000
NEGATIVE_TTL = 5.0
NEGATIVE_SIZE = 1_000
SERVICEACCOUNT_PREFIX = "system:serviceaccount:"

# signature only: the claims are checked below against our own clock
_JWT = PyJWT(
    options={
        "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
        "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False,
    }
)


def credentials(value: bytes | str | None) -> str | None:
    """The JWT in a Proxy-Authorization value (``Bearer JWT``, or ``Basic`` of ``user:JWT``).

    None when there is no header or it carries no token; BadIdentity when it is
    malformed (the message never quotes the value)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, rest = text.strip().partition(" ")
    rest = rest.strip()
    if not scheme:
        return None
    if scheme.lower() == "bearer":
        if len(rest.split(maxsplit=1)) > 1:  # (in C: a generator over ~1,000 characters cost 30 µs a request)
            raise BadIdentity("Proxy-Authorization Bearer holds more than one word; send Bearer <token>")
        return rest or None
    if scheme.lower() != "basic":
        raise BadIdentity("Proxy-Authorization uses an unsupported scheme; send Basic (user:token) or Bearer <token>")
    if not rest:
        return None
    try:
        pair = base64.b64decode(rest, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadIdentity("Proxy-Authorization Basic is not base64 of UTF-8 user:token") from None
    user, colon, password = pair.partition(":")
    if not colon:
        raise BadIdentity("Proxy-Authorization Basic holds no ':' (send user:token, e.g. http://egressd:TOKEN@proxy)")
    return password.strip() or None


class TokenVerifier:
    """Verifies service-account tokens against the keys of ``keys`` (a :class:`KeySource`)."""

    def __init__(
        self,
        issuer: str,
        audience: str = "egressd",
        leeway: float = 30.0,
        *,
        keys: KeySource,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if not issuer:
            raise ValueError("the token issuer is required (the API server's --service-account-issuer)")
        self.issuer, self.audience, self.leeway = issuer, audience, leeway
        self.source = keys
        if metrics is not None and keys.metrics is None:
            keys.metrics = metrics  # the source counts its refreshes there
        self._clock = clock
        self._size = cache_size
        # sha256(token) -> (identity, exp, kid, the key that verified it)
        self._good: dict[bytes, tuple[Identity, float, str, object]] = {}
        # sha256(token) -> (message, until, key set version)
        self._bad: dict[bytes, tuple[str, float, int]] = {}

    def verify(self, token: str) -> Identity:
        """Who presented ``token``; BadIdentity saying what was wrong (never quoting the token)."""
        now = self._clock()
        if len(token) > MAX_TOKEN_CHARS:
            raise BadIdentity(f"malformed token (longer than {MAX_TOKEN_CHARS} characters)")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        keyset = self.source.keys
        good = self._good.get(digest)
        if good is not None:
            identity, exp, kid, key = good
            if keyset.keys.get(kid) is key:
                if now < exp + self.leeway:
                    return identity
                del self._good[digest]
                raise BadIdentity(_expired(now - exp))
            del self._good[digest]  # its key left the set (or changed): verify again
        bad = self._bad.get(digest)
        if bad is not None:
            message, until, version = bad
            if now < until and version == keyset.version:
                raise BadIdentity(message)
            del self._bad[digest]
        kid, key = self._key(token, keyset)
        try:
            identity, exp = self._check(token, key, now)
        except BadIdentity as exc:  # it cost a signature check: remember it briefly
            _remember(self._bad, digest, (str(exc), now + NEGATIVE_TTL, keyset.version), NEGATIVE_SIZE)
            raise
        _remember(self._good, digest, (identity, exp, kid, key), self._size)
        return identity

    def _key(self, token: str, keyset: KeySet) -> tuple[str, Any]:
        """The kid and key the token's header names, checked before any signature work."""
        if token.count(".") != 2:
            raise BadIdentity("malformed token (not header.payload.signature)")
        try:
            header = json.loads(_b64(token.partition(".")[0]))
        except (ValueError, binascii.Error, RecursionError):  # (RecursionError: JSON nested thousands deep)
            raise BadIdentity("malformed token (the header is not base64url JSON)") from None
        if not isinstance(header, dict):
            raise BadIdentity("malformed token (the header is not a JSON object)")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
            shown = alg if isinstance(alg, str) and alg.isalnum() and len(alg) <= 8 else "unknown"
            raise BadIdentity(f"alg {shown} not allowed (egressd accepts RS256 and ES256)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise BadIdentity("malformed token (no kid in the header)")
        key = keyset.keys.get(kid)
        if key is None:
            self.source.request_refresh()
            raise BadIdentity(f"unknown key id {kid[:64]!r} (not in the JWKS of {self.source.where})")
        if key.algorithm_name != alg:
            raise BadIdentity(f"alg {alg} does not match key {kid[:64]!r} ({key.algorithm_name})")
        return kid, key

    def _check(self, token: str, key: Any, now: float) -> tuple[Identity, float]:
        """Signature, then claims; (identity, exp)."""
        try:
            claims = _JWT.decode(token, key.key, algorithms=[key.algorithm_name])
        except InvalidSignatureError:
            raise BadIdentity("bad signature") from None
        except InvalidAlgorithmError:
            raise BadIdentity("alg not allowed") from None
        except DecodeError:
            raise BadIdentity("malformed token (payload or signature is not base64url JSON)") from None
        except PyJWTError as exc:
            raise BadIdentity(f"malformed token ({type(exc).__name__})") from None
        except RecursionError:
            raise BadIdentity("malformed token (the payload is JSON nested too deep)") from None
        iss = claims.get("iss")
        if iss != self.issuer:
            shown = f"{iss[:100]!r}" if isinstance(iss, str) else "none"
            raise BadIdentity(f"wrong issuer {shown} (egressd accepts {self.issuer!r})")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not all(isinstance(a, str) for a in auds):
            raise BadIdentity("malformed token (aud is not a string or a list of strings)")
        if self.audience not in auds:
            shown = ", ".join(repr(a[:64]) for a in auds[:4] if isinstance(a, str)) or "none"
            raise BadIdentity(f"wrong audience {shown} (egressd accepts {self.audience!r})")
        exp, nbf, iat = (_time(claims, name) for name in ("exp", "nbf", "iat"))
        if exp is None:
            raise BadIdentity("malformed token (no exp)")
        if now >= exp + self.leeway:
            raise BadIdentity(_expired(now - exp))
        if nbf is not None and nbf > now + self.leeway:
            raise BadIdentity(f"not yet valid (nbf is {nbf - now:.0f} s ahead)")
        if iat is not None and iat > now + self.leeway:
            raise BadIdentity(f"issued in the future (iat is {iat - now:.0f} s ahead)")
        if "sub" in claims and not isinstance(claims["sub"], str):
            raise BadIdentity("malformed token (sub is not a string)")
        return _identity(claims), exp


def _identity(claims: dict[str, Any]) -> Identity:
    """Who a verified token names: its kubernetes.io claims, else its sub; the two must agree."""
    sub = claims.get("sub")
    from_sub = None
    if isinstance(sub, str) and sub.startswith(SERVICEACCOUNT_PREFIX):
        parts = sub[len(SERVICEACCOUNT_PREFIX):].split(":")
        if len(parts) == 2 and all(parts):
            from_sub = (parts[0], parts[1])
    k8s = claims.get("kubernetes.io")
    if k8s is None:
        if from_sub is None:
            raise BadIdentity("not a service-account token (no kubernetes.io claim, sub is not "
                              "system:serviceaccount:NAMESPACE:NAME)")
        return Identity("token", namespace=from_sub[0], serviceaccount=from_sub[1])
    namespace = k8s.get("namespace") if isinstance(k8s, dict) else None
    sa = k8s.get("serviceaccount") if isinstance(k8s, dict) else None
    name = sa.get("name") if isinstance(sa, dict) else None
    pod = k8s.get("pod") if isinstance(k8s, dict) else None
    if not (_word(namespace) and _word(name)) or (pod is not None and not isinstance(pod, dict)):
        raise BadIdentity("malformed token (kubernetes.io lacks namespace or serviceaccount.name)")
    if from_sub is not None and from_sub != (namespace, name):
        raise BadIdentity("malformed token (sub and kubernetes.io name different service accounts)")
    pod = pod or {}
    pod_name, pod_uid = pod.get("name"), pod.get("uid")
    return Identity(
        "token", namespace=namespace, serviceaccount=name,
        pod=pod_name if _word(pod_name) else None, pod_uid=pod_uid if _word(pod_uid) else None,
    )


def _word(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 253


def _time(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim as seconds; BadIdentity when it is not a finite number (JSON allows NaN, Infinity and
    10**400: such an exp would never pass, such an nbf never hold)."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):  # (null too: present, it must be a date)
        raise BadIdentity(f"malformed token ({name} is not a number)")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise BadIdentity(f"malformed token ({name} is not a finite number)")
    return seconds


def _expired(ago: float) -> str:
    return f"expired {ago:.0f} s ago"


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _remember(cache: dict, key: bytes, value: tuple, size: int) -> None:
    """Insert; past ``size`` entries the oldest goes (dicts keep insertion order)."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > size:
        del cache[next(iter(cache))]
