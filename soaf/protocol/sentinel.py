"""Redis Sentinel: the ``redis+sentinel://`` URL, and connections that follow the master.

``redis+sentinel://[[user]:password@]host:port[,host:port...]/master_name[/db]`` names the
sentinels (port 26379 when left out) and the master they watch; ``SOAF_SENTINELS``
(``host:port,host:port``) plus ``SOAF_SENTINEL_MASTER`` (and ``SOAF_SENTINEL_DB``) say the
same without a URL. The password is the master's; ``?sentinel_password=`` is the
sentinels' own, when they require one.

A connection opened for such a URL (soaf.protocol.connection) asks the sentinels where
the master is each time it (re)connects (redis-py's ``SentinelConnectionPool``). After
a failover the old master's connections fail (refused, or READONLY once it is demoted,
which redis-py turns into a connection error); everything soaf does on a lost
connection (the state writer keeps its changes, the intake loop re-reads what it had,
clients retry while they follow) then reaches the new master. Sentinel itself is the
engine: soaf only parses the URL and passes it on. This module imports no redis, so
settings (soaf.config) can read the variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from soaf.errors import ConfigError

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
#: Seconds a question to one sentinel may take before the next sentinel is asked.
SENTINEL_TIMEOUT = 1.0


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL says."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SCHEME


def parse(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL; ConfigError naming what is wrong."""
    example = f"{SCHEME}://host:26379,host2:26379/mymaster[/db]"
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME:
        raise ConfigError(f"not a Sentinel URL: {url.split('://', 1)[0]}://... (want {example})")
    creds, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if creds:
        user, _, secret = creds.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = [_host_port(h, example) for h in hosts.split(",") if h.strip()]
    if not sentinels:
        raise ConfigError(f"a Sentinel URL names no sentinel (want {example})")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigError(f"a Sentinel URL needs the master name as its path, then "
                          f"optionally a db number (want {example})")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ConfigError(f"Sentinel URL: database {path[1]!r} is not a number")
        db = int(path[1])
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ConfigError(f"Sentinel URL: unknown option(s) {', '.join(sorted(unknown))} "
                          "(only sentinel_password)")
    return SentinelURL(sentinels, unquote(path[0]), db, username, password,
                       query.get("sentinel_password", [""])[0] or None)


def _host_port(text: str, example: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = port, str(DEFAULT_SENTINEL_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Sentinel address {text.strip()!r} is not host:port (want {example})")
    return host.strip("[]"), int(port)


def env_redis_url() -> str | None:
    """The Redis URL the environment gives: SOAF_REDIS_URL, or a ``redis+sentinel://`` URL
    built from SOAF_SENTINELS + SOAF_SENTINEL_MASTER (+ SOAF_SENTINEL_DB); None if neither."""
    url = os.environ.get("SOAF_REDIS_URL", "").strip()
    sentinels = os.environ.get("SOAF_SENTINELS", "").strip()
    master = os.environ.get("SOAF_SENTINEL_MASTER", "").strip()
    if not sentinels and not master:
        return url or None
    if url:
        raise ConfigError("set SOAF_REDIS_URL or SOAF_SENTINELS/SOAF_SENTINEL_MASTER, not both")
    if not sentinels or not master:
        raise ConfigError("SOAF_SENTINELS and SOAF_SENTINEL_MASTER go together: set both "
                          "(e.g. SOAF_SENTINELS=h1:26379,h2:26379 SOAF_SENTINEL_MASTER=mymaster)")
    db = os.environ.get("SOAF_SENTINEL_DB", "").strip()
    built = f"{SCHEME}://{sentinels}/{quote(master, safe='')}" + (f"/{db}" if db else "")
    parse(built)  # a bad value fails here, naming the variable's content
    return built


def connection_kwargs(spec: SentinelURL, options: dict[str, Any]
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The master's connection options (``options`` plus the URL's), and the sentinels'."""
    master = {**options, "db": spec.db, "username": spec.username, "password": spec.password}
    sentinel = {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT,
                "password": spec.sentinel_password}
    return master, sentinel
