"""Where the keys that verify service-account tokens come from: a JWKS file, or the API server's JWKS URL.

A :class:`KeySet` is an immutable map kid -> public key (RSA of 2048 bits or
more for RS256, EC P-256 for ES256); a source swaps its reference in one
assignment, so a verification always sees one whole set. Keys of any other type,
curve or ``alg``, keys without a ``kid``, with private parts or with another
``use`` are skipped (logged with the reason, ``KeySet.skipped``). Two different
keys under one kid make the whole document invalid: which one verifies would be
a guess. A key whose JWK did not change keeps its object across reloads, so the
verifier's cache stays valid for tokens whose key is still there.

Sources (both keep the last good set when a reload fails and count
``egressd_jwks_refresh_total{result}``; both must have ``run()`` running as a
task to pick up changes):

:class:`JwksFile`  read at construction (failure: :class:`JwksError`, egressd
                   refuses to start); ``run()`` checks the file's inode, size and
                   mtime every second in a worker thread and reloads on a change.
:class:`JwksUrl`   ``await start()`` fetches once (failure: :class:`JwksError`);
                   ``run()`` fetches every ``refresh_interval`` and when a token
                   names an unknown kid (at most once per ``min_refresh_gap``).
                   HTTPS with h11 over asyncio streams, every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import h11
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt import PyJWK, PyJWTError

from egressd.metrics import Metrics

log = structlog.get_logger("egressd.identity")

ALGORITHMS = {"RSA": "RS256", "EC": "ES256"}  # kty -> the one alg egressd verifies with keys of that type
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1 << 20
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")
_versions = itertools.count(1)


class JwksError(ValueError):
    """A JWKS cannot be loaded; the message names the file or URL and what to do."""


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: Mapping[str, PyJWK] = field(default_factory=dict)  # kid -> key
    raw: Mapping[str, str] = field(default_factory=dict)  # kid -> canonical JSON of its JWK
    skipped: tuple[str, ...] = ()  # why each unusable key was left out
    version: int = 0


def parse_jwks(data: bytes, where: str, previous: KeySet | None = None) -> KeySet:
    """The usable keys of a JWKS document; ``previous`` when nothing changed. JwksError names ``where``."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise JwksError(f"{where}: not JSON; give the JWKS of the cluster's service-account issuer") from None
    except RecursionError:  # JSON nested deeper than the parser's stack: no key set looks like that
        raise JwksError(f"{where}: JSON nested too deeply to be a JWKS; give the cluster issuer's JWKS") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError(f"{where}: not a JWKS (expected an object with a \"keys\" list)")
    keys: dict[str, PyJWK] = {}
    raw: dict[str, str] = {}
    skipped: list[str] = []
    for n, jwk in enumerate(doc["keys"]):
        why = _unusable(jwk)
        if why is None:
            kid, canon = jwk["kid"], json.dumps(jwk, sort_keys=True)
            if raw.get(kid, canon) != canon:
                raise JwksError(f"{where}: two different keys have kid {kid[:64]!r}; give each key its own kid")
            try:
                keys[kid] = _key(jwk, canon, previous)
                raw[kid] = canon
                continue
            except (PyJWTError, TypeError) as exc:
                why = f"not a valid {jwk['kty']} key ({type(exc).__name__})"
            except ValueError as exc:
                why = str(exc)
        skipped.append(f"key {n}: {why}")
    if not keys:
        found = "; ".join(skipped) or "the keys list is empty"
        raise JwksError(f"{where}: no usable key (RSA RS256 or EC P-256 ES256 with a kid): {found}")
    if previous is not None and raw == previous.raw:
        return previous
    return KeySet(keys, raw, tuple(skipped), next(_versions))


