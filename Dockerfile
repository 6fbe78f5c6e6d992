# syntax=docker/dockerfile:1
#
# guardproxy container image. Build from the repository root:
#
#   docker build -t guardproxy:0.1.0 .
#
# Run it in front of a database (agents log in with SCRAM-SHA-256 against the
# verifiers in the auth file; make one with `guardproxy passwd NAME --auth-file FILE`):
#
#   docker run --rm -p 6432:6432 \
#     -e GUARDPROXY_UPSTREAM='postgresql://guardproxy:PASSWORD@db.internal:5432/app' \
#     -v "$PWD/agents.auth:/etc/guardproxy/auth/agents.auth:ro" \
#     -v "$PWD/policies:/etc/guardproxy/policies:ro" \
#     guardproxy:0.1.0 --policies /etc/guardproxy/policies
#
# The image has no Postgres server binaries, so the embedded cluster is not
# available: GUARDPROXY_UPSTREAM (or --upstream) is required.
# See docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
# Installs guardproxy and its dependencies into a virtualenv that is copied
# whole into the runtime stage; the sources and pip's caches stay behind.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/guardproxy

# A C compiler for the hot path, compiled with mypyc (guardproxy/native.py); it stays
# in this stage: the runtime stage gets the built extensions only.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY guardproxy/ guardproxy/
# The alembic migrations ship inside the package as guardproxy.migrations
# (pyproject: package-dir), for `guardproxy db upgrade`.
COPY migrations/ migrations/
# First the project and its dependencies, then the hot path compiled in place of
# its sources (GUARDPROXY_COMPILE=1, setup.py): mypyc needs the dependencies' types,
# so it builds in this environment (--no-build-isolation), as scripts/compile does
# for the tests. The image then logs "hot path compiled (mypyc)" at start.
RUN /opt/guardproxy/bin/pip install . "setuptools>=77" wheel "mypy>=1.10,<3" \
 && GUARDPROXY_COMPILE=1 /opt/guardproxy/bin/pip install \
        --no-build-isolation --no-deps --force-reinstall . \
 && /opt/guardproxy/bin/pip uninstall --yes mypy pathspec ast-serialize setuptools wheel pip

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="guardproxy" \
      org.opencontainers.image.description="PostgreSQL wire-protocol proxy that guards AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and
# volumes can be made readable with fsGroup 10001.
RUN groupadd --system --gid 10001 guardproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin guardproxy \
 && install -d -m 0755 /etc/guardproxy /etc/guardproxy/config /etc/guardproxy/policies \
 && install -d -m 0750 -o 10001 -g 10001 /etc/guardproxy/auth

COPY --from=build /opt/guardproxy /opt/guardproxy

# The container contract: where the proxy and its ops port listen, and how
# agents authenticate. These are settings (GUARDPROXY_<NAME>), so they beat a
# --config file; override them with -e or with flags. listen_host 0.0.0.0 is
# only accepted with auth_mode scram, which needs the auth file mounted.
ENV PATH="/opt/guardproxy/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GUARDPROXY_LISTEN_HOST=0.0.0.0 \
    GUARDPROXY_LISTEN_PORT=6432 \
    GUARDPROXY_METRICS_HOST=0.0.0.0 \
    GUARDPROXY_METRICS_PORT=9632 \
    GUARDPROXY_AUTH_MODE=scram \
    GUARDPROXY_AUTH_FILE=/etc/guardproxy/auth/agents.auth

USER 10001:10001
WORKDIR /etc/guardproxy

# 6432: PostgreSQL protocol for agents. 9632: /metrics, /healthz, /readyz.
EXPOSE 6432 9632

# guardproxy runs as PID 1 (exec form below) and handles SIGTERM itself: it
# stops accepting, lets transactions finish for shutdown_timeout seconds, then
# exits. Give `docker stop` more than that: docker stop -t 45.
STOPSIGNAL SIGTERM

# slim has no curl or wget: ask /healthz with the standard library. urlopen
# raises (non-zero exit) on a refused connection, a timeout or a non-2xx status.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GUARDPROXY_METRICS_PORT', '9632') + '/healthz', timeout=2)"]

ENTRYPOINT ["guardproxy", "serve"]
