"""The deployment files agree with the code: Dockerfile, docker-compose.yml, deploy/kubernetes.

Every TASKBROKER_* variable they set is a real setting (broker.config.Settings) or SDK variable
(the CLI's envvars) with a valid value, probes ask the gRPC port, and every grace period outlasts
the drain it waits for.
"""

from __future__ import annotations

import inspect
import shlex
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from broker.app import LIVENESS_SERVICE
from broker.auth.policy import read_policy
from broker.auth.principal import Role
from broker.config import Settings, load_settings
from taskbroker import Worker
from taskbroker.cli import cli

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
GRPC_PORT = 50051
HTTP_PORT = 8080

SETTINGS_ENV = {"TASKBROKER_" + f.name.upper() for f in fields(Settings)}
#: What the image's health checker (python -m broker.healthcheck) reads besides the settings:
#: how to verify the broker's certificate.
HEALTHCHECK_ENV = {"TASKBROKER_TLS_CA", "TASKBROKER_TLS_SERVER_NAME"}
#: Settings a broker reachable from other hosts needs (or it refuses to start).
SECURED = {
    "TASKBROKER_TLS_CERT": "/s/tls.crt",
    "TASKBROKER_TLS_KEY": "/s/tls.key",
    "TASKBROKER_POLICY_FILE": "/s/policy.toml",
}


def _cli_env() -> set[str]:
    """Every environment variable the `taskbroker` CLI reads (TASKBROKER_TARGET, ...)."""
    names: set[str] = set()
    commands: list[click.Command] = [cli]
    while commands:
        command = commands.pop()
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
        if isinstance(command, click.Group):
            commands.extend(command.commands.values())
    return names


CLI_ENV = _cli_env()
WORKER_GRACE_S = inspect.signature(Worker).parameters["shutdown_grace"].default.total_seconds()


def _settings(env: Mapping[str, str]) -> Settings:
    """The broker's Settings from these variables; SystemExit names a bad one."""
    return load_settings([], environ=env)


