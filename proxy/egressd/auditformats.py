"""How an audit line is written: canonical JSON, and ``--audit-format native|ecs|ocsf``.

``ecs`` maps a record to the Elastic Common Schema (:mod:`egressd.auditformats_ecs`, ECS_VERSION), ``ocsf``
to OCSF (:mod:`egressd.auditformats_ocsf`, OCSF_VERSION: Network Activity 4001, HTTP Activity 4002, DNS
Activity 4003, Base Event 0 for checkpoints). A mapping is a table of places (native field, path, the
conversion both ways) and the fields derived from the record (:mod:`egressd.auditformats_map`); a native
field no table names goes under the format's own namespace (``egressd.*``, ``unmapped.*``): nothing is
dropped. ``to_native`` reads a mapped record back (for ``egressd audit verify``). The chain covers the line
as written (:meth:`Layout.render`); docs/forensics.md has the tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from egressd import records as audit
from egressd.auditformats_ecs import ECS, ECS_VERSION
from egressd.auditformats_map import PRODUCT, Fields, epoch_ms, is_ip, same
from egressd.auditformats_ocsf import OCSF, OCSF_VERSION

__all__ = [
    "ECS", "ECS_VERSION", "FORMATS", "NATIVE", "OCSF", "OCSF_VERSION", "PRODUCT", "Fields", "Layout", "canonical",
    "detect", "epoch_ms", "is_ip",
]


def canonical(record: Fields) -> bytes:
    """The bytes the chain covers: sorted keys, no spaces, UTF-8 (orjson)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class Layout:
    """One --audit-format: native fields to the written record and back, and where the chain value goes."""

    name: str
    chain_path: tuple[str, ...]
    to_format: Callable[[Fields], Fields] = same
    to_native: Callable[[Fields], Fields] = same

    def render(self, mapped: Fields, canon: bytes, chain: str) -> bytes:
        """The line: canonical JSON with the chain value added (native: appended, saving a second rendering)."""
        if self.chain_path == (audit.CHAIN,):
            return b"%s,\"chain\":\"%s\"}" % (canon[:-1], chain.encode())
        node = mapped
        for key in self.chain_path[:-1]:
            node = node.setdefault(key, {})
        node[self.chain_path[-1]] = chain
        return canonical(mapped)

    def unchain(self, record: Fields) -> Fields:
        """A copy of a written record without its chain value (the record itself is left alone)."""
        top = node = dict(record)
        for key in self.chain_path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                return top
            node[key] = node = dict(child)
        node.pop(self.chain_path[-1], None)
        return top


NATIVE = Layout("native", (audit.CHAIN,))

FORMATS: dict[str, Layout] = {
    "native": NATIVE,
    "ecs": Layout("ecs", ("event", "hash"), ECS.to_format, ECS.to_native),
    "ocsf": Layout("ocsf", ("unmapped", "chain"), OCSF.to_format, OCSF.to_native),
}


def detect(record: Fields) -> Layout:
    """The format a written line is in: ECS has ``ecs``, OCSF ``class_uid``; anything else is native."""
    if "ecs" in record:
        return FORMATS["ecs"]
    return FORMATS["ocsf"] if "class_uid" in record else NATIVE
