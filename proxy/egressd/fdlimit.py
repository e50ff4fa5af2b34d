"""How many client connections the file-descriptor limit leaves room for.

At the limit ``accept()`` fails with EMFILE and the event loop drops the client
unanswered and unrecorded. So a proxy must refuse *before* it runs out: at
start-up egressd raises its soft ``RLIMIT_NOFILE`` to the hard limit (as Go's
runtime and nginx do), counts :data:`PER_CONNECTION` descriptors per client
connection (its own and its upstream's), keeps :data:`RESERVE` back (DNS
sockets, admin scrapes, the refusals themselves) besides those already open,
and caps open client connections at what is left. A client past that cap is
accepted, answered ``503 overloaded`` and recorded like any other refusal.
"""

from __future__ import annotations

import os
import resource

PER_CONNECTION = 2
RESERVE = 64


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def open_descriptors() -> int:
    """Descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def connection_capacity(limit: int, already_open: int) -> int:
    """Client connections that fit under ``limit`` descriptors, with ``already_open`` in use and RESERVE kept."""
    return max(1, (limit - already_open - RESERVE) // PER_CONNECTION)


def plan(max_connections: int) -> tuple[int, int]:
    """(the connection cap to enforce, the nofile limit in force): --max-connections, or less when the
    file limit does not leave room for it."""
    limit = raise_soft_limit()
    return min(max_connections, connection_capacity(limit, open_descriptors())), limit


def advice(max_connections: int, serving: int, limit: int) -> str:
    return (
        f"--max-connections {max_connections} does not fit the file-descriptor limit of {limit} "
        f"({PER_CONNECTION} per connection, {RESERVE} kept back): at most {serving} connections are served, "
        "more get 503 overloaded; raise the limit (ulimit -n, the container runtime's nofile) "
        "or lower --max-connections"
    )
