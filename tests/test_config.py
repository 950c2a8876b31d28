"""Settings for security: where a core's keys and payload limit come from."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from soaf.config import Settings
from soaf.errors import ConfigError
from soaf.protocol.codec import DEFAULT_MAX_PAYLOAD

KEY = "config-test-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path: Path) -> None:
    for name in ("SOAF_SECRET", "SOAF_SECRET_FILE", "SOAF_MAX_PAYLOAD", "SOAF_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOAF_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SOAF_PLUGINS", str(tmp_path))


def test_max_payload_default_env_and_flag(monkeypatch) -> None:
    assert Settings.load().max_payload == DEFAULT_MAX_PAYLOAD == 1024 * 1024
    monkeypatch.setenv("SOAF_MAX_PAYLOAD", "5000")
    assert Settings.load().max_payload == 5000
    assert Settings.load(max_payload=2048).max_payload == 2048  # the flag wins
    with pytest.raises(ConfigError, match="at least 1024 bytes, got 10"):
        Settings.load(max_payload=10)
    monkeypatch.setenv("SOAF_MAX_PAYLOAD", "lots")
    with pytest.raises(ConfigError, match="SOAF_MAX_PAYLOAD must be an integer"):
        Settings.load()


def test_core_keys_come_only_from_explicit_settings(monkeypatch, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "secret").write_text("embedded-key-0123456789abcdef\n")
    assert Settings.load().secrets == []  # a shared-Redis core never borrows it
    monkeypatch.setenv("SOAF_INSECURE", "1")
    assert Settings.load().secrets == [] and Settings.load().insecure
    monkeypatch.setenv("SOAF_SECRET", f"{KEY},old-key-0123456789abcdefgh")
    settings = Settings.load()
    assert settings.secrets == [KEY, "old-key-0123456789abcdefgh"]
    assert KEY not in repr(settings)


def test_secret_file_flag(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    assert Settings.load(secret_file=keys).secrets == [KEY]
    with pytest.raises(ConfigError, match="cannot read secret file"):
        Settings.load(secret_file=tmp_path / "missing")


def test_core_secrets_decides_and_names_keys_by_id(monkeypatch, tmp_path: Path, caplog) -> None:
    from soaf.config import INSECURE_SECRET
    from soaf.core.secrets import core_secrets
    from soaf.protocol.codec import key_id

    caplog.set_level("INFO", logger="soaf.core.secrets")
    with pytest.raises(ConfigError, match="no secret configured for a shared Redis"):
        core_secrets(Settings.load(), "redis://h", embedded=False)
    made = core_secrets(Settings.load(), "unix:///s", embedded=True)
    assert (tmp_path / "state" / "secret").read_text().strip() == made[0]
    assert oct((tmp_path / "state" / "secret").stat().st_mode & 0o777) == "0o600"
    assert core_secrets(Settings.load(insecure=True), "redis://h", embedded=False) == [
        INSECURE_SECRET]
    assert "INSECURE CORE" in caplog.text
    monkeypatch.setenv("SOAF_SECRET", "short")
    assert core_secrets(Settings.load(), "redis://h", embedded=False) == ["short"]
    assert "shorter than 16 characters" in caplog.text
    assert f"accepting payloads signed with key id {key_id('short')}" in caplog.text
    assert "short\n" not in caplog.text and "id short" not in caplog.text


def test_labels_from_env_and_flag(monkeypatch) -> None:
    monkeypatch.delenv("SOAF_LABELS", raising=False)
    assert Settings.load().labels == frozenset()
    monkeypatch.setenv("SOAF_LABELS", "gpu, bigmem")
    assert Settings.load().labels == {"gpu", "bigmem"}
    assert Settings.load(labels="fast").labels == {"fast"}  # the flag wins
    with pytest.raises(ConfigError, match=r"labels \(--labels/SOAF_LABELS\): label 'big mem'"):
        Settings.load(labels="gpu,big mem")
    monkeypatch.setenv("SOAF_HEARTBEAT_TTL", "soon")
    with pytest.raises(ConfigError, match="SOAF_HEARTBEAT_TTL must be a number, got 'soon'"):
        Settings.load()


def test_host_name_asks_the_kernel_once_a_minute_and_the_environment_each_time(monkeypatch):
    from soaf import config

    calls = []
    monkeypatch.setattr(config.socket, "gethostname", lambda: calls.append(1) or "box")
    monkeypatch.setattr(config, "_HOST", [None, 0.0])
    monkeypatch.delenv("SOAF_HOST_ID", raising=False)
    assert [config.host_name() for _ in range(5)] == ["box"] * 5
    assert len(calls) == 1
    monkeypatch.setenv("SOAF_HOST_ID", "other")  # set at run time: seen at once
    assert config.host_name() == "other"
    monkeypatch.setattr(config, "_HOST", ["box", time.monotonic() - 1])  # a minute on
    monkeypatch.delenv("SOAF_HOST_ID")
    assert config.host_name() == "box" and len(calls) == 2
