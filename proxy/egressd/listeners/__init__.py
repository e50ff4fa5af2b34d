"""The listeners: each turns accepted bytes into a destination (and a client) and hands them to the Engine.

:mod:`~egressd.listeners.explicit` (CONNECT and absolute-form HTTP, with
:mod:`~egressd.listeners.forward`), :mod:`~egressd.listeners.transparent`
(connections redirected by iptables, named by their ClientHello or HTTP head)
and :mod:`~egressd.listeners.dns` (the sidecar's DNS filter). Each has an
``async start(engine, host, port)`` that binds and returns a :data:`Listening`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class BoundAddress(Protocol):
    """A listener that is not an asyncio.Server (the DNS filter's UDP and TCP pair)."""

    address: tuple[str, int]

    def close(self) -> None: ...


Listening = asyncio.Server | BoundAddress
