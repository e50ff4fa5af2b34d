"""The listeners: each turns accepted bytes into a destination (and a client) and hands them to the Engine.

:mod:`~egressd.listeners.explicit` (CONNECT and absolute-form HTTP, with
:mod:`~egressd.listeners.forward`), :mod:`~egressd.listeners.transparent`
(connections redirected by iptables, named by their ClientHello or HTTP head)
and :mod:`~egressd.listeners.dns` (the sidecar's DNS filter). Each has an
``async start(engine, host, port)`` that binds and returns a :data:`Listening`;
the TCP ones accept clients through :class:`Accepted`. :func:`recorded_sni`
bounds what a record keeps of a client's server name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from egressd.relay import Side

if TYPE_CHECKING:
    from egressd.connection import Client, Engine
    from egressd.errors import ProxyError
    from egressd.records import Record

log = structlog.get_logger("egressd.listeners")


class BoundAddress(Protocol):
    """A listener that is not an asyncio.Server (the DNS filter's UDP and TCP pair)."""

    address: tuple[str, int]

    def close(self) -> None: ...


Listening = asyncio.Server | BoundAddress


class Accepted(Side):
    """A client connection as every TCP listener takes it: who it is (its address, read once at accept), then
    admission (a refusal is recorded and answered by :meth:`refuse`), then the listener's handler on a task.

    Subclasses set ``listener`` and ``handler`` and may read more of the socket in :meth:`accepted`."""

    __slots__ = ("engine", "who")
    listener = ""
    handler: Callable[[Engine, Side, Client], Awaitable[None]]

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.engine = engine
        self.who: Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        engine = self.engine
        who = self.who = engine.who(self)
        if who is None or not self.accepted(transport):  # reset before anyone could see who it was
            log.warning("connection.no_peer_address", listener=self.listener)
            self.who = None
            self.abort()
            return
        refused = engine.admit(who)
        if refused is not None:
            rec = engine.open(who, self.listener)
            engine.fail(rec, refused)
            self.refuse(rec, refused)
            engine.close(rec)
            self.who = None  # not counted as active: nothing to release
            return
        engine.serve(self, who, type(self).handler)

    def accepted(self, transport: asyncio.BaseTransport) -> bool:
        """Read what else the listener needs of the new socket; False when it is gone already."""
        return True

    def refuse(self, rec: Record, refused: ProxyError) -> None:
        """Answer a client that admission refused (its record is written after this)."""
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.who is not None:
            self.engine.release(self, self.who)


def client_ip(side: Side) -> str:
    """The IP of the client on ``side`` (an :class:`Accepted`), as the limits count it."""
    who = getattr(side, "who", None)
    return who.ip if who is not None else "-"


SNI_KEPT = 255  # characters of a server name a record keeps: any DNS name fits (255 octets on the wire)


def recorded_sni(sni: str | None) -> str | None:
    """A ClientHello's server name as the record keeps it: whole when a DNS name could be that long, else its
    start and ``...`` (a server name may be 64 KiB; a record must not)."""
    if sni is None or len(sni) <= SNI_KEPT:
        return sni
    return sni[:SNI_KEPT] + "..."


def internal_error(rec: Record, client: Side, exc: Exception) -> None:
    """A bug costs one connection, never the process: log it, put it in the record (still written), abort."""
    log.exception("connection.internal_error", conn_id=rec.conn_id)
    rec.decision = "deny"
    rec.note(f"internal error: {type(exc).__name__}: {exc}")
    client.abort()
