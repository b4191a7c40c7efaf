"""Settings come from flags, then TASKBROKER_* variables, then defaults; bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Settings, ignored_variables, load_settings


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
            "TASKBROKER_MAX_TASK_BYTES": "2048",
            "TASKBROKER_DEFAULT_LEASE_S": "12.5",
            "TASKBROKER_DATA_DIR": "/tmp/tb",
        },
    )
    assert settings.redis_url == "redis://10.0.0.1:6380/0" and settings.redis_cluster
    assert settings.max_task_bytes == 2048 and settings.default_lease_s == 12.5
    assert settings.data_dir == Path("/tmp/tb")


def test_flags_override_environment() -> None:
    settings = load_settings(
        ["--listen", "0.0.0.0:6000", "--redis-url", "redis://a:1", "--insecure"],
        environ={"TASKBROKER_LISTEN": "127.0.0.1:7000", "TASKBROKER_REDIS_URL": "redis://b:2"},
    )
    assert (settings.listen, settings.redis_url) == ("0.0.0.0:6000", "redis://a:1")
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 6000)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-task-bytes", "lots"], {}, "--max-task-bytes"),
        ([], {"TASKBROKER_REDIS_CLUSTER": "maybe"}, "TASKBROKER_REDIS_CLUSTER"),
        ([], {"TASKBROKER_DEFAULT_MAX_ATTEMPTS": "0"}, "default_max_attempts"),
        (["--reap-interval-s", "5"], {}, "reap_interval_s"),
        (["--keepalive-time-s", "0"], {}, "keepalive_time_s"),
        ([], {"TASKBROKER_MIN_CLIENT_PING_INTERVAL_S": "-1"}, "min_client_ping_interval_s"),
        (["--max-connection-age-s", "-5"], {}, "max_connection_age_s"),
        (["--max-task-bytes", "0"], {}, "max_task_bytes"),
        (
            ["--redis-url-file", "/run/secrets/redis"],
            {"TASKBROKER_REDIS_URL": "redis://x:1"},
            "redis_url or redis_url_file, not both",
        ),
    ],
)
def test_bad_values_stop_the_broker_with_a_message_naming_them(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv, environ=environ)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_keepalive_and_connection_age_settings_are_read() -> None:
    settings = load_settings(
        ["--min-client-ping-interval-s", "0.5", "--max-connection-age-s", "0"],
        environ={"TASKBROKER_KEEPALIVE_TIME_S": "15", "TASKBROKER_MAX_CONNECTION_AGE_GRACE_S": "5"},
    )
    assert settings.min_client_ping_interval_s == 0.5 and settings.keepalive_time_s == 15
    assert settings.max_connection_age_s == 0 and settings.max_connection_age_grace_s == 5


def test_the_redis_url_comes_from_its_file_and_never_shows_in_the_settings(
    tmp_path: Path,
) -> None:
    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://:hunter2@10.0.0.1:6379/0\n")
    settings = load_settings(["--redis-url-file", str(url_file)], environ={})
    assert settings.read_redis_url() == "redis://:hunter2@10.0.0.1:6379/0"
    inline = load_settings([], environ={"TASKBROKER_REDIS_URL": "redis://:hunter2@h:1/0"})
    assert "hunter2" not in repr(inline) and inline.read_redis_url() == "redis://:hunter2@h:1/0"


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


@pytest.mark.parametrize(
    ("listen", "http_listen"),
    [
        ("0.0.0.0:50051", "127.0.0.1:8080"),
        ("127.0.0.1:50051", "0.0.0.0:8080"),
        ("[::]:50051", ""),
        ("10.1.2.3:50051", ""),
        ("broker.example:50051", ""),
    ],
)
def test_a_reachable_port_needs_tls_and_a_policy_file_or_insecure(
    listen: str, http_listen: str, tmp_path: Path
) -> None:
    base = {"listen": listen, "http_listen": http_listen}
    with pytest.raises(ValueError, match="can be reached from other hosts") as refused:
        Settings(**base)  # type: ignore[arg-type]
    assert "--insecure" in str(refused.value)
    tls = {"tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "k.pem"}
    with pytest.raises(ValueError, match=r"no authentication \(policy_file\)"):
        Settings(**base, **tls)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no TLS \(tls_cert, tls_key\):"):
        Settings(**base, policy_file=tmp_path / "policy.toml")  # type: ignore[arg-type]
    secured = Settings(**base, **tls, policy_file=tmp_path / "p.toml")  # type: ignore[arg-type]
    assert secured.exposed_addresses and secured.tls
    assert Settings(**base, insecure=True).insecure  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]"])
def test_loopback_needs_neither_tls_nor_a_policy(host: str) -> None:
    assert Settings(listen=f"{host}:0", http_listen=f"{host}:0").exposed_addresses == []


def test_tls_files_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set tls_cert and tls_key together"):
        Settings(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert and tls_key"):
        Settings(tls_client_ca=tmp_path / "ca.pem")
    settings = load_settings(
        [],
        environ={
            "TASKBROKER_TLS_CERT": "/run/tls/tls.crt",
            "TASKBROKER_TLS_KEY": "/run/tls/tls.key",
            "TASKBROKER_TLS_CLIENT_CA": "/run/tls/ca.crt",
        },
    )
    assert settings.tls and settings.tls_client_ca == Path("/run/tls/ca.crt")


def test_the_clients_tls_and_token_variables_are_not_reported_as_unknown() -> None:
    environ = {"TASKBROKER_TLS_CA": "/ca.pem", "TASKBROKER_TOKEN": "t", "TASKBROKER_TLSCA": "x"}
    (warning,) = ignored_variables(environ)
    assert warning.startswith("TASKBROKER_TLSCA is not a broker setting")


def test_policy_file_and_reflection_are_read_and_reflection_can_be_turned_off() -> None:
    assert load_settings([], {}).reflection is True
    assert load_settings([], {}).policy_file is None
    settings = load_settings(["--policy-file", "/etc/tb/policy.toml"], {})
    assert settings.policy_file == Path("/etc/tb/policy.toml")
    assert load_settings(["--no-reflection"], {}).reflection is False
    assert load_settings([], {"TASKBROKER_REFLECTION": "0"}).reflection is False
    assert load_settings(["--reflection"], {"TASKBROKER_REFLECTION": "0"}).reflection is True
