"""The inspection worker process: ``python -m egressd.inspect.worker`` (started by :class:`egressd.inspect.client.
Inspector`, never by hand).

Its input is one JSON line on stdin: ``{"secret", "ca_cert", "ca_key", "upstream_ca", "log_query"}`` (the
secret never appears in argv or the environment); stdin then stays open, and its EOF (egressd exited) stops the
worker. Its output, on the stdout it was given, is JSON lines: first ``{"event": "ready", "port": N}`` (or
``{"event": "fatal", "error": ...}`` and exit 2), then one ``{"event": "request", ...}`` per request (see
:meth:`egressd.inspect.addon.Inspection._finish`). Everything else it or mitmproxy has to say goes to stderr
(warnings and errors, one JSON line each), never to that channel: fd 1 is pointed at stderr at start.

mitmproxy runs embedded: a :class:`mitmproxy.master.Master` with only the addons needed (the proxy server, our
:class:`~egressd.inspect.addon.Inspection`, and :class:`CaTlsConfig`: TLS over our CA), in regular mode on
127.0.0.1:0, connecting upstream lazily (a refused request never opens an upstream connection), no HTTP/3, no raw
TCP, no confdir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from mitmproxy import http, options
from mitmproxy.addons import proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.certs import CertStore, CertStoreEntry
from mitmproxy.master import Master
from mitmproxy.proxy import context

from egressd.inspect import ca
from egressd.inspect.addon import Inspection

_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


class Channel:
    """The JSON-line channel to egressd (a pipe): whole lines, written through."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, event: dict[str, Any]) -> None:
        data = memoryview(json.dumps(event, separators=(",", ":"), default=str).encode() + b"\n")
        while data:
            data = data[os.write(self.fd, data):]


class CaTlsConfig(TlsConfig):
    """mitmproxy's TlsConfig over egressd's CA (in memory, never a confdir), signing leaves for the tunnel's name."""

    _STORE_OPTIONS = frozenset({"certs", "confdir", "key_size", "cert_passphrase", "emudhra", "emudhra_old"})

    def __init__(self, store: CertStore, inspection: Inspection) -> None:
        self.certstore = store
        self._inspection = inspection

    def configure(self, updated: set[str]) -> None:
        super().configure(set(updated) - self._STORE_OPTIONS)

    def running(self) -> None:  # TlsConfig reloads its store from confdir here; ours is fixed
        pass

    def request(self, flow: http.HTTPFlow) -> None:  # no locally answered CRL path
        pass

    def get_cert(self, conn_context: context.Context) -> CertStoreEntry:
        tunnel = self._inspection.tunnels.get(conn_context.client.id)
        name = tunnel.sni if tunnel is not None else "unknown.invalid"
        return self.certstore.get_cert(name, [x509.DNSName(name)])


class _JsonLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        line = {"event": "inspect.worker_log", "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage(), "pid": os.getpid()}
        if record.exc_info and record.exc_info[1] is not None:
            line["error"] = repr(record.exc_info[1])
        sys.stderr.write(json.dumps(line, default=str) + "\n")
        sys.stderr.flush()


def trust_store(upstream_ca: str | None) -> tuple[str | None, str | None]:
    """(CA file, CA directory) that verify origins: --inspect-upstream-ca alone when given, else the system's
    (SSL_CERT_FILE/SSL_CERT_DIR, OpenSSL's defaults, the usual bundle paths); never certifi's copy silently."""
    if upstream_ca:
        return upstream_ca, None
    paths = ssl.get_default_verify_paths()
    cafile = os.environ.get("SSL_CERT_FILE") or paths.cafile or next((p for p in _BUNDLES if Path(p).is_file()), None)
    capath = os.environ.get("SSL_CERT_DIR") or paths.capath
    if cafile is None and capath is None:
        raise ca.CaError("no system trust store found (no CA bundle file or directory); give --inspect-upstream-ca")
    return cafile, capath


async def serve(config: dict[str, Any], channel: Channel) -> int:
    cert, key = ca.load(config["ca_cert"], config["ca_key"])
    cafile, capath = trust_store(config.get("upstream_ca"))
    opts = options.Options()
    master = Master(opts, with_termlog=False)
    inspection = Inspection(config["secret"], channel, bool(config.get("log_query")))
    master.addons.add(proxyserver.Proxyserver(), inspection, CaTlsConfig(ca.certstore(cert, key), inspection))
    opts.update(
        mode=["regular@127.0.0.1:0"], connection_strategy="lazy", upstream_cert=False, http2=True, http3=False,
        websocket=True, rawtcp=False, ssl_insecure=False, ssl_verify_upstream_trusted_ca=cafile,
        ssl_verify_upstream_trusted_confdir=capath, validate_inbound_headers=True, store_streamed_bodies=False,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    lifeline = await _watch_stdin(loop, master)
    ready = loop.create_future()
    master.addons.add(_Running(ready))
    run = loop.create_task(master.run())
    await asyncio.wait([ready, run], return_when=asyncio.FIRST_COMPLETED)
    addresses = master.addons.get("proxyserver").listen_addrs()
    if not addresses:
        master.shutdown()
        await run
        raise RuntimeError("mitmproxy did not listen on 127.0.0.1 (see the errors above on stderr)")
    channel({"event": "ready", "port": addresses[0][1], "pid": os.getpid()})
    await run
    lifeline.close()
    return 0


class _Running:
    """Resolves ``ready`` when mitmproxy's servers are up (its ``running`` hook)."""

    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.ready = ready

    def running(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)


async def _watch_stdin(loop: asyncio.AbstractEventLoop, master: Master) -> asyncio.BaseTransport:
    """Shut down when stdin ends (the egressd that started this worker is gone)."""

    class Lifeline(asyncio.Protocol):
        def eof_received(self) -> bool:
            master.shutdown()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            master.shutdown()

    transport, _ = await loop.connect_read_pipe(Lifeline, sys.stdin)
    return transport


def main() -> int:
    channel = Channel(os.dup(1))
    os.dup2(2, 1)  # anything printed goes to stderr, never into the channel
    sys.stdout = sys.stderr
    handler = _JsonLines(logging.WARNING)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    try:
        config = json.loads(sys.stdin.buffer.readline() or b"null")
        if not isinstance(config, dict) or not config.get("secret"):
            raise ValueError("the first line on stdin must be the JSON configuration with the secret")
        return asyncio.run(serve(config, channel))
    except (ValueError, OSError, RuntimeError) as exc:  # CaError is a ValueError
        channel({"event": "fatal", "error": str(exc)})
        return 2
    except Exception as exc:  # anything else: said on the channel too (and the traceback on stderr)
        logging.getLogger("egressd.inspect").exception("the inspection worker failed")
        channel({"event": "fatal", "error": f"the inspection worker failed: {exc!r}"})
        return 2


if __name__ == "__main__":
    sys.exit(main())
