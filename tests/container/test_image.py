"""The Dockerfile, built and run with buildah (no Docker engine): `make test-container`.

Not part of `make test` (the `container` marker is deselected there): the first run debootstraps
a Debian base image (cached afterwards, keyed by a hash of its recipe) and builds both images.
Every container runs the way `docker run --read-only --tmpfs /tmp -v DATA:/data --network host`
runs it, as the image's own user, and is stopped with the image's STOPSIGNAL.

Needs root, buildah and debootstrap (.ci/run installs them). CONTAINER_TEST_ROOT moves the cache
(default /var/lib/taskbroker-test/containers; delete it to start cold), CONTAINER_STORAGE_DRIVER
picks buildah's storage driver (default overlay; vfs where overlay cannot mount, e.g. inside a
container), DEBIAN_MIRROR the mirror debootstrap uses (default: the one apt uses here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from broker.config import Settings, load_settings
from broker.healthcheck import check
from taskbroker import SyncClient, TaskState, TlsConfig, UnauthenticatedError
from tests.container.buildah import (
    Buildah,
    Container,
    build_image,
    ensure_base_image,
    storage_lock,
    unavailable_reason,
)
from tests.support.redis_server import RedisServer, free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
#: Kept between runs (the base image and buildah's layer cache); CONTAINER_TEST_ROOT moves it.
DEFAULT_ROOT = Path("/var/lib/taskbroker-test/containers")
IMAGE_UID = 10001
#: The broker's default shutdown grace (10 s) plus start-up and slack.
STOP_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def buildah() -> Iterator[Buildah]:
    missing = [tool for tool in ("buildah", "debootstrap", "unshare") if not shutil.which(tool)]
    if missing and os.geteuid() == 0:
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install buildah debootstrap")
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"containers cannot be built and run here: {reason}")
    root = Path(os.environ.get("CONTAINER_TEST_ROOT") or DEFAULT_ROOT)
    with storage_lock(root):
        yield Buildah(root, os.environ.get("CONTAINER_STORAGE_DRIVER") or "overlay")


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("container-logs")


@pytest.fixture(scope="module")
def images(buildah: Buildah, logs: Path) -> dict[str, str]:
    """Builds every stage on the cached base image; returns {stage: image}.

    The build stage is tagged too, so that pruning what no tag holds (older builds) keeps its
    cached layers (the pip installs) for the next run.
    """
    buildah.run("rm", "--all")  # containers a killed run left behind
    base = ensure_base_image(buildah, logs / "base-image.log")
    built = {}
    for stage in ("build", "broker", "example-worker"):
        built[stage] = f"localhost/taskbroker-{stage}:test"
        log = logs / f"build-{stage}.log"
        build_image(buildah, REPO, base=base, target=stage, tag=built[stage], log=log)
    buildah.run("rmi", "--prune")
    return built


@pytest.fixture(scope="module")
def broker_image(images: dict[str, str]) -> str:
    return images["broker"]


@pytest.fixture(scope="module")
def worker_image(images: dict[str, str]) -> str:
    return images["example-worker"]


def _data_dir(tmp_path: Path, name: str = "data") -> Path:
    """A host directory for /data, owned by the image's user as a fresh volume would be."""
    path = tmp_path / name
    path.mkdir()
    os.chown(path, IMAGE_UID, IMAGE_UID)
    return path


def _broker_env(**extra: str) -> dict[str, str]:
    return {
        "TASKBROKER_LISTEN": f"127.0.0.1:{free_port()}",
        "TASKBROKER_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        **extra,
    }


def _target(env: dict[str, str]) -> str:
    return env["TASKBROKER_LISTEN"]


def _wait_serving(container: Container, target: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    found = ""
    while time.monotonic() < deadline:
        if not container.running():
            raise AssertionError(f"the container exited:\n{container.tail()}")
        code, found = check(target, timeout_s=1.0)
        if code == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"not SERVING ({found}):\n{container.tail()}")


