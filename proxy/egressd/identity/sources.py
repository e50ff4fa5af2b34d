"""The identity sources a running proxy was configured with: built once at start, kept fresh in the background.

``--service`` needs nothing. A gateway's ``token`` source gets its keys from
``--jwks-file`` (read now; a file that is missing or holds no usable key stops
the start) or ``--jwks-url`` (fetched in :meth:`Sources.start`, likewise), then
keeps them fresh; ``pod-ip`` gets a pod index that lists and watches Pods. Both
run as background tasks of the proxy (:meth:`Sources.background`), and
:meth:`Sources.not_ready` tells ``/readyz`` while the pod index cannot
identify anyone.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from egressd.config import Config
from egressd.identity.identify import Identifier
from egressd.metrics import Metrics
from egressd.policy.model import Policy


class SourceError(Exception):
    """A configured source cannot work (keys, API server configuration): the proxy does not start."""


class Sources:
    def __init__(self, config: Config, policy: Callable[[], Policy | None], metrics: Metrics) -> None:
        self.keys: Any = None
        self.pods: Any = None
        token = credentials = None
        sources = config.identity if config.service is None else ()
        if "token" in sources:
            from egressd.identity.jwks import JwksError, JwksFile, JwksUrl
            from egressd.identity.token import TokenVerifier, credentials

            try:
                if config.jwks_file:
                    self.keys = JwksFile(config.jwks_file, metrics=metrics)
                else:
                    self.keys = JwksUrl(config.jwks_url, config.jwks_ca, config.jwks_token_file, metrics=metrics)
            except (JwksError, OSError) as exc:
                raise SourceError(f"the token identity has no keys: {exc}") from None
            token = TokenVerifier(
                config.token_issuer or "", config.token_audience, config.token_leeway, keys=self.keys, metrics=metrics
            )
        if "pod-ip" in sources:
            from egressd.identity.podindex import ClientConfigError, PodIndex

            try:
                self.pods = PodIndex(config.kubeconfig, max_stale=config.pod_index_max_stale)
            except (ClientConfigError, ValueError, OSError) as exc:
                raise SourceError(f"the pod-ip identity cannot reach the API server: {exc}") from None
        self.identifier = Identifier(
            policy, fixed=config.service, sources=sources, token=token, credentials=credentials, pods=self.pods,
            metrics=metrics,
        )

    async def start(self) -> None:
        """What must work before the proxy serves: keys fetched from --jwks-url."""
        start = getattr(self.keys, "start", None)
        if start is not None:
            from egressd.identity.jwks import JwksError

            try:
                await start()
            except (JwksError, OSError) as exc:
                raise SourceError(f"the token identity has no keys: {exc}") from None

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """The loops that keep the sources fresh (key refresh, pod list+watch), for the proxy to run and cancel."""
        return [source.run() for source in (self.keys, self.pods) if source is not None]

    def not_ready(self) -> str | None:
        """Why clients cannot be identified now, for /readyz (the pod index before its first list, or stale)."""
        return self.pods.not_ready() if self.pods is not None else None
