"""The identify step: which service is this client? Asked before any policy is read.

Sources, tried in the order of ``--identity`` (first match wins):

``token``   a Kubernetes service-account token in ``Proxy-Authorization``
            (:mod:`egressd.identity.token`: JWT verified locally against a JWKS);
``pod-ip``  the client's source address in a pod index kept by list+watch
            (:mod:`egressd.identity.podindex`);
``cidr``    static client ranges of the allowlists' ``identities:``;
``fixed``   ``--service`` (the sidecar): every client is that service.

An :class:`Identity` says who the client is (never the token); the policy maps
it to a service (:meth:`egressd.policy.model.Policy.service_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SOURCES = ("token", "pod-ip", "cidr")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a client is, as a source established it; ``fields()`` is what the record says."""

    source: str  # "token", "pod-ip", "cidr" or "fixed"
    namespace: str | None = None
    serviceaccount: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    cidr: str | None = None  # the identities: range that matched (source cidr)
    service: str | None = None  # source fixed: the --service name

    def fields(self) -> dict[str, Any]:
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None}  # type: ignore[attr-defined]


class BadIdentity(Exception):
    """Credentials were presented and are not valid (deny ``bad_identity``, never a fall-through).

    The message says what was wrong (expired, wrong audience, unknown key...) and
    never contains the token or any part of it."""