def _container_settings(env: Mapping[str, str]) -> Settings:
    """The Settings of a broker container: the image's ENV, then the manifest's variables."""
    _, stages = _dockerfile()
    return _settings({**_stage(stages, "broker").env(), **env})


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _host(target: str) -> str:
    target = target.removeprefix("dns:///")
    return target.rsplit(":", 1)[0]


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"stage {self.name} has no {instruction}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            words = shlex.split(args)
            if "=" not in words[0]:  # the old `ENV KEY value` form
                values[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                values[key] = value
        return values


def _dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM, stages in order) of the Dockerfile."""
    logical: list[str] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line:
            logical.append(line)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(name=name, base=words[0]))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((instruction, rest.strip()))
    return args, stages


def _stage(stages: list[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise AssertionError(f"the Dockerfile has no stage {name!r}")


def test_dockerfile_base_image_is_a_build_arg_defaulting_to_the_official_python_image() -> None:
    args, stages = _dockerfile()
    assert args == {"BASE_IMAGE": "python:3.11-slim"}
    earlier: set[str] = set()
    for stage in stages:
        assert stage.base == "${BASE_IMAGE}" or stage.base in earlier, stage
        earlier.add(stage.name)
    assert [s.name for s in stages] == ["build", "runtime", "example-worker", "broker"]


def test_dockerfile_generates_the_protobuf_code_in_the_build() -> None:
    _, stages = _dockerfile()
    build = _stage(stages, "build")
    # The SDK's own build (clients/python/setup.py) generates taskbroker/v1 from ../../proto.
    assert any("install" in run and "./clients/python" in run for run in build.all("RUN"))
    assert "proto proto" in build.all("COPY")
    assert "grpcio-tools==" in (REPO / "clients" / "python" / "pyproject.toml").read_text()
    copies = " ".join(c for stage in stages for c in stage.all("COPY"))
    assert "taskbroker/v1" not in copies  # never copied in from a developer's checkout
    assert "clients/python/taskbroker/v1" in (REPO / ".dockerignore").read_text()


def test_dockerfile_broker_stage_runs_as_non_root_with_valid_settings() -> None:
    _, stages = _dockerfile()
    runtime, broker = _stage(stages, "runtime"), _stage(stages, "broker")
    user = runtime.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), user
    assert not broker.all("USER") or broker.last("USER") == user

    env = broker.env()
    assert {k for k in env if k.startswith("TASKBROKER_")} <= SETTINGS_ENV
    # Secure by default: the image alone refuses to serve its reachable ports in the clear.
    assert "TASKBROKER_INSECURE" not in env
    with pytest.raises(SystemExit):
        _settings(env)
    settings = _settings({**env, **SECURED})
    exposed = {int(port) for port in broker.last("EXPOSE").split()}
    assert (
        exposed == {_port(settings.listen), _port(settings.http_listen)} == {GRPC_PORT, HTTP_PORT}
    )
    assert settings.listen_host == "0.0.0.0" and settings.http_listen.startswith("0.0.0.0:")
    assert str(settings.data_dir) == "/data" and broker.last("VOLUME") == '["/data"]'

    assert broker.last("STOPSIGNAL") == "SIGTERM"
    assert broker.last("HEALTHCHECK").endswith('CMD ["python", "-m", "broker.healthcheck"]')
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert broker.last("ENTRYPOINT") == '["taskbroker-broker"]' and "taskbroker-broker" in scripts


def test_dockerfile_example_worker_stage() -> None:
    _, stages = _dockerfile()
    worker = _stage(stages, "example-worker")
    assert worker.base == "runtime"
    assert worker.last("ENTRYPOINT") == '["taskbroker", "worker", "examples.worker:make_worker"]'
    assert worker.last("STOPSIGNAL") == "SIGTERM"
    assert {k for k in worker.env() if k.startswith("TASKBROKER_")} <= CLI_ENV


# --- docker-compose.yml -----------------------------------------------------------------------


def _compose() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load((REPO / "docker-compose.yml").read_text())[
        "services"
    ]
    return services


def _compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "").isdigit():
            return float(text[: -len(unit)]) * units[unit]
    raise AssertionError(f"not a compose duration: {text!r}")


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def _compose_brokers() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _compose().items()
        if (service.get("build") or {}).get("target") == "broker"
    }


def test_compose_redis_is_the_official_image_with_aof_always_and_noeviction() -> None:
    redis = _compose()["redis"]
    repository, _, tag = redis["image"].partition(":")
    assert repository == "redis" and tag and tag != "latest"
    assert _flags(redis["command"]) == {
        "--appendonly": "yes",
        "--appendfsync": "always",
        "--maxmemory-policy": "noeviction",
        "--hash-max-listpack-value": "512",
    }
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_runs_two_broker_replicas_on_the_shared_redis() -> None:
    brokers = _compose_brokers()
    assert len(brokers) >= 2
    assert len({b["image"] for b in brokers.values()}) == 1
    published: list[str] = []
    for name, broker in brokers.items():
        env = _compose_env(broker)
        assert set(env) <= SETTINGS_ENV | HEALTHCHECK_ENV, name
        settings = _container_settings(env)
        assert settings.tls and settings.policy_file is not None and not settings.insecure
        _assert_secrets_mounted(broker, env)
        assert settings.redis_url is not None and urlsplit(settings.redis_url).hostname == "redis"
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        container_ports = {}
        for mapping in broker["ports"]:
            host_port, container_port = mapping.rsplit(":", 2)[-2:]
            container_ports[int(container_port)] = host_port
            published.append(mapping.rsplit(":", 1)[0])
        assert set(container_ports) == {_port(settings.listen), _port(settings.http_listen)}
        assert set(container_ports) == {GRPC_PORT, HTTP_PORT}
        assert _duration_s(broker["stop_grace_period"]) > settings.shutdown_grace_s
        assert broker["read_only"] is True and "/tmp" in broker["tmpfs"]
    assert len(published) == len(set(published)), "two services publish one host port"


def _assert_secrets_mounted(service: dict[str, Any], env: dict[str, str]) -> None:
    """Every file a variable names is one of the service's compose secrets."""
    files = {v for k, v in env.items() if k.endswith(("_CERT", "_KEY", "_FILE", "_CA"))}
    assert files and files <= {f"/run/secrets/{name}" for name in service["secrets"]}


