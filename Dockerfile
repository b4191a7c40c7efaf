# taskbroker broker image. Build: docker build -t taskbroker . (or: buildah bud -t taskbroker .)
# Run against your Redis:  docker run -e TASKBROKER_REDIS_URL=redis://redis:6379/0 -p 50051:50051 taskbroker
# With no TASKBROKER_REDIS_URL it starts the embedded redis-server (data in /data).

FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.txt pyproject.toml ./
COPY clients/python/pyproject.toml clients/python/pyproject.toml
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
COPY proto proto
COPY clients/python/taskbroker clients/python/taskbroker
COPY broker broker
# Generated code is built here from proto/, never committed (STYLE.md 2.5).
RUN /opt/venv/bin/python -m grpc_tools.protoc -I proto \
      --python_out=clients/python --grpc_python_out=clients/python \
      --mypy_out=clients/python --mypy_grpc_out=async_only:clients/python \
      proto/taskbroker/v1/*.proto \
 && touch clients/python/taskbroker/v1/__init__.py \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps ./clients/python . \
 && /opt/venv/bin/pip uninstall -y grpcio-tools mypy-protobuf mypy ruff pytest pytest-asyncio \
      pytest-timeout types-grpcio types-protobuf

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data taskbroker && mkdir /data \
 && chown taskbroker /data
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /data
ENV PATH=/opt/venv/bin:$PATH \
    TASKBROKER_LISTEN=0.0.0.0:50051 \
    TASKBROKER_DATA_DIR=/data
EXPOSE 50051
STOPSIGNAL SIGTERM
ENTRYPOINT ["taskbroker-broker"]
