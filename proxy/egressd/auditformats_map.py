"""The machinery of a mapped ``--audit-format``: tables of places, and the walk from a native record and back.

A mapping (:class:`Mapped`) is a table of :class:`Place` per record type (:class:`Event`: native field, dotted
path, the conversion both ways) plus the fields derived from the record; a native field no table names goes
under the format's own namespace (``egressd.*``, ``unmapped.*``), so nothing is dropped. The tables themselves
are :mod:`egressd.auditformats_ecs` and :mod:`egressd.auditformats_ocsf`; :mod:`egressd.auditformats` puts
them behind ``--audit-format``. Derived fields are never read back: every native value has exactly one place.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from egressd import records as audit
from egressd.hostport import join_host_port

PRODUCT = "egressd"

Fields = dict[str, Any]


def same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Place:
    """Where one native field is written, and how its value is converted there and back."""

    native: str
    path: tuple[str, ...]
    out: Callable[[Any], Any] = same
    back: Callable[[Any], Any] = same


def at(native: str, path: str, out: Callable[[Any], Any] = same, back: Callable[[Any], Any] = same) -> Place:
    return Place(native, tuple(path.split(".")), out, back)


@dataclass(frozen=True, slots=True)
class Event:
    """One record type's mapping: its places, and the fields derived from the native record (dotted path -> value)."""

    places: tuple[Place, ...]
    derive: Callable[[Fields], Fields]


# -- conversions both formats use -----------------------------------------------------------------------------------


def host_ip(text: str | None) -> tuple[str | None, int | None]:
    """(ip, port) of an ``ip:port`` or ``[v6]:port`` text."""
    if not text or ":" not in text:
        return None, None
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


def endpoint(text: str) -> Fields:
    ip, port = host_ip(text)
    return {"ip": ip, "port": port} if ip else {}


def joined(endpoint: Fields) -> str | None:
    return join_host_port(endpoint["ip"], endpoint["port"]) if endpoint.get("ip") else None


def is_ip(host: str | None) -> bool:
    """True for an IP literal (egressd writes them canonical: dotted IPv4, or IPv6 with a colon)."""
    return bool(host) and (":" in host or host.replace(".", "").isdigit())  # type: ignore[union-attr]


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_MS = _dt.timedelta(milliseconds=1)


def epoch_ms(ts: str) -> int:
    """Milliseconds since the epoch of an RFC 3339 UTC time as egressd writes it."""
    return (_dt.datetime.fromisoformat(ts) - _EPOCH) // _MS


def url_place(native: str, path: str, query: str) -> Place:
    """A request target (``/a/b?q=1``) written as a URL object, ``{"path": "/a/b", query: "q=1"}``, and back.

    The query key is there only when the target has a ``?`` (so ``/a?`` and ``/a`` both come back as written).
    """

    def out(target: str) -> Fields:
        before, mark, after = target.partition("?")
        return {"path": before, query: after} if mark else {"path": before}

    def back(url: Fields) -> str | None:
        if "path" not in url and query not in url:
            return None
        return url.get("path", "") + (f"?{url[query]}" if query in url else "")

    return at(native, path, out, back)


def http_version_number(fields: Fields) -> str | None:
    """``HTTP/1.1`` -> ``1.1`` (the schemas' form); a version not of that form is given as it is."""
    text = fields.get(audit.HTTP_VERSION)
    return text.removeprefix("HTTP/") if isinstance(text, str) else None


# -- the walk ---------------------------------------------------------------------------------------------------


def _build(derived: Fields, places: tuple[Place, ...], placed: frozenset[str], fields: Fields,
           spill: tuple[str, ...]) -> Fields:
    out: Fields = {}
    for path, value in derived.items():
        if value is not None:
            _put(out, _split(path), value)
    for place in places:
        value = fields.get(place.native)
        if value is not None:
            _put(out, place.path, place.out(value))
    for name, value in fields.items():
        if value is not None and name not in placed:
            _put(out, (*spill, name), value)
    return out


def _put(out: Fields, path: tuple[str, ...], value: Any) -> None:
    node = out
    for key in path[:-1]:
        child = node.get(key)
        node = node.setdefault(key, {}) if child is None else child
    key = path[-1]
    old = node.get(key)
    node[key] = {**old, **value} if type(old) is dict and type(value) is dict else value


@functools.lru_cache(maxsize=512)
def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _get(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = record
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


@dataclass(frozen=True, slots=True)
class Mapped:
    """A format that maps native records: its common places, its per-event tables, its own namespace."""

    name: str
    spill: tuple[str, ...]  # where native fields without a place go
    common: tuple[Place, ...]
    derive: Callable[[Fields], Fields]  # what every line carries (an event's own derived fields win)
    events: dict[str, Event]
    other: Event  # a record type without a table of its own

    def to_format(self, fields: Fields) -> Fields:
        event = self.events.get(fields.get(audit.EVENT), self.other)
        places, placed = _plan(self, event)
        return _build({**self.derive(fields), **event.derive(fields)}, places, placed, fields, self.spill)

    def to_native(self, record: Fields) -> Fields:
        name = next(_get(record, p.path) for p in self.common if p.native == audit.EVENT)
        places = self.common + self.events.get(name, self.other).places if isinstance(name, str) else self.common
        native: Fields = {}
        for place in places:
            value = _get(record, place.path)
            native[place.native] = None if value is None else place.back(value)
        depth = len(self.spill)
        claimed = {p.path[depth] for p in places if p.path[:depth] == self.spill and len(p.path) > depth}
        spilled = _get(record, self.spill)
        for key, value in (spilled.items() if isinstance(spilled, dict) else ()):
            if key not in claimed:
                native[key] = value
        return native


_PLANS: dict[tuple[int, int], tuple[tuple[Place, ...], frozenset[str]]] = {}


def _plan(mapped: Mapped, event: Event) -> tuple[tuple[Place, ...], frozenset[str]]:
    """An event's places after the common ones, and the native fields they name (worked out once)."""
    plan = _PLANS.get((id(mapped), id(event)))
    if plan is None:
        places = mapped.common + event.places
        plan = _PLANS[(id(mapped), id(event))] = (places, frozenset(p.native for p in places))
    return plan