def test_compose_secrets_are_what_dev_secrets_makes_and_grant_the_worker_consume(
    tmp_path: Path,
) -> None:
    secrets = yaml.safe_load((REPO / "docker-compose.yml").read_text())["secrets"]
    made = tmp_path / ".dev-secrets"
    subprocess.run(
        [str(REPO / "scripts" / "dev-secrets.sh"), str(made)], check=True, capture_output=True
    )
    for name, secret in secrets.items():
        assert secret["file"] == f".dev-secrets/{name}" and (made / name).is_file(), name
    policy = read_policy(made / "policy.toml")
    worker = policy.principal_for_token((made / "worker.token").read_text())
    assert worker is not None and policy.allows(worker, Role.CONSUME, "emails")
    assert not policy.allows(worker, Role.PRODUCE, "emails")
    assert "token_sha256" in (made / "policy.toml").read_text()
    assert (made / "worker.token").read_text() not in (made / "policy.toml").read_text()


def test_compose_example_worker_targets_the_brokers() -> None:
    _, stages = _dockerfile()
    services = _compose()
    worker = services["worker"]
    _stage(stages, worker["build"]["target"])
    env = _compose_env(worker)
    assert set(env) <= CLI_ENV
    assert {"TASKBROKER_TLS_CA", "TASKBROKER_TOKEN_FILE"} <= set(env)
    _assert_secrets_mounted(worker, env)
    target = env["TASKBROKER_TARGET"]
    brokers = _compose_brokers()
    aliases = {
        alias
        for broker in brokers.values()
        for network in (broker.get("networks") or {}).values()
        for alias in (network or {}).get("aliases", [])
    }
    assert _host(target) in aliases | set(brokers) and _port(target) == GRPC_PORT
    assert set(worker["depends_on"]) <= set(brokers)
    assert _duration_s(worker["stop_grace_period"]) > WORKER_GRACE_S
    assert worker["read_only"] is True and "/tmp" in worker["tmpfs"]


# --- deploy/kubernetes ------------------------------------------------------------------------