def _unusable(jwk: object) -> str | None:
    if not isinstance(jwk, dict):
        return "not a JSON object"
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in ALGORITHMS:  # a list or object is unhashable: no lookup
        return f"kty {str(kty)[:16]!r} is not RSA or EC"
    if not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
        return "no kid"
    if jwk.get("alg", ALGORITHMS[kty]) != ALGORITHMS[kty]:
        return f"alg {str(jwk.get('alg'))[:16]!r} is not {ALGORITHMS[kty]}"
    if kty == "EC" and jwk.get("crv") != "P-256":
        return f"crv {str(jwk.get('crv'))[:16]!r} is not P-256"
    if jwk.get("use", "sig") != "sig":
        return "use is not sig"
    if any(name in jwk for name in _PRIVATE_MEMBERS):
        return "holds private key material (publish public keys only)"
    return None


def _key(jwk: dict, canon: str, previous: KeySet | None) -> PyJWK:
    kid = jwk["kid"]
    if previous is not None and previous.raw.get(kid) == canon:
        return previous.keys[kid]
    key = PyJWK(jwk, algorithm=ALGORITHMS[jwk["kty"]])
    if isinstance(key.key, RSAPublicKey):
        if key.key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key.key_size} bits (egressd needs {MIN_RSA_BITS} or more)")
    elif not isinstance(key.key, EllipticCurvePublicKey):
        raise ValueError("not a public key")
    return key


class KeySource:
    """What the verifier needs of a source: the set in force, and a way to say a kid was missing."""

    def __init__(self, where: str, metrics: Metrics | None) -> None:
        self.where = where
        self.metrics = metrics
        self.keys = KeySet()

    def request_refresh(self) -> None:
        """A token named a kid the set does not have (a source that can look sooner does so)."""

    def _loaded(self, keys: KeySet) -> None:
        if keys is not self.keys:
            log.info("jwks.loaded", source=self.where, kids=sorted(keys.keys), skipped=list(keys.skipped))
        self.keys = keys
        self._count("success")

    def _failed(self, exc: Exception) -> None:
        self._count("error")
        log.error("jwks.refresh_failed", source=self.where, error=str(exc), kept_kids=sorted(self.keys.keys))

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.jwks_refresh[result] += 1


class JwksFile(KeySource):
    """A JWKS in a file (e.g. a ConfigMap with ``kubectl get --raw /openid/v1/jwks``); reloaded when it changes."""

    def __init__(self, path: str | os.PathLike[str], metrics: Metrics | None = None) -> None:
        super().__init__(str(path), metrics)
        self.path = Path(path)
        found = self._read(None)
        assert found is not None  # a stamp never equals None
        self._stamp, data = found
        self._loaded(parse_jwks(data, self.where))

    def _read(self, seen: tuple | None) -> tuple[tuple, bytes] | None:
        """(stamp, bytes) when the file's stamp differs from ``seen``; None when it does not. Blocking."""
        fix = "mount the cluster's JWKS there (kubectl get --raw /openid/v1/jwks)"
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == seen:
                return None
            if st.st_size > MAX_JWKS_BYTES:
                raise JwksError(f"{self.where}: larger than {MAX_JWKS_BYTES} bytes; {fix}")
            return stamp, self.path.read_bytes()
        except OSError as exc:
            raise JwksError(f"{self.where}: cannot read the JWKS ({exc.strerror or exc}); {fix}") from None

    async def refresh(self) -> bool:
        """Reload if the file changed (read in a worker thread); True when a new set is in force."""
        try:
            found = await asyncio.to_thread(self._read, self._stamp)
            if found is None:
                return False
            stamp, data = found
            keys = parse_jwks(data, self.where, self.keys)
        except JwksError as exc:
            self._failed(exc)
            return False
        self._stamp = stamp
        changed = keys is not self.keys
        self._loaded(keys)
        return changed

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.refresh()


