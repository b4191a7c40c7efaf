"""Settings come from flags, then TASKBROKER_* variables, then defaults; bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Settings, load_settings


def test_defaults_serve_on_loopback_with_an_embedded_redis() -> None:
    settings = load_settings([], environ={})
    assert settings == Settings()
    assert settings.listen == "127.0.0.1:50051" and settings.redis_url is None


def test_environment_variables_are_read() -> None:
    settings = load_settings(
        [],
        environ={
            "TASKBROKER_REDIS_URL": "redis://10.0.0.1:6380/0",
            "TASKBROKER_REDIS_CLUSTER": "true",
            "TASKBROKER_MAX_PAYLOAD_BYTES": "2048",
            "TASKBROKER_DEFAULT_LEASE_S": "12.5",
            "TASKBROKER_DATA_DIR": "/tmp/tb",
        },
    )
    assert settings.redis_url == "redis://10.0.0.1:6380/0" and settings.redis_cluster
    assert settings.max_payload_bytes == 2048 and settings.default_lease_s == 12.5
    assert settings.data_dir == Path("/tmp/tb")


def test_flags_override_environment() -> None:
    settings = load_settings(
        ["--listen", "0.0.0.0:6000", "--redis-url", "redis://a:1"],
        environ={"TASKBROKER_LISTEN": "127.0.0.1:7000", "TASKBROKER_REDIS_URL": "redis://b:2"},
    )
    assert (settings.listen, settings.redis_url) == ("0.0.0.0:6000", "redis://a:1")
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 6000)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-payload-bytes", "lots"], {}, "--max-payload-bytes"),
        ([], {"TASKBROKER_REDIS_CLUSTER": "maybe"}, "TASKBROKER_REDIS_CLUSTER"),
        ([], {"TASKBROKER_DEFAULT_MAX_ATTEMPTS": "0"}, "default_max_attempts"),
        (["--reap-interval-s", "5"], {}, "reap_interval_s"),
    ],
)
def test_bad_values_stop_the_broker_with_a_message_naming_them(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv, environ=environ)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resource_limits_are_settings_and_are_checked() -> None:
    settings = load_settings(
        ["--max-streams-per-connection", "4"],
        environ={
            "TASKBROKER_MAX_STREAMS_PER_CLIENT": "8",
            "TASKBROKER_MAX_INFLIGHT_REQUEST_BYTES": str(8 * 1024 * 1024),
            "TASKBROKER_MAX_SETTLEMENTS_PER_FRAME": "500",
        },
    )
    assert (settings.max_streams_per_connection, settings.max_streams_per_client) == (4, 8)
    assert settings.max_inflight_request_bytes == 8 * 1024 * 1024
    assert settings.max_settlements_per_frame == 500
    with pytest.raises(ValueError, match="max_streams_per_connection <= max_streams_per_client"):
        Settings(max_streams_per_connection=10, max_streams_per_client=5)
    with pytest.raises(ValueError, match="max_settle_batches_per_stream must be 1 to"):
        Settings(max_settle_batches_per_stream=0)
    with pytest.raises(ValueError, match="max_inflight_request_bytes must be 1 MiB"):
        Settings(max_inflight_request_bytes=1000)