def _kubernetes() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    paths = sorted(KUBERNETES.glob("*.yaml"))
    assert paths, "no manifests in deploy/kubernetes"
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _pod(workload: Mapping[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _only_container(workload: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = _pod(workload)["containers"]
    result: dict[str, Any] = container
    return result


def _k8s_env(
    container: Mapping[str, Any], objects: Mapping[tuple[str, str], Mapping[str, Any]]
) -> tuple[set[str], dict[str, str]]:
    """(every variable name the container gets, the values that are written down)."""
    names: set[str] = set()
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = objects[("ConfigMap", source["configMapRef"]["name"])]
        for key, value in config_map["data"].items():
            names.add(key)
            values[key] = str(value)
    for item in container.get("env", []):
        names.add(item["name"])
        if "value" in item:
            values[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = objects[("Secret", ref["name"])]
            values[item["name"]] = str(secret["stringData"][ref["key"]])
    return names, values


def _workloads(
    objects: Mapping[tuple[str, str], dict[str, Any]],
) -> Iterator[tuple[str, dict[str, Any]]]:
    for (kind, name), doc in objects.items():
        if kind in ("Deployment", "StatefulSet"):
            yield name, doc


def test_every_workload_is_non_root_with_a_read_only_root() -> None:
    objects = _kubernetes()
    workloads = dict(_workloads(objects))
    assert set(workloads) == {"redis", "taskbroker", "taskbroker-example-worker"}
    for name, workload in workloads.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        pod = _pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name


def test_broker_deployment() -> None:
    objects = _kubernetes()
    deployment = objects[("Deployment", "taskbroker")]
    assert deployment["spec"]["replicas"] >= 2
    container = _only_container(deployment)
    pod = _pod(deployment)

    repository, _, tag = container["image"].partition(":")
    assert repository == "taskbroker" and tag and tag != "latest"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT}

    names, values = _k8s_env(container, objects)
    assert names <= SETTINGS_ENV | HEALTHCHECK_ENV and names == set(values)
    settings = _container_settings(values)
    assert (_port(settings.listen), _port(settings.http_listen)) == (GRPC_PORT, HTTP_PORT)
    assert settings.tls and settings.policy_file is not None and not settings.insecure

    # Kubernetes' gRPC probe speaks no TLS: the image's checker asks, over TLS.
    check = ["python", "-m", "broker.healthcheck"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        service = ["--service", LIVENESS_SERVICE] if kind == "livenessProbe" else []
        assert probe["exec"]["command"] == check + service, kind
        assert set(probe) - {"exec"} <= {
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "initialDelaySeconds",
            "successThreshold",
        }, kind
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30  # outlasts a blip

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + settings.shutdown_grace_s

    _, stages = _dockerfile()
    uid = int(_stage(stages, "runtime").last("USER").split(":")[0])
    assert pod["securityContext"]["runAsUser"] == uid
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secret_files = {
        str(settings.tls_cert): "taskbroker-tls",
        str(settings.tls_key): "taskbroker-tls",
        values["TASKBROKER_TLS_CA"]: "taskbroker-tls",
        str(settings.policy_file): "taskbroker-policy",
    }
    for path, secret in secret_files.items():
        volume = volumes[mounts[str(Path(path).parent)]]
        assert volume["secret"]["secretName"] == secret, path
    assert {"/tmp", str(settings.data_dir)} <= set(mounts)
    assert all("emptyDir" in volumes[mounts[path]] for path in ("/tmp", str(settings.data_dir)))


def test_broker_service_exposes_grpc_and_http() -> None:
    objects = _kubernetes()
    deployment = objects[("Deployment", "taskbroker")]
    service = objects[("Service", "taskbroker")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _only_container(deployment)["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {name: p["port"] for name, p in ports.items()} == {"grpc": GRPC_PORT, "http": HTTP_PORT}
    for name, port in ports.items():
        assert port["targetPort"] in (name, container_ports[name])
    budget = objects[("PodDisruptionBudget", "taskbroker")]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_redis_reference_keeps_every_acknowledged_task() -> None:
    objects = _kubernetes()
    redis = objects[("StatefulSet", "redis")]
    container = _only_container(redis)
    repository, _, tag = container["image"].partition(":")
    assert repository == "redis" and tag and tag != "latest"
    assert _flags(container["args"]) == {
        "--appendonly": "yes",
        "--appendfsync": "always",
        "--maxmemory-policy": "noeviction",
        "--hash-max-listpack-value": "512",
    }
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/data"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    # The broker's Secret names this Redis.
    service = objects[("Service", redis["spec"]["serviceName"])]
    _, values = _k8s_env(_only_container(objects[("Deployment", "taskbroker")]), objects)
    url = urlsplit(values["TASKBROKER_REDIS_URL"])
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == 6379


def test_example_worker_deployment_targets_the_broker_service() -> None:
    objects = _kubernetes()
    worker = objects[("Deployment", "taskbroker-example-worker")]
    container = _only_container(worker)
    repository, _, tag = container["image"].partition(":")
    assert repository == "taskbroker-example-worker" and tag and tag != "latest"
    names, values = _k8s_env(container, objects)
    assert names <= CLI_ENV
    target = values["TASKBROKER_TARGET"]
    service = objects[("Service", _host(target))]
    grpc_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert _port(target) == grpc_port
    assert _pod(worker)["terminationGracePeriodSeconds"] > WORKER_GRACE_S
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(worker)["volumes"]}
    for variable in ("TASKBROKER_TLS_CA", "TASKBROKER_TOKEN_FILE"):
        volume = volumes[mounts[str(Path(values[variable]).parent)]]
        assert volume["secret"]["secretName"] == "taskbroker-worker", variable


@pytest.mark.parametrize(
    "name", ["docker-compose.yml", *sorted(p.name for p in KUBERNETES.glob("*.yaml"))]
)
def test_every_deployment_file_is_explained(name: str) -> None:
    readmes = (REPO / "docs" / "operations.md").read_text() + (KUBERNETES / "README.md").read_text()
    assert name in readmes