class JwksUrl(KeySource):
    """The API server's ``/openid/v1/jwks`` over HTTPS.

    In a pod: ``https://kubernetes.default.svc/openid/v1/jwks`` with the pod's
    ``ca.crt`` and ``token`` under /var/run/secrets/kubernetes.io/serviceaccount;
    the service account needs the ClusterRole ``system:service-account-issuer-discovery``.
    The CA and the token file are read again for every fetch (both rotate)."""

    def __init__(
        self,
        url: str,
        ca_file: str | None = None,
        token_file: str | None = None,
        refresh_interval: float = 300.0,
        *,
        timeout: float = 10.0,
        min_refresh_gap: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(url, metrics)
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise JwksError(f"{url}: give an https:// URL (e.g. https://kubernetes.default.svc/openid/v1/jwks)")
        self._host, self._port = parts.hostname, parts.port or 443
        self._authority = parts.netloc.rpartition("@")[2]
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.ca_file, self.token_file = ca_file, token_file
        self.refresh_interval, self.timeout, self.min_refresh_gap = refresh_interval, timeout, min_refresh_gap
        self._clock = clock
        self._last_asked = -float("inf")
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._prepare()  # a missing CA or token file fails here, at start-up

    async def start(self) -> None:
        """Fetch the set once; JwksError when that fails (egressd does not start without keys)."""
        try:
            self._loaded(parse_jwks(await self._fetch(), self.where, self.keys))
        except JwksError as exc:
            self._count("error")
            raise JwksError(f"{exc}; egressd needs the JWKS to verify tokens") from None

    async def refresh(self) -> bool:
        """Fetch again; True when a new set is in force. A failure keeps the last good set."""
        async with self._lock:
            try:
                keys = parse_jwks(await self._fetch(), self.where, self.keys)
            except JwksError as exc:
                self._failed(exc)
                return False
            changed = keys is not self.keys
            self._loaded(keys)
            return changed

    def request_refresh(self) -> None:
        """Wake ``run()`` for an early fetch, unless one was asked for less than ``min_refresh_gap`` ago."""
        now = self._clock()
        if now - self._last_asked >= self.min_refresh_gap:
            self._last_asked = now
            self._wake.set()

    @property
    def pending(self) -> bool:
        """An early fetch was asked for and ``run()`` has not started it yet."""
        return self._wake.is_set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.refresh_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.refresh()

    def _prepare(self) -> tuple[ssl.SSLContext, bytes | None]:
        """A TLS context with the CA, and the bearer token. Blocking (reads files)."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise JwksError(f"{self.where}: cannot load the CA file {self.ca_file}: {exc}") from None
        if self.token_file is None:
            return context, None
        try:
            token = Path(self.token_file).read_bytes().strip()
        except OSError as exc:
            raise JwksError(f"{self.where}: cannot read the token file {self.token_file}: {exc.strerror}") from None
        return context, token

    async def _fetch(self) -> bytes:
        context, token = await asyncio.to_thread(self._prepare)
        headers = [("Host", self._authority), ("Accept", "application/json"), ("Connection", "close")]
        if token:
            headers.append(("Authorization", b"Bearer " + token))
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await self._get(context, headers)
        except TimeoutError:
            raise JwksError(f"{self.where}: no answer within {self.timeout:g} s") from None
        except (OSError, ssl.SSLError, h11.ProtocolError) as exc:
            raise JwksError(f"{self.where}: {type(exc).__name__}: {exc}") from None
        if status in (401, 403):
            raise JwksError(
                f"{self.where}: HTTP {status}; bind the service account to the ClusterRole "
                "system:service-account-issuer-discovery and check --jwks-token-file"
            )
        if status != 200:
            raise JwksError(f"{self.where}: HTTP {status}")
        return body

    async def _get(self, context: ssl.SSLContext, headers: list) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(
            self._host, self._port, ssl=context, server_hostname=self._host, limit=65536
        )
        try:
            conn = h11.Connection(h11.CLIENT)
            writer.write(conn.send(h11.Request(method="GET", target=self._target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            status, body = 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"{self.where}: answer larger than {MAX_JWKS_BYTES} bytes")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, bytes(body)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
