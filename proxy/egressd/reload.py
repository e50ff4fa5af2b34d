"""Load the allowlists, and load them again on SIGHUP or when the files change.

A load reads and compiles the whole directory off the event loop (in a worker
thread) and then swaps the PolicyHolder's reference in one assignment: a
connection that already made its decision keeps going, new ones see the new
policy. A load that fails keeps the last good policy, logs every error with
file:line, counts ``egressd_policy_reloads_total{result="error"}`` and sets
``egressd_policy_last_reload_success`` to 0 (``egressd_policy_info`` keeps the
version in force) until a load succeeds.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
from pathlib import Path

import structlog

from egressd.connection import PolicyHolder
from egressd.metrics import Metrics
from egressd.policy.loader import LoadError, PolicyError, load_policy
from egressd.policy.model import Policy
from egressd.policy.suffixes import forget_public_suffixes

log = structlog.get_logger("egressd.reload")


def load_for(directory: Path, service: str | None) -> Policy:
    """Load the directory; when this process serves one fixed service, it must have an allowlist there.

    What only loading needs (the Public Suffix List, the YAML parser's garbage)
    is given back afterwards: a proxy in every pod should not carry it.
    """
    try:
        policy = load_policy(directory)
    finally:
        forget_public_suffixes()
        _trim_heap()
    if service is not None and service not in policy.services:
        known = ", ".join(sorted(policy.services)) or "none"
        message = f"no allowlist for service {service!r} (services found: {known}); add {directory}/{service}.yaml"
        raise PolicyError([LoadError(str(directory), None, message)])
    return policy


def _trim_heap() -> None:
    """Return free heap pages to the OS (glibc's malloc_trim; elsewhere nothing happens)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fingerprint(directory: Path) -> tuple:
    """Names, sizes and mtimes of the directory's entries: cheap to compare, changes when a file does."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
        return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)
    except OSError as exc:
        return (("error", str(exc)),)


class Reloader:
    def __init__(self, directory: Path, service: str | None, holder: PolicyHolder, metrics: Metrics) -> None:
        self.directory = directory
        self.service = service
        self.holder = holder
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._seen = fingerprint(directory)

    async def reload(self, why: str) -> bool:
        """Load the directory again; swap on success, keep the last good policy on failure."""
        async with self._lock:
            self._seen = fingerprint(self.directory)
            try:
                policy = await asyncio.to_thread(load_for, self.directory, self.service)
            except PolicyError as exc:
                self.metrics.policy_loaded(ok=False)
                kept = self.holder.current.version if self.holder.current else None
                log.error("policy.reload_failed", trigger=why, errors=[str(e) for e in exc.errors], kept_version=kept)
                return False
            self.holder.current = policy
            self.metrics.policy_loaded(ok=True, version=policy.version)
            log.info("policy.loaded", trigger=why, version=policy.version, files=len(policy.files))
            return True

    async def watch(self, interval: float) -> None:
        """Poll the directory's fingerprint every interval seconds; reload when it changes."""
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if fingerprint(self.directory) != self._seen:
                await self.reload("file change")
