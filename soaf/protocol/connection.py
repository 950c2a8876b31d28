"""Open redis-py connections the way soaf needs them, for any URL form soaf accepts.

``redis://user:pass@host:port/db``, ``rediss://`` (TLS; CA options as URL query
parameters such as ``ssl_ca_certs``) and ``unix:///path?password=...`` all work because
redis-py parses them; ``redis+sentinel://`` URLs go through Redis Sentinel
(soaf.protocol.sentinel), so the connection follows the master through a failover.
Every read has a socket timeout, so a connection to a host that vanished (no reset ever
comes) fails and is opened again, through Sentinel to the new master: blocking reads get
one longer than any BLOCK soaf sends (redis-py's 5 s default would cut a long BLOCK
short); every other call fails faster.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import hiredis
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from soaf.errors import ConfigError
from soaf.protocol import sentinel

if TYPE_CHECKING:
    import redis.asyncio

#: Seconds a normal (non-blocking) command may take before it counts as a failure.
DEFAULT_SOCKET_TIMEOUT = 10.0
#: The same for blocking reads: longer than the longest BLOCK soaf sends (2 s, a
#: client's XREAD; pub/sub waits use their own timeout), short enough that a read on a
#: connection to a lost host ends.
BLOCKING_SOCKET_TIMEOUT = 10.0


def options(*, blocking: bool, name: str | None, timeout: float | None = None
            ) -> dict[str, Any]:
    """The connection options soaf uses, for the sync and the asyncio client alike;
    ``timeout`` overrides the socket timeout."""
    default = BLOCKING_SOCKET_TIMEOUT if blocking else DEFAULT_SOCKET_TIMEOUT
    return {
        "socket_timeout": timeout or default,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 0 if blocking else 30,
        "client_name": name,
    }


#: redis-py's default retries for seconds; soaf has its own reconnect logic. A retry
#: also drops the connection that failed (after a timeout too), so the next try asks
#: Sentinel for the master again.
RETRY_BACKOFF = {"cap": 0.2, "base": 0.02}
RETRIES = 2


class Packer:
    """redis-py's command packer for hiredis, the same bytes for less CPU: redis-py's own
    turns every argument over in Python first (is it a bytearray or a memoryview?), about
    0.1 µs each, and a state write has a hundred. Here hiredis takes the arguments as
    they are, and only what it refuses is turned over, then packed again (or refused
    as redis-py refuses it)."""

    def pack(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            args = tuple(bytes(arg) if isinstance(arg, (bytearray, memoryview)) else arg
                         for arg in args)
            try:
                return [hiredis.pack_command(args)]
            except TypeError as e:
                raise redis.DataError(e) from e


def connect(url: str, *, blocking: bool = False, name: str | None = None,
            timeout: float | None = None) -> redis.Redis:
    """A redis-py client for ``url``; ``blocking=True`` for connections that BLOCK."""
    opts = {**options(blocking=blocking, name=name, timeout=timeout),
            "retry": Retry(ExponentialBackoff(**RETRY_BACKOFF), RETRIES),
            "command_packer": Packer()}
    if sentinel.is_sentinel(url):
        from redis.sentinel import Sentinel

        found: redis.Redis = _master_for(Sentinel, _following()[0], url, opts)
        return found
    try:
        return redis.Redis.from_url(url, **opts)
    except ValueError as e:
        raise ConfigError(f"cannot use Redis URL: {e}") from e


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``, safe to log."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc and "password=" not in parts.query:
        return url  # nothing to hide; keep the URL exactly as given
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"***@{host}"
    query = "&".join(
        q.split("=", 1)[0] + "=***" if q.split("=", 1)[0].endswith("password") else q
        for q in parts.query.split("&") if q
    )
    # Built by hand: urlunsplit drops the "//" of "unix:///path" when there is no host.
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def connect_async(url: str, *, blocking: bool = False, name: str | None = None,
                  timeout: float | None = None) -> redis.asyncio.Redis:
    """The redis.asyncio flavour of ``connect``, for ``AsyncClient``: the same options."""
    import redis.asyncio
    from redis.asyncio.retry import Retry as AsyncRetry

    opts = {**options(blocking=blocking, name=name, timeout=timeout),
            "retry": AsyncRetry(ExponentialBackoff(**RETRY_BACKOFF), RETRIES)}
    if sentinel.is_sentinel(url):
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        found_async: redis.asyncio.Redis = _master_for(AsyncSentinel, _following()[1], url, opts)
        return found_async
    try:
        return redis.asyncio.Redis.from_url(url, **opts)
    except ValueError as e:
        raise ConfigError(f"cannot use Redis URL: {e}") from e



def _master_for(sentinel_class: Any, connection_class: Any, url: str,
                opts: dict[str, Any]) -> Any:
    """A client (of ``sentinel_class``'s flavour) that always talks to the current master
    of ``url``'s sentinels."""
    spec = sentinel.parse(url)
    master, sentinels = sentinel.connection_kwargs(spec, opts)
    return sentinel_class(spec.sentinels, sentinel_kwargs=sentinels).master_for(
        spec.master, connection_class=connection_class, **master)


@functools.cache
def _following() -> tuple[type, type]:
    """Sentinel connections (sync, asyncio) that ask where the master is on *every*
    reconnect. redis-py's own ask only when the pool hands a connection out: a reconnect
    within one command's retries (after a timeout on a lost host) goes back to the old
    address (redis/redis-py#3874), so the command fails after all its tries even though
    Sentinel already names the new master."""
    from redis.asyncio.sentinel import SentinelManagedConnection as AsyncManaged
    from redis.sentinel import SentinelManagedConnection

    class Following(SentinelManagedConnection):
        def connect_check_health(self, check_health: bool = True,
                                 retry_socket_connect: bool = True) -> None:
            if not self._sock and self.connection_pool.is_master:
                self.host, self.port = self.connection_pool.get_master_address()
            super().connect_check_health(check_health, retry_socket_connect)

    class AsyncFollowing(AsyncManaged):
        async def connect_check_health(self, check_health: bool = True,
                                       retry_socket_connect: bool = True) -> None:
            if not self.is_connected and self.connection_pool.is_master:
                self.host, self.port = await self.connection_pool.get_master_address()
            await super().connect_check_health(check_health, retry_socket_connect)

    return Following, AsyncFollowing
