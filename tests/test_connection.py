"""Redis URLs: every form soaf accepts parses, and passwords never reach a log line."""

from __future__ import annotations

import pytest

from soaf.errors import ConfigError
from soaf.protocol.connection import connect, redact


@pytest.mark.parametrize("url, shown", [
    ("redis://soaf:pw-123@db.example:6380/2", "redis://soaf:***@db.example:6380/2"),
    ("redis://:pw-123@localhost:6379", "redis://:***@localhost:6379"),
    ("rediss://soaf:pw-123@db.example:6380/0?ssl_ca_certs=/etc/ca.pem",
     "rediss://soaf:***@db.example:6380/0?ssl_ca_certs=/etc/ca.pem"),
    ("unix://soaf:pw-123@/run/redis.sock?db=0", "unix://soaf:***@/run/redis.sock?db=0"),
    ("unix:///run/redis.sock?password=pw-123&db=1", "unix:///run/redis.sock?password=***&db=1"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"),
])
def test_redact_hides_passwords_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "pw-123" not in redact(url)


@pytest.mark.parametrize("url, kwargs", [
    ("redis://soaf:pw@db.example:6380/2", {"username": "soaf", "password": "pw", "port": 6380}),
    ("rediss://:pw@db.example/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
     {"password": "pw", "ssl_ca_certs": "/etc/ca.pem", "ssl_certfile": "/c.pem",
      "ssl_keyfile": "/k.pem"}),
    ("unix://soaf:pw@/run/redis.sock?db=3", {"username": "soaf", "password": "pw",
                                              "path": "/run/redis.sock", "db": 3}),
])
def test_url_forms_reach_redis_py(url: str, kwargs: dict) -> None:
    client = connect(url)  # no connection is made until the first command
    got = client.connection_pool.connection_kwargs
    for key, value in kwargs.items():
        assert got[key] == value, key
    client.close()


def test_unknown_scheme_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        connect("http://soaf:pw-123@localhost:6379")
    assert "pw-123" not in str(info.value)


def test_redact_hides_passwords_and_keeps_unix_paths():
    assert redact("unix:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert redact("unix:///tmp/r.sock?password=s3cret&db=1") == "unix:///tmp/r.sock?password=***&db=1"
    assert redact("unix://:s3cret@/tmp/r.sock") == "unix://:***@/tmp/r.sock"
    assert redact("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("rediss://host:6380") == "rediss://host:6380"


PACKED = [
    ("SET", "key", "value"),
    ("EVALSHA", "f" * 40, 2, "k1", "k2", 0.1, 1e20, -3, 17, "é", b"\x00raw"),
    ("SET", bytearray(b"ba"), memoryview(b"mv")),  # what hiredis refuses at first
    (b"CLIENT SETNAME", "soaf"),  # a command of two words, as redis-py sends some
    ("CLIENT SETNAME", "soaf"),
]


@pytest.mark.parametrize("args", PACKED)
def test_packer_packs_what_redis_py_packs(args: tuple) -> None:
    from redis.connection import HiredisRespSerializer

    from soaf.protocol.connection import Packer

    assert Packer().pack(*args) == HiredisRespSerializer().pack(*args)


@pytest.mark.parametrize("bad", [None, [1], {"a": 1}])
def test_packer_refuses_what_redis_py_refuses(bad: object) -> None:
    import redis

    from soaf.protocol.connection import Packer

    with pytest.raises(redis.DataError):
        Packer().pack("SET", "key", bad)


def test_connections_pack_with_the_packer() -> None:
    from soaf.protocol.connection import Packer

    client = connect("redis://localhost:6379/0")
    connection = client.connection_pool.make_connection()
    assert isinstance(connection._command_packer, Packer)
    client.close()
