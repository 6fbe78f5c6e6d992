"""Settings: defaults < YAML file < GUARDPROXY_* env < flags; errors say which key and from where."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guardproxy.config import ENV_PREFIX, Settings, load_settings, parse_dsn
from guardproxy.protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GUARDPROXY_* variable from the outside world leaks into these tests."""
    for name in Settings.model_fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guardproxy.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings()
    assert (s.listen_host, s.listen_port) == ("127.0.0.1", 6432)
    assert (s.pool_mode, s.auth_mode, s.upstream) == ("transaction", "trust", None)


def test_file_then_env_then_flags_each_key_from_its_highest_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_yaml(
        tmp_path,
        "pool_size: 3\nmax_client_conn: 30\npool_acquire_timeout: 4.5\nlog_level: debug\n",
    )
    monkeypatch.setenv("GUARDPROXY_MAX_CLIENT_CONN", "40")
    monkeypatch.setenv("GUARDPROXY_POOL_ACQUIRE_TIMEOUT", "7")
    s = load_settings(config, {"pool_acquire_timeout": 9.0, "listen_port": None})
    assert s.pool_size == 3  # file only
    assert s.max_client_conn == 40  # env beats file
    assert s.pool_acquire_timeout == 9.0  # flag beats env and file
    assert s.log_level == "debug"  # file only
    assert s.listen_port == 6432  # a flag left unset (None) overrides nothing


def test_env_values_are_validated_and_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDPROXY_POOL_MODE", "session")
    monkeypatch.setenv("GUARDPROXY_AUTH_FILE", "/tmp/agents.auth")
    monkeypatch.setenv("GUARDPROXY_AUTH_MODE", "scram")
    monkeypatch.setenv("GUARDPROXY_LISTEN_PORT", "7000")
    s = load_settings()
    assert (s.pool_mode, s.auth_mode, s.listen_port) == ("session", "scram", 7000)
    assert s.auth_file == Path("/tmp/agents.auth")


def test_empty_env_var_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDPROXY_POOL_SIZE", "")
    assert load_settings().pool_size == 20


def test_bad_value_in_file_names_key_and_file(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "pool_size: many\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    text = str(info.value)
    assert "'pool_size'" in text
    assert f"config file {config}" in text
    assert "integer" in text


def test_bad_value_in_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDPROXY_POOL_MODE", "statement")
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert "'pool_mode'" in text
    assert "env GUARDPROXY_POOL_MODE" in text
    assert "'transaction'" in text and "'session'" in text  # what is expected


def test_bad_flag_names_the_flag_even_when_file_and_env_set_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_yaml(tmp_path, "pool_size: 3\n")
    monkeypatch.setenv("GUARDPROXY_POOL_SIZE", "4")
    with pytest.raises(ConfigError) as info:
        load_settings(config, {"pool_size": 0})
    text = str(info.value)
    assert "'pool_size' (from flag --pool-size)" in text
    assert "greater than or equal to 1" in text
    assert "config file" not in text and "env " not in text


def test_unknown_key_in_file_is_named_and_known_ones_listed(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "pool_sise: 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    text = str(info.value)
    assert "'pool_sise'" in text
    assert f"config file {config}" in text
    assert "pool_size" in text  # the list of known settings


def test_several_errors_are_all_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_yaml(tmp_path, "listen_port: 70000\n")
    monkeypatch.setenv("GUARDPROXY_MAX_MESSAGE_SIZE", "10")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    text = str(info.value)
    assert "'listen_port'" in text and "'max_message_size'" in text
    assert "env GUARDPROXY_MAX_MESSAGE_SIZE" in text


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_file_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    config = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_settings(config)


def test_file_that_is_not_yaml_or_missing(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "pool_size: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read it as YAML") as info:
        load_settings(config)
    assert str(config) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(tmp_path / "missing.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write_yaml(tmp_path, "")).pool_size == 20


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "db.example.com"])
def test_trust_refused_off_loopback(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"listen_host": host})
    text = str(info.value)
    assert "trust" in text and "loopback" in text
    assert host in text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "localhost"])
def test_trust_allowed_on_loopback(host: str) -> None:
    assert load_settings(overrides={"listen_host": host}).auth_mode == "trust"


def test_scram_needs_auth_file_and_then_any_host_is_fine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"auth_mode": "scram"})
    assert "auth_file" in str(info.value)
    s = load_settings(
        overrides={"auth_mode": "scram", "auth_file": tmp_path / "a", "listen_host": "0.0.0.0"}
    )
    assert (s.auth_mode, s.listen_host) == ("scram", "0.0.0.0")


def test_trust_from_file_on_public_host_from_env_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_yaml(tmp_path, "auth_mode: trust\n")
    monkeypatch.setenv("GUARDPROXY_LISTEN_HOST", "0.0.0.0")
    with pytest.raises(ConfigError, match="loopback"):
        load_settings(config)


def test_upstream_dsn_checked() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"upstream": "mysql://u@h/db"})
    assert "upstream" in str(info.value) and "postgresql://" in str(info.value)
    with pytest.raises(ConfigError, match="user name"):
        load_settings(overrides={"upstream": "postgresql://h:5432/db"})
    up = parse_dsn("postgresql://app%40owner:p%3Aw@db.local:5433/my%20db")
    assert (up.user, up.password, up.host, up.port, up.database) == (
        "app@owner",
        "p:w",
        "db.local",
        5433,
        "my db",
    )
    assert parse_dsn("postgres://u@h").database == "u"


def test_cli_reports_the_bad_flag_and_exits_nonzero(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "GUARDPROXY_MAX_CLIENT_CONN": "5"}
    out = subprocess.run(
        [sys.executable, "-m", "guardproxy", "serve", "--pool-size", "0", "--upstream",
         "postgresql://u@127.0.0.1:1/db"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert "'pool_size' (from flag --pool-size)" in out.stderr


def test_every_setting_has_a_serve_flag() -> None:
    """The example config promises it: every key is also a flag of `guardproxy serve`."""
    import inspect

    from guardproxy import cli
    from guardproxy.config import Settings

    flags = set(inspect.signature(cli.serve).parameters)
    assert not sorted(set(Settings.model_fields) - flags)
