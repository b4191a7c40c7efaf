# taskbroker images. Build the broker (the default, last stage) and the example worker:
#   docker build -t taskbroker .
#   docker build --target example-worker -t taskbroker-example-worker .
# (podman/buildah: add --format docker to keep the HEALTHCHECK, which OCI images cannot carry.)
# Run against your Redis:
#   docker run --read-only --tmpfs /tmp -p 50051:50051 -p 8080:8080 \
#     -e TASKBROKER_REDIS_URL=redis://redis:6379/0 taskbroker
# With no TASKBROKER_REDIS_URL it starts the embedded redis-server, its AOF in the /data volume.
# Settings are TASKBROKER_* variables (README "Configuration"). The root filesystem may be
# read-only: the broker writes only to /data and /tmp.

# Any Debian-based image with Python 3.11+ and apt; python3 may be in /usr/local/bin (the official
# image) or /usr/bin (Debian's own). Both stages must use the same one: the venv points at it.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# /opt/venv becomes the runtime: no pip in it; the pip of /opt/tools installs into it.
RUN python3 -m venv --without-pip /opt/venv && python3 -m venv /opt/tools
COPY requirements.txt pyproject.toml ./
COPY clients/python/pyproject.toml clients/python/pyproject.toml
# The runtime dependencies of both packages, at the versions requirements.txt pins, in a layer of
# their own, so that editing the code does not download them again.
RUN /opt/tools/bin/python -c 'import tomllib; print("\n".join(d for f in ("pyproject.toml", "clients/python/pyproject.toml") for d in tomllib.load(open(f, "rb"))["project"]["dependencies"] if d != "taskbroker"))' > runtime-requirements.txt \
 && /opt/tools/bin/pip --python /opt/venv/bin/python install -c requirements.txt \
      -r runtime-requirements.txt
COPY proto proto
COPY clients/python clients/python
COPY broker broker
COPY examples examples
# Generated code is never committed (STYLE.md 2.5): the SDK's own build (clients/python/setup.py)
# generates taskbroker/v1 from ../../proto, with grpcio-tools as a pinned build requirement.
RUN /opt/tools/bin/pip --python /opt/venv/bin/python install --no-deps ./clients/python . \
 && /opt/tools/bin/pip --python /opt/venv/bin/python check \
 && /opt/venv/bin/python -m compileall -q examples

FROM ${BASE_IMAGE} AS runtime
# redis-server only for the embedded-Redis mode; policy-rc.d keeps its package from starting it.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/sbin/policy-rc.d \
 && groupadd --system --gid 10001 taskbroker \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin taskbroker \
 && mkdir /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# The examples/ worker (both demo handlers), for docker-compose.yml and deploy/kubernetes.
FROM runtime AS example-worker
COPY --from=build /src/examples /opt/taskbroker/examples
WORKDIR /opt/taskbroker
# SIGTERM: in-flight handlers get the worker's shutdown grace (30 s) to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["taskbroker", "worker", "examples.worker:make_worker"]

# The broker: the default (last) stage.
FROM runtime AS broker
# Both ports listen on every interface of the container, so the broker refuses to start without
# TLS and a policy file (docs/security.md): mount them and set TASKBROKER_TLS_CERT,
# TASKBROKER_TLS_KEY and TASKBROKER_POLICY_FILE (docker-compose.yml and deploy/kubernetes show
# how), or say TASKBROKER_INSECURE=1 on a network you trust (it logs a warning).
ENV TASKBROKER_LISTEN=0.0.0.0:50051 \
    TASKBROKER_HTTP_LISTEN=0.0.0.0:8080 \
    TASKBROKER_DATA_DIR=/data
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051 8080
# SIGTERM drains: health NOT_SERVING, a drain notice to every stream, settlements accepted for
# TASKBROKER_SHUTDOWN_GRACE_S (10 s), then held tasks go back to pending. Give it longer than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-m", "broker.healthcheck"]
ENTRYPOINT ["taskbroker-broker"]
