"""The injection webhook's HTTPS server: ``POST /inject`` answers with :func:`egressd.inject.review`.

A thin shell over the pure review. ``GET /healthz`` answers 200 for the Deployment's probes. Anything else
gets an AdmissionReview-shaped ``allowed: false`` answer, never a traceback: another path 404, another
method 405, a body over :data:`MAX_BODY` 413, a content type other than JSON 415, a body not sent within
:data:`BODY_TIMEOUT` 408. Every review is one ``inject.review`` JSON line on stdout.

TLS uses one :class:`ssl.SSLContext` for the whole run. :class:`CertReloader` stats the certificate and key
files every second; when either changes it loads the pair again into that same context, so new handshakes
get the new pair. The pair is read once and checked on a scratch context first: a pair that does not load
(half-written, mismatched, encrypted) leaves the old one serving, and is logged once per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from egressd import inject
from egressd.config import ConfigError

MAX_BODY = 3 * 1024 * 1024
BODY_TIMEOUT = 10.0  # seconds to receive a request body (the API server's own call times out sooner)
RELOAD_INTERVAL = 1.0  # seconds between looks at the certificate files
SHUTDOWN_TIMEOUT = 5.0  # seconds reviews in flight get to finish on SIGTERM
PATH, HEALTH = "/inject", "/healthz"

log = structlog.get_logger("egressd.webhook")


class CertError(ConfigError):
    """A certificate and key pair that cannot be loaded; the message names the files and the fix."""


def configure_logging() -> None:
    """One JSON line per event on stdout."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The server's TLS context with the pair loaded (TLS 1.2 and later); :class:`CertError` if it does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    load_pair(context, cert, key)
    return context


def load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """Read the pair once, check it on a scratch context, then load those same bytes into ``context``."""
    try:
        pem = (Path(cert).read_bytes(), Path(key).read_bytes())
        with _in_memory(pem) as (cert_path, key_path):
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=_no_password)
            context.load_cert_chain(cert_path, key_path, password=_no_password)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise CertError(f"--cert {cert} and --key {key} do not load ({exc}): give a PEM certificate chain and its "
                        "unencrypted PEM private key") from None


def _no_password() -> bytes:
    raise ValueError("the private key is encrypted")


@contextlib.contextmanager
def _in_memory(blobs: tuple[bytes, ...]) -> Iterator[list[str]]:
    """Paths to private in-memory copies of ``blobs`` (memfd), so both loads read exactly the same bytes."""
    fds: list[int] = []
    try:
        for blob in blobs:
            fds.append(os.memfd_create("egressd-webhook-pem"))
            with open(fds[-1], "wb", closefd=False) as fh:
                fh.write(blob)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


class CertReloader:
    """Loads the pair again into the serving context when either file changes (a new inode, mtime or size)."""

    def __init__(self, context: ssl.SSLContext, cert: str, key: str) -> None:
        self.context, self.cert, self.key = context, cert, key
        self.seen = self._signature()

    def _signature(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(path)
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError as exc:
                out.append(exc.strerror)
        return tuple(out)

    def poll(self) -> bool | None:
        """True: a changed pair was loaded; False: it did not load (the old one serves on); None: no change."""
        signature = self._signature()
        if signature == self.seen:
            return None
        self.seen = signature
        try:
            load_pair(self.context, self.cert, self.key)
        except CertError as exc:
            log.error("inject-webhook.cert_reload_failed", error=str(exc))
            return False
        log.info("inject-webhook.cert_reloaded", cert=self.cert, key=self.key)
        return True

    async def run(self, interval: float = RELOAD_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            self.poll()


def make_app(settings: inject.Settings, templates: inject.Templates) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == HEALTH:
            if request.method in ("GET", "HEAD"):
                return web.Response(text="ok\n")
            return _refuse(request, 405, "method_not_allowed", f"{HEALTH} answers GET", {"Allow": "GET, HEAD"})
        if request.path != PATH:
            return _refuse(request, 404, "not_found", f"no such path {request.path!r}: the webhook serves POST "
                           f"{PATH} (the MutatingWebhookConfiguration's path) and GET {HEALTH}")
        if request.method != "POST":
            return _refuse(request, 405, "method_not_allowed", f"{PATH} answers POST with an AdmissionReview",
                           {"Allow": "POST"})
        if request.content_type != "application/json":
            return _refuse(request, 415, "unsupported_media_type", f"content type {request.content_type!r}: send "
                           "the AdmissionReview as application/json")
        if (request.content_length or 0) > MAX_BODY:
            return _refuse(request, 413, "too_large", f"the body is over {MAX_BODY} bytes")
        try:
            body = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
        except web.HTTPRequestEntityTooLarge:
            return _refuse(request, 413, "too_large", f"the body is over {MAX_BODY} bytes")
        except TimeoutError:
            return _refuse(request, 408, "body_timeout", f"the body did not arrive within {BODY_TIMEOUT:g} s")
        try:
            outcome = inject.review(body, settings, templates)
        except Exception:  # a bug, not the input: refuse this pod (fail closed), log it, serve on
            log.exception("inject-webhook.review_failed")
            return web.json_response(inject.refusal(500, "the webhook failed to review this pod; see its log"),
                                     status=500)
        log.info("inject.review", **outcome.log_fields())
        status = 400 if outcome.decision is inject.Decision.INVALID else 200
        return web.json_response(outcome.response(), status=status)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _refuse(request: web.Request, status: int, reason: str, message: str,
            headers: dict[str, str] | None = None) -> web.Response:
    event = "inject.review" if request.path == PATH else "inject-webhook.refused"
    log.info(event, decision=inject.Decision.INVALID.value, reason=reason, message=message, method=request.method,
             path=request.path, status=status)
    return web.json_response(inject.refusal(status, message), status=status, headers=headers)


async def serve(listen: tuple[str | None, int], context: ssl.SSLContext, cert: str, key: str,
                settings: inject.Settings, templates: inject.Templates, templates_dir: str) -> int:
    """Serve until SIGTERM or SIGINT; 1 if the address cannot be bound."""
    runner = web.AppRunner(make_app(settings, templates), access_log=None, handle_signals=False)
    await runner.setup()
    reloader = asyncio.create_task(CertReloader(context, cert, key).run())
    try:
        site = web.TCPSite(runner, listen[0], listen[1], ssl_context=context, reuse_address=True,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
        try:
            await site.start()
        except OSError as exc:
            log.error("inject-webhook.bind_failed", listen=f"{listen[0] or ''}:{listen[1]}", error=str(exc))
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("inject-webhook.started", listen=[list(a[:2]) for a in runner.addresses], image=settings.image,
                 version=settings.version, namespace=settings.namespace, templates=templates_dir,
                 exclude_cidrs=[str(n) for n in settings.exclude_cidrs], exclude_ports=list(settings.exclude_ports))
        await stop.wait()
        log.info("inject-webhook.stopping")
        return 0
    finally:
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.cleanup(), SHUTDOWN_TIMEOUT + 5)


def run(listen: tuple[str | None, int], context: ssl.SSLContext, cert: str, key: str, settings: inject.Settings,
        templates: inject.Templates, templates_dir: str) -> int:
    configure_logging()
    return asyncio.run(serve(listen, context, cert, key, settings, templates, templates_dir))
