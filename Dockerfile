# syntax=docker/dockerfile:1
# The egressd image: `egressd sidecar` (the default command, as UID 1337), `egressd init-iptables` (the
# injected init step, run as root with NET_ADMIN and NET_RAW), `egressd run` (the gateway),
# `egressd inject-webhook` and `egressd allowlist-sync`. It runs with a read-only root file system.
#   docker build -t ghcr.io/egressd/egressd:0.1.0 .

# The wheels of egressd and of everything it depends on.
FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="egressd" \
      org.opencontainers.image.description="Egress FQDN-filtering proxy for Kubernetes: per-service allowlists, pinned DNS, one audit record per connection." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/egressd/egressd"

# iptables brings iptables/ip6tables with both back ends (iptables-nft*, iptables-legacy*) for
# `egressd init-iptables`. The legacy back end takes the lock /run/xtables.lock even with a read-only root
# file system: the file exists beforehand (the injected pod mounts an emptyDir on /run all the same).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.9-2 \
    && rm -rf /var/lib/apt/lists/* \
    && install -m 0600 /dev/null /run/xtables.lock

# egressd from the wheels of the first stage only (no index); its modules are compiled here, so nothing is
# written at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "egressd==${VERSION}"

# The webhook's patch templates, and the allowlists as built (the cluster mounts its ConfigMap over them).
COPY sidecar /usr/share/egressd/sidecar
COPY allowlists /etc/egressd/allowlists

# No listener address here: every listener keeps its command's default (the sidecar's proxy listeners on
# loopback, its admin port on the pod's address); the gateway gives --listen in its arguments.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EGRESSD_ALLOWLISTS=/etc/egressd/allowlists

# UID 1337: the sidecar's iptables rules leave this UID's traffic alone.
USER 1337:1337
EXPOSE 15020
ENTRYPOINT ["egressd"]
CMD ["sidecar"]
