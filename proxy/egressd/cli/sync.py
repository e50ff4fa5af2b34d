"""``egressd allowlist-sync``: mirror the allowlist ConfigMap into every namespace labelled for injection.

The loop is :mod:`egressd.allowlistsync`, its decisions :mod:`egressd.allowlistplan`.

Every flag also reads ``EGRESSD_<FLAG>`` (``EGRESSD_NAMESPACE``, ``EGRESSD_CONFIGMAP``, ...). The admin
listener answers ``/healthz``, ``/readyz`` (200 once a reconcile has completed and while the source exists)
and ``/metrics``. SIGTERM or SIGINT stops it (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from typing import TYPE_CHECKING

from egressd import kube
from egressd.config import ConfigError, HostPort, env_default, parse_hostport

if TYPE_CHECKING:  # imported when the command runs: the other commands start without them
    from egressd.admin import Admin
    from egressd.allowlistsync import AllowlistSync

ADMIN_LISTEN = "0.0.0.0:15021"
STOP_TIMEOUT = 10.0  # seconds the sync gets to stop (close its connections) after SIGTERM
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # RFC 1123 label: a namespace's name
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # a ConfigMap's name


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "allowlist-sync", help="mirror the allowlist ConfigMap into every namespace labelled for injection")
    parser.add_argument("--namespace", default=env_default("namespace", kube.NAMESPACE),
                        help=f"the source ConfigMap's namespace ({kube.NAMESPACE})")
    parser.add_argument("--configmap", default=env_default("configmap", kube.ALLOWLISTS_CONFIGMAP),
                        help=f"the source ConfigMap, and the name of every copy ({kube.ALLOWLISTS_CONFIGMAP})")
    parser.add_argument("--kubeconfig", default=env_default("kubeconfig"),
                        help="the API server (default: the in-cluster configuration)")
    parser.add_argument("--resync-interval", type=float, default=env_default("resync-interval", "300"),
                        help="seconds between full reconciles when no watch event comes (300)")
    parser.add_argument("--admin-listen", default=env_default("admin-listen", ADMIN_LISTEN),
                        help=f"IP:PORT for /metrics /healthz /readyz, 'off' for none ({ADMIN_LISTEN})")


def check(args: argparse.Namespace) -> HostPort | None:
    """The flags checked (ConfigError naming the flag and the fix); returns the admin address (None: off)."""
    if not (len(args.namespace) <= 63 and _LABEL.fullmatch(args.namespace)):
        raise ConfigError(f"--namespace {args.namespace!r}: a namespace name is lower-case letters, digits and '-' "
                          "(at most 63)")
    if not (len(args.configmap) <= 253 and _SUBDOMAIN.fullmatch(args.configmap)):
        raise ConfigError(f"--configmap {args.configmap!r}: a ConfigMap name is lower-case letters, digits, '-' and "
                          "'.' (at most 253)")
    if not args.resync_interval > 0:
        raise ConfigError("--resync-interval must be a positive number of seconds")
    return None if args.admin_listen in ("off", "") else parse_hostport(args.admin_listen, "--admin-listen")


def cmd(args: argparse.Namespace) -> int:
    import uvloop

    from egressd.allowlistsync import AllowlistSync
    from egressd.app import configure_logging
    from egressd.identity.podindex import ClientConfigError

    admin_at = check(args)
    try:
        sync = AllowlistSync(args.kubeconfig, namespace=args.namespace, configmap=args.configmap,
                             resync_interval=args.resync_interval)
    except ClientConfigError as exc:
        raise ConfigError(str(exc)) from None
    configure_logging()
    return uvloop.run(serve(sync, admin_at))


def admin_for(sync: AllowlistSync) -> Admin:
    """The admin endpoint of a sync: its readiness and its metrics."""
    from egressd.admin import Admin
    from egressd.metrics import sync_registry_for

    return Admin(sync_registry_for(sync.metrics), lambda: sync.not_ready() or True)


async def serve(sync: AllowlistSync, admin_at: HostPort | None) -> int:
    """Run the sync (and its admin listener) until SIGTERM or SIGINT."""
    import structlog

    log = structlog.get_logger("egressd")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    admin = admin_for(sync)
    server = None
    if admin_at is not None:
        try:
            server = await admin.start(*admin_at)
        except OSError as exc:
            raise ConfigError(f"--admin-listen {admin_at[0]}:{admin_at[1]}: {exc.strerror or exc}") from None
    running = loop.create_task(sync.run())
    stopping = loop.create_task(stop.wait())
    log.info("allowlist_sync.started", source=sync.ref, resync_interval=sync.resync_interval,
             admin=[server.sockets[0].getsockname()[:2]] if server else [])
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (running, stopping):
        task.cancel()
    await asyncio.wait({running, stopping}, timeout=STOP_TIMEOUT)
    if server is not None:
        server.close()
    admin.close()
    if running.done() and not running.cancelled() and running.exception() is not None:
        log.error("allowlist_sync.crashed", error=repr(running.exception()))
        return 1
    log.info("allowlist_sync.stopped")
    return 0
