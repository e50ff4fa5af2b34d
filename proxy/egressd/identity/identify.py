"""One function the Engine calls: (client address, Proxy-Authorization) -> (identity, service), or a refusal.

The order is ``--identity``'s (first source that identifies the client wins):

1. ``--service`` (the sidecar): a fixed identity; nothing else is looked at.
2. ``token``: credentials present and valid -> that service account; present
   and not valid -> ``bad_identity`` (never a fall-through to the next source);
   absent -> the next source.
3. ``pod-ip``: the pod index knows the address (synced, fresh, one live pod).
4. ``cidr``: an ``identities:`` range of a service holds the address.

An identified client whose identity no service lists gets ``no_identity``;
so does a client no source identified, with ``407`` and ``Proxy-Authenticate``
(Basic and Bearer) when ``token`` is configured and it sent no credentials, so
clients retry with them. Every call counts ``egressd_identity_total{source,
result}``. The token never leaves :mod:`egressd.identity.token`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from egressd.errors import ProxyError
from egressd.identity import BadIdentity, Identity
from egressd.metrics import Metrics
from egressd.policy.model import Policy, Reason

ASK_FOR_CREDENTIALS = (
    (b"Proxy-Authenticate", b'Basic realm="egressd"'),
    (b"Proxy-Authenticate", b'Bearer realm="egressd"'),
)


class TokenSource(Protocol):
    def verify(self, token: str) -> Identity: ...


class PodSource(Protocol):
    def lookup(self, ip: str) -> Identity | None: ...


Credentials = Callable[[bytes | None], "str | None"]


class Identifier:
    """The configured identity sources, in order, over the policy in force."""

    def __init__(
        self,
        policy: Callable[[], Policy | None],
        *,
        fixed: str | None = None,
        sources: tuple[str, ...] = (),
        token: TokenSource | None = None,
        credentials: Credentials | None = None,
        pods: PodSource | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._policy = policy
        self.fixed = None if fixed is None else Identity("fixed", service=fixed)
        self.sources = sources
        self._token = token
        self._credentials = credentials
        self._pods = pods
        self._metrics = metrics or Metrics()

    @property
    def per_request(self) -> bool:
        """Whether each request must be identified from its own headers (a token source is configured)."""
        return self.fixed is None and "token" in self.sources

    def identify(self, ip: str, authorization: bytes | None = None) -> tuple[Identity, str]:
        """(identity, service) for a client at ``ip`` that sent ``authorization``; ProxyError when refused."""
        counts = self._metrics.identity
        if self.fixed is not None:
            return self.fixed, self.fixed.service  # type: ignore[return-value]
        policy = self._policy()
        if policy is None:
            raise ProxyError(Reason.NO_IDENTITY, "no policy is loaded; egressd denies everything until one loads")
        asked = False
        for source in self.sources:
            found = self._by(source, policy, ip, authorization)
            if found is None:
                asked = asked or source == "token"
                continue
            identity, service = found
            if service is None:
                counts[(source, "unmapped")] += 1
                raise ProxyError(
                    Reason.NO_IDENTITY, f"no service lists the identity {describe(identity)} in its identities:"
                )
            counts[(source, "ok")] += 1
            return identity, service
        counts[("none", "missing")] += 1
        tried = ", ".join(self.sources) or "none"
        if asked and authorization is None:
            raise ProxyError(
                Reason.NO_IDENTITY,
                f"no identity (tried {tried}): send a service-account token in Proxy-Authorization "
                "(http://egressd:TOKEN@proxy:port)",
                407,
                headers=ASK_FOR_CREDENTIALS,
            )
        raise ProxyError(Reason.NO_IDENTITY, f"no identity for client {ip} (tried {tried})")

    def _by(
        self, source: str, policy: Policy, ip: str, authorization: bytes | None
    ) -> tuple[Identity, str | None] | None:
        if source == "token":
            if self._token is None or self._credentials is None:
                return None
            try:
                token = self._credentials(authorization)
                if token is None:
                    return None
                identity = self._token.verify(token)
            except BadIdentity as exc:
                self._metrics.identity[("token", "bad")] += 1
                raise ProxyError(Reason.BAD_IDENTITY, f"the Proxy-Authorization token is not valid: {exc}") from None
            return identity, policy.service_for(identity)
        if source == "pod-ip":
            identity = self._pods.lookup(ip) if self._pods is not None else None
            return None if identity is None else (identity, policy.service_for(identity))
        if source == "cidr":
            found = policy.cidr_identity(ip)
            return None if found is None else (found[1], found[0])
        raise ValueError(f"unknown identity source {source!r}")

    def service_of(self, ip: str) -> str | None:
        """The service of a client known by its address alone (the DNS filter's, the transparent listener's)."""
        if self.fixed is not None:
            return self.fixed.service
        try:
            return self.identify(ip)[1]
        except ProxyError:
            return None


def describe(identity: Identity) -> str:
    """An identity in words, for messages (never a token)."""
    if identity.cidr is not None:
        return f"cidr {identity.cidr}"
    who = f"namespace {identity.namespace} service account {identity.serviceaccount}"
    return f"{who} (pod {identity.pod})" if identity.pod else who
