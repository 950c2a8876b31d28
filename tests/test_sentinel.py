"""Sentinel URLs and variables: every form parses into what redis-py's Sentinel needs, bad
ones fail naming the problem, and passwords never reach a log line."""

from __future__ import annotations

import pytest

from soaf.config import Settings, find_redis_url
from soaf.errors import ConfigError
from soaf.protocol.connection import BLOCKING_SOCKET_TIMEOUT, connect, connect_async, redact
from soaf.protocol.sentinel import SentinelURL, env_redis_url, parse


@pytest.mark.parametrize("url, spec", [
    ("redis+sentinel://h1:26380,h2:26381/mymaster",
     SentinelURL([("h1", 26380), ("h2", 26381)], "mymaster")),
    ("redis+sentinel://h1/mymaster/3", SentinelURL([("h1", 26379)], "mymaster", 3)),
    ("redis+sentinel://soaf:pw@h1:1,[::1]:2/m?sentinel_password=spw",
     SentinelURL([("h1", 1), ("::1", 2)], "m", 0, "soaf", "pw", "spw")),
    ("REDIS+SENTINEL://:pw@h1:1/m%2Fx/0", SentinelURL([("h1", 1)], "m/x", 0, None, "pw")),
])
def test_sentinel_urls_parse(url: str, spec: SentinelURL) -> None:
    got = parse(url)
    assert got == spec
    assert (got.password, got.sentinel_password) == (spec.password, spec.sentinel_password)


@pytest.mark.parametrize("url, problem", [
    ("redis+sentinel:///mymaster", "names no sentinel"),
    ("redis+sentinel://h1:26379", "master name"),
    ("redis+sentinel://h1:26379/m/x", "not a number"),
    ("redis+sentinel://h1:26379/m/1/2", "master name"),
    ("redis+sentinel://h1:port/m", "is not host:port"),
    ("redis+sentinel://h1:99999/m", "is not host:port"),
    ("redis+sentinel://h1/m?db=2", "unknown option(s) db"),
])
def test_bad_sentinel_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="Sentinel") as e:
        connect(url)
    assert problem in str(e.value)


def test_connections_ask_the_sentinels_for_the_master() -> None:
    client = connect("redis+sentinel://:pw@h1:1,h2:2/m/2", blocking=True, name="x")
    pool = client.connection_pool
    assert pool.service_name == "m" and pool.is_master
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs[
        "port"]) for c in pool.sentinel_manager.sentinels] == [("h1", 1), ("h2", 2)]
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"], kwargs["client_name"]) \
        == (2, "pw", BLOCKING_SOCKET_TIMEOUT, "x")
    aio = connect_async("redis+sentinel://h1:1/m")
    assert aio.connection_pool.service_name == "m"


def test_redact_hides_both_passwords() -> None:
    url = "redis+sentinel://soaf:pw-1@h1:1,h2:2/m?sentinel_password=pw-2"
    assert redact(url) == "redis+sentinel://soaf:***@h1:1,h2:2/m?sentinel_password=***"


def test_sentinel_variables_make_the_url(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("SOAF_REDIS_URL", "SOAF_SENTINELS", "SOAF_SENTINEL_MASTER", "SOAF_SENTINEL_DB"):
        monkeypatch.delenv(name, raising=False)
    assert env_redis_url() is None
    monkeypatch.setenv("SOAF_SENTINELS", "h1:26380,h2")
    with pytest.raises(ConfigError, match="go together"):
        env_redis_url()
    monkeypatch.setenv("SOAF_SENTINEL_MASTER", "mymaster")
    monkeypatch.setenv("SOAF_SENTINEL_DB", "4")
    url = "redis+sentinel://h1:26380,h2/mymaster/4"
    assert env_redis_url() == url
    assert find_redis_url(tmp_path) == url  # clients
    assert Settings.load(plugins=tmp_path, secrets=["k" * 20]).redis_url == url  # cores
    monkeypatch.setenv("SOAF_REDIS_URL", "redis://x")
    with pytest.raises(ConfigError, match="not both"):
        env_redis_url()
    monkeypatch.delenv("SOAF_REDIS_URL")
    monkeypatch.setenv("SOAF_SENTINELS", "h1:port")
    with pytest.raises(ConfigError, match="'h1:port' is not host:port"):
        env_redis_url()
