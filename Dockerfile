# egressd image: the proxy, its allowlists mounted at /etc/egressd/allowlists.
# Not built in CI (no container engine there); the same install is what
# install.sh and the tests exercise.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.12-slim
COPY --from=build /install /usr/local
COPY allowlists /etc/egressd/allowlists
# UID 1337: the sidecar's iptables rules exempt this UID from redirection.
USER 1337:1337
ENV EGRESSD_ALLOWLISTS=/etc/egressd/allowlists \
    EGRESSD_LISTEN=0.0.0.0:3128 \
    EGRESSD_ADMIN_LISTEN=0.0.0.0:15020
EXPOSE 3128 15020
ENTRYPOINT ["egressd", "run"]
