"""``egressd inject-webhook``: the admission webhook that injects the sidecar (:mod:`egressd.webhook`).

Every flag also reads ``EGRESSD_<FLAG>`` (``EGRESSD_IMAGE``, ``EGRESSD_CERT``...); repeatable flags take a
comma-separated list there (and on the command line too). A flag value that cannot be used exits 2 with one
line naming it: a missing or unloadable certificate pair, a template that does not parse, a bad range.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import egressd
from egressd import inject, kube, webhook
from egressd.cli.iptables import exclude_cidrs, flag_values
from egressd.config import ConfigError, env_default, parse_hostport

INSTALLED_TEMPLATES = Path("/usr/share/egressd/sidecar")  # where the image copies the repository's sidecar/


def default_templates() -> Path:
    """The repository's ``sidecar/`` when running from a source checkout, else the installed copy."""
    source = Path(egressd.__file__).resolve().parents[2] / "sidecar"
    return source if (source / inject.TEMPLATE_FILES["init"]).is_file() else INSTALLED_TEMPLATES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inject-webhook", help="serve the mutating admission webhook that injects egressd into pods")
    p.add_argument("--listen", default=env_default("listen", f":{kube.WEBHOOK_PORT}"),
                   help=f"IP:PORT, or :PORT for every address, of the HTTPS listener (:{kube.WEBHOOK_PORT})")
    p.add_argument("--cert", default=env_default("cert"),
                   help="the serving certificate chain, PEM (required; re-read when it changes)")
    p.add_argument("--key", default=env_default("key"), help="its private key, PEM, unencrypted (required)")
    p.add_argument("--image", default=env_default("image"),
                   help="the egressd image of the injected init step and sidecar (required)")
    p.add_argument("--namespace", default=env_default("namespace", kube.NAMESPACE),
                   help=f"egressd's own namespace, never injected ({kube.NAMESPACE})")
    p.add_argument("--exclude-cidr", action="append", default=None,
                   help="a destination range every injected pod leaves unfiltered, such as the cluster's pod and "
                   "Service ranges (repeatable; merged with the pod's egressd.io/exclude-cidrs)")
    p.add_argument("--exclude-port", action="append", default=None,
                   help="a destination port every injected pod leaves unfiltered (repeatable; merged with the "
                   "pod's egressd.io/exclude-ports)")
    p.add_argument("--templates", default=env_default("templates"),
                   help=f"the patch templates' directory (the source tree's sidecar/, else {INSTALLED_TEMPLATES})")


def parse_listen(text: str) -> tuple[str | None, int]:
    """``:PORT`` (every address, None) or ``IP:PORT``."""
    if text.startswith(":") and text[1:].isdigit() and int(text[1:]) <= 65535:
        return None, int(text[1:])
    if text.startswith(":"):
        raise ConfigError(f"--listen {text!r}: expected :PORT or IP:PORT with a port 0-65535, e.g. :8443")
    return parse_hostport(text, "--listen")


def settings_from(args: argparse.Namespace) -> inject.Settings:
    if not args.image:
        raise ConfigError(f"--image (or EGRESSD_IMAGE) is required: the egressd image, e.g. egressd:{kube.VERSION}")
    if not args.namespace:
        raise ConfigError(f"--namespace (or EGRESSD_NAMESPACE) is empty: give egressd's namespace ({kube.NAMESPACE})")
    cidrs = exclude_cidrs(args.exclude_cidr)
    ports = []
    for text in flag_values(args.exclude_port, "exclude-port"):
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
            raise ConfigError(f"--exclude-port (or EGRESSD_EXCLUDE_PORT) {text!r}: expected a port 1-65535")
        ports.append(int(text))
    return inject.Settings(image=args.image, namespace=args.namespace, exclude_cidrs=cidrs,
                           exclude_ports=tuple(dict.fromkeys(ports)))


def cmd(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    listen = parse_listen(args.listen)
    templates_dir = Path(args.templates) if args.templates else default_templates()
    templates = inject.load_templates(templates_dir)
    if not args.cert or not args.key:
        raise ConfigError("--cert and --key (or EGRESSD_CERT and EGRESSD_KEY) are required: the serving "
                          "certificate and key the API server's caBundle verifies")
    context = webhook.server_context(args.cert, args.key)
    return webhook.run(listen, context, args.cert, args.key, settings, templates, str(templates_dir))