def _stop(container: Container) -> int:
    try:
        return container.stop(STOP_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{container.tail()}") from exc


def _proc_status_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def _root_mount_options(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        parts = line.split()
        if parts[4] == "/":
            return parts[5].split(",")
    raise AssertionError(f"no / in /proc/{pid}/mountinfo")


def test_worker_image_config(buildah: Buildah, worker_image: str) -> None:
    config = buildah.inspect_image(worker_image)["Docker"]["config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["taskbroker", "worker", "examples.worker:make_worker"]
    assert config["WorkingDir"] == "/opt/taskbroker"  # the CLI imports examples/ from here
    assert not config.get("Healthcheck") and not config.get("Volumes")


def test_broker_image_config(buildah: Buildah, broker_image: str) -> None:
    config = buildah.inspect_image(broker_image)["Docker"]["config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["taskbroker-broker"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "-m", "broker.healthcheck"]
    assert {"50051/tcp", "8080/tcp"} <= set(config["ExposedPorts"])
    assert set(config["Volumes"]) == {"/data"}  # the one place it writes, besides /tmp
    env = dict(item.split("=", 1) for item in config["Env"])
    names = {"TASKBROKER_" + f.name.upper() for f in fields(Settings)}
    assert {k for k in env if k.startswith("TASKBROKER_")} <= names
    assert "TASKBROKER_INSECURE" not in env  # secure by default: TLS and a policy, or no start
    secured = {"TASKBROKER_TLS_CERT": "c", "TASKBROKER_TLS_KEY": "k", "TASKBROKER_POLICY_FILE": "p"}
    settings = load_settings([], environ={**env, **secured})
    assert (settings.listen, settings.http_listen) == ("0.0.0.0:50051", "0.0.0.0:8080")
    assert str(settings.data_dir) == "/data"


def test_runtime_image_holds_no_build_tools(
    buildah: Buildah, broker_image: str, tmp_path: Path
) -> None:
    probe = (
        "import importlib.util, shutil; "
        "print(sorted(m for m in ('pip', 'grpc_tools', 'setuptools', 'pytest', 'mypy')"
        " if importlib.util.find_spec(m)), bool(shutil.which('redis-server')))"
    )
    with Container(
        buildah,
        broker_image,
        data_dir=_data_dir(tmp_path),
        log=tmp_path / "probe.log",
        command=["python", "-c", probe],
    ) as probe_container:
        assert probe_container.wait(60) == 0, probe_container.tail()
        assert probe_container.tail().splitlines()[-1] == "[] True"


def test_broker_serves_external_redis_and_drains_on_stop(
    buildah: Buildah, broker_image: str, tmp_path: Path
) -> None:
    with RedisServer(appendonly=True, appendfsync="always") as redis_server:
        env = _broker_env(TASKBROKER_REDIS_URL=redis_server.url)
        target = _target(env)
        with Container(
            buildah, broker_image, data_dir=_data_dir(tmp_path), log=tmp_path / "b.log", env=env
        ) as broker:
            _wait_serving(broker, target)
            pid = broker.main_pid()
            assert _proc_status_uid(pid) == IMAGE_UID
            assert "ro" in _root_mount_options(pid)

            # The image's own HEALTHCHECK command, run inside the container as Docker runs it.
            healthcheck = broker.config["Healthcheck"]["Test"]
            assert healthcheck[0] == "CMD"
            code, output = broker.exec(healthcheck[1:])
            assert (code, output.strip()) == (0, f"{target}: SERVING"), output

            http = env["TASKBROKER_HTTP_LISTEN"]
            with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as reply:
                assert reply.status == 200
            with urllib.request.urlopen(f"http://{http}/", timeout=10) as reply:
                assert reply.status == 200 and "html" in reply.headers["Content-Type"]

            with SyncClient(target) as client:
                task_id = client.enqueue("emails", "send_email", b'{"to": "a@example.com"}')
                assert client.get_task(task_id).state == TaskState.PENDING
            assert redis_server.client().keys("tb:{emails}:*")  # in the Redis it was given

            assert _stop(broker) == 0
            log = broker.tail(200)
            assert "taskbroker stopped" in log
            assert check(target, timeout_s=1.0)[0] == 1


def test_broker_embeds_redis_with_its_data_in_the_volume(
    buildah: Buildah, broker_image: str, tmp_path: Path
) -> None:
    data = _data_dir(tmp_path)
    env = _broker_env()
    target = _target(env)
    with Container(buildah, broker_image, data_dir=data, log=tmp_path / "1.log", env=env) as first:
        _wait_serving(first, target)
        with SyncClient(target) as client:
            task_id = client.enqueue("emails", "send_email", b"kept")
        assert _stop(first) == 0
        assert "embedded redis-server stopped" in first.tail(200)
    assert (data / "redis.log").exists()
    assert any(path.name.startswith("appendonly") for path in data.iterdir())

    with Container(buildah, broker_image, data_dir=data, log=tmp_path / "2.log", env=env) as second:
        _wait_serving(second, target)
        with SyncClient(target) as client:
            task = client.get_task(task_id)
        assert (task.state, task.payload) == (TaskState.PENDING, b"kept")
        assert _stop(second) == 0


def test_example_worker_image_runs_tasks(
    buildah: Buildah, broker_image: str, worker_image: str, tmp_path: Path
) -> None:
    with RedisServer(appendonly=True, appendfsync="always") as redis_server:
        env = _broker_env(TASKBROKER_REDIS_URL=redis_server.url)
        target = _target(env)
        with Container(
            buildah, broker_image, data_dir=_data_dir(tmp_path), log=tmp_path / "b.log", env=env
        ) as broker:
            _wait_serving(broker, target)
            worker_env = {"TASKBROKER_TARGET": target, "TASKBROKER_DEMO_TIME_SCALE": "0.01"}
            with Container(
                buildah,
                worker_image,
                data_dir=_data_dir(tmp_path, "worker-data"),
                log=tmp_path / "w.log",
                env=worker_env,
            ) as worker:
                assert _proc_status_uid(worker.main_pid()) == IMAGE_UID
                with SyncClient(target) as client:
                    task_id = client.enqueue("emails", "send_email", b"{}")
                    task = client.wait(task_id, timeout=60)
                assert (task.state, task.result) == (TaskState.SUCCEEDED, b"sent"), worker.tail()
                assert _stop(worker) == 0
            assert _stop(broker) == 0


def _secured_data_dir(tmp_path: Path) -> tuple[Path, Path, str]:
    """A /data holding what scripts/dev-secrets.sh makes (TLS pair, CA, policy, tokens), readable
    by the image's user; returns it, the CA on the host, and the admin token."""
    data = _data_dir(tmp_path)
    secrets = data / "secrets"
    subprocess.run(
        [str(REPO / "scripts" / "dev-secrets.sh"), str(secrets)], check=True, capture_output=True
    )
    for path in [secrets, *secrets.iterdir()]:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    return data, secrets / "ca.crt", (secrets / "admin.token").read_text()


def test_broker_image_serves_a_reachable_port_only_with_tls_and_a_token(
    buildah: Buildah, broker_image: str, tmp_path: Path
) -> None:
    data, ca, token = _secured_data_dir(tmp_path)
    port, http_port = free_port(), free_port()
    env = {"TASKBROKER_LISTEN": f"0.0.0.0:{port}", "TASKBROKER_HTTP_LISTEN": f"0.0.0.0:{http_port}"}

    # The image as shipped: a reachable port without TLS or a policy is refused, exit 2.
    with Container(buildah, broker_image, data_dir=data, log=tmp_path / "1.log", env=env) as bare:
        assert bare.wait(30) == 2
        assert "can be reached from other hosts" in bare.tail()

    secured = {
        **env,
        "TASKBROKER_TLS_CERT": "/data/secrets/server.crt",
        "TASKBROKER_TLS_KEY": "/data/secrets/server.key",
        "TASKBROKER_POLICY_FILE": "/data/secrets/policy.toml",
        "TASKBROKER_TLS_CA": "/data/secrets/ca.crt",  # for the image's HEALTHCHECK
    }
    target = f"127.0.0.1:{port}"
    with Container(
        buildah, broker_image, data_dir=data, log=tmp_path / "2.log", env=secured
    ) as broker:
        deadline = time.monotonic() + 60
        while broker.exec(broker.config["Healthcheck"]["Test"][1:])[0] != 0:
            assert broker.running() and time.monotonic() < deadline, broker.tail()
            time.sleep(0.5)
        tls = TlsConfig(ca_file=ca)
        with SyncClient(target, tls=tls, token=token) as client:
            task_id = client.enqueue("emails", "send_email", b"over TLS")
            assert client.get_task(task_id).state == TaskState.PENDING
        with SyncClient(target, tls=tls) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.get_task(task_id)
        assert _stop(broker) == 0
        assert token not in broker.tail(400)
