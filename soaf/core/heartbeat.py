"""Whether a core is alive: its heartbeat key and thread, and the guard that keeps two
cores from running under one node name.

A core's heartbeat is a key with a TTL holding who it is: host, pid, the pid's start
time, the boot id and a random token. Only the core whose token is in the key refreshes
it (a Lua compare-and-set), so a second core under the same name can never keep the
first one's heartbeat alive. A core that finds its key missing writes it again (and
warns); one that finds another token there stops only if that token's core is alive
(see ``Heartbeat._other_token``), so a forged token written into Redis stops no core.

At start a core claims its node name:

* no heartbeat: it is free;
* a heartbeat from this machine and boot: the process it names is checked in /proc (pid
  *and* start time) and must hold a core's mark (soaf.process.coremark). A live core:
  the core refuses to start (``NodeInUse``). Dead (killed with ``kill -9``), or a live
  process that is no core (a forged heartbeat): the name is taken over at once, without
  waiting for the TTL;
* a heartbeat from another machine (or boot), which cannot be checked: the core waits
  for it to expire, and refuses if it is refreshed meanwhile.

The heartbeat thread also brings each running service's cancel request (believed only if
signed, see soaf.core.cancels) and current attempt back from Redis: a run whose service
has a newer attempt was taken over by another core (this one missed its heartbeats, e.g.
cut off from Redis or frozen) and is stopped without writing anything more.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from soaf.config import Settings, host_name
from soaf.core.cancels import Verifier
from soaf.core.ratelog import RateLimitedLog
from soaf.errors import NodeInUse
from soaf.process.coremark import is_core, mark_core
from soaf.process.identity import ProcIdentity, boot_id
from soaf.protocol.connection import DEFAULT_SOCKET_TIMEOUT, connect
from soaf.protocol.keys import Keys
from soaf.protocol.scripts import CAS_LUA, REFRESH_LUA, RELEASE_LUA
from soaf.run.service_run import ServiceRun

log = logging.getLogger(__name__)



class Identity:
    """Who this core process is, as written into its heartbeat."""

    def __init__(self) -> None:
        me = ProcIdentity.of(os.getpid())
        self.pid = os.getpid()
        self.host = host_name()
        self.boot_id = boot_id()
        self.pid_start = me.start_time if me else 0
        self.token = secrets.token_hex(8)
        #: Held for the life of the core: what tells a live core of this host from any
        #: other process a forged heartbeat may name (soaf.process.coremark).
        self.mark = mark_core()

    def fields(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "boot_id": self.boot_id,
                "pid_start": self.pid_start, "token": self.token}


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def holder_alive(info: dict[str, Any]) -> bool | None:
    """Whether the core a heartbeat names is alive: True/False when this machine can tell
    (same host and boot: its pid and start time, and the mark only a core holds), None
    when it cannot."""
    if not info.get("boot_id") or info.get("host") != host_name() or info["boot_id"] != boot_id():
        return None
    try:
        holder = ProcIdentity(pid=int(info["pid"]), start_time=int(info["pid_start"]), pgid=0,
                              host=info["host"], boot_id=info["boot_id"])
    except (KeyError, TypeError, ValueError):
        return None
    return holder.alive() and is_core(holder.pid, holder.start_time) is not False


def attempt_of(raw: Any) -> int | None:
    """A record's ``attempt`` as read from Redis; None when it is absent or not a number
    (a tampered record: the record script ends that service, see soaf.protocol.scripts)."""
    if isinstance(raw, bytes) and raw.isdigit() and len(raw) <= 15:
        return int(raw)
    return None


def describe(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"


def claim_node(client: redis.Redis, key: str, node: str, value: str, ttl: float,
               *, clock: Any = time.monotonic, sleep: Any = time.sleep) -> None:
    """Write this core's first heartbeat, or raise NodeInUse if ``node`` is taken."""
    ttl_ms = int(ttl * 1000)
    waited_for: bytes | None = None
    deadline: float | None = None
    while True:
        got = client.get(key)
        raw = got.encode() if isinstance(got, str) else got
        if raw is None:
            if client.eval(CAS_LUA, 1, key, value, "", ttl_ms):
                return
            continue
        info = _parse(raw) or {}
        alive = holder_alive(info)
        if alive is True:
            raise NodeInUse(f"node name {node!r} is in use by a running core ({describe(info)}); "
                            "give this core another --node name or stop that one")
        if alive is False:
            log.info("node %s: the previous core (%s) is dead; taking its name over now",
                     node, describe(info))
            if client.eval(CAS_LUA, 1, key, value, raw, ttl_ms):
                return
            continue
        # Another machine (or boot): cannot look at the process; wait for the key to expire.
        if waited_for is None:
            waited_for, deadline = raw, clock() + ttl + 1.0
            log.warning("node %s has a live heartbeat from %s; waiting up to %.0f s for it "
                        "to expire", node, describe(info), ttl)
        elif raw != waited_for:
            raise NodeInUse(f"node name {node!r} is in use by a core that keeps its heartbeat "
                            f"alive ({describe(info)}); give this core another --node name")
        assert deadline is not None
        if clock() > deadline:
            raise NodeInUse(f"the heartbeat of node {node!r} ({describe(info)}) did not expire")
        sleep(0.2)


def refresh(client: redis.Redis | Any, key: str, value: str, token: str, ttl: float) -> Any:
    """Queue (on a pipeline) or run the token-checked heartbeat refresh."""
    return client.eval(REFRESH_LUA, 1, key, value, token, int(ttl * 1000))


def beats_connection(url: str | None, settings: Settings) -> redis.Redis:
    """The heartbeat's own connection (also for the plugin report it publishes after each
    beat), whose calls fail well within a TTL: a beat stuck on a lost host gives way in
    time to one through the new master."""
    assert url is not None, "connect first"
    timeout = min(DEFAULT_SOCKET_TIMEOUT, max(0.5, settings.heartbeat_ttl / 4))
    return connect(url, name=f"soaf-core-{settings.node}-heartbeat", timeout=timeout)


class Heartbeat:
    """The heartbeat thread of one core (``loop``) and what it learns on each beat."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, identity: Identity,
                 *, info: Callable[[], dict[str, Any]], runs: Callable[[], list[ServiceRun]],
                 cancel: Callable[[str], bool], on_replaced: Callable[[], None],
                 after_beat: Callable[[], None], stopping: threading.Event,
                 revive: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 verifier: Verifier | None = None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.identity = identity
        self.info = info
        self.runs = runs
        self.cancel = cancel
        self.on_replaced = on_replaced
        self.after_beat = after_beat
        self.stopping = stopping
        self.revive = revive
        #: Monotonic time since which beats have succeeded without a failure (None: the
        #: last one failed). Takeovers wait until this has lasted a whole TTL.
        self.connected_since: float | None = None
        #: Another core holds this node's heartbeat now; this one no longer renews it.
        self.replaced = False
        #: Monotonic time at which the last successful beat was sent (see still_current).
        self.last_ok: float | None = None
        self._errors = RateLimitedLog(log)
        self.clock = clock
        self.verifier = verifier or Verifier(())
        #: Another host's heartbeat value found in this node's key, and since when.
        self._watched: tuple[bytes, float] | None = None

    def loop(self) -> None:
        """Beat every heartbeat interval until the core stops and its runs have ended."""
        while not self.stopping.is_set() or self.runs():
            try:
                sent = time.monotonic()
                self.beat()
                self.last_ok = sent
                if self.connected_since is None:
                    self.connected_since = sent
            except redis.RedisError as e:
                self.connected_since = self.last_ok = None
                log.debug("heartbeat failed: %s", e)
                if self.revive is not None:
                    try:
                        self.revive()
                    except Exception:
                        log.exception("cannot restart the embedded Redis")
            except Exception:  # whatever Redis holds, the heartbeat must go on
                self._errors.exception("beat", "heartbeat: a beat failed")
            self.stopping.wait(self.settings.heartbeat_interval)

    def beat(self) -> None:
        s, keys = self.settings, self.keys
        runs = self.runs()
        pipe = self.client.pipeline(transaction=False)
        if not self.replaced:
            refresh(pipe, keys.node(s.node), json.dumps(self.info()), self.identity.token,
                    s.heartbeat_ttl)
        pipe.sadd(keys.nodes, s.node)
        if s.record_ttl > 0:  # ids whose records have expired
            pipe.zremrangebyscore(keys.services, "-inf", time.time() - s.record_ttl)
        ids = [run.service_id for run in runs]
        if ids:
            pipe.hmget(keys.cancels, ids)
        for run in runs:
            pipe.hget(keys.service(run.service_id), "attempt")
        results = pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                raise result
        if isinstance(results[0], Exception) and not self.replaced:
            raise results[0]
        self.after_beat()
        if not self.replaced:
            self._check_own_key(results[0])
        if not runs:
            return
        attempts = results[len(results) - len(runs):]
        cancels = results[len(results) - len(runs) - 1]
        if not isinstance(cancels, list):  # the cancels hash is not a hash
            self._errors.warning("cancels", "the cancels hash cannot be read: %s", cancels)
            cancels = [None] * len(runs)
        for run, cancel, attempt in zip(runs, cancels, attempts):
            number = attempt_of(attempt)
            if number is not None and number > run.attempt:
                run.supersede(number)
            elif cancel is not None and self.verifier.ok(cancel, "cancel", run.service_id,
                                                         where="the cancels hash"):
                self.cancel(run.service_id)

    def steady_since(self) -> float | None:
        """``connected_since``, but None while the last good beat is older than half the
        TTL: a core whose own beats hang (its connection went to a master that vanished,
        while others already reach the new one) must not judge other cores dead."""
        last = self.last_ok
        if last is None or time.monotonic() - last >= self.settings.heartbeat_ttl / 2:
            return None
        return self.connected_since

    def still_current(self, run: ServiceRun) -> bool:
        """False if a newer attempt of the run's service exists.

        Answered without Redis while the last beat is younger than half the TTL: that
        beat renewed the heartbeat key (so no core can have found it missing since) and
        checked every run's attempt (so none was taken over before). Otherwise Redis is
        asked; when it cannot be, True: see docs/delivery.md (partitions).
        """
        last = self.last_ok
        if last is not None and time.monotonic() - last < self.settings.heartbeat_ttl / 2:
            return not run.superseded
        try:
            number = attempt_of(self.client.hget(self.keys.service(run.service_id), "attempt"))
        except redis.RedisError:
            return True
        if number is not None and number > run.attempt:
            run.supersede(number)
            return False
        return True

    def _check_own_key(self, refreshed: Any) -> None:
        """Act on what the refresh found in this core's heartbeat key.

        Missing (expired while this core was frozen or cut off, or deleted): it has been
        written again; say so. Another token: stop only if that token's core is really
        alive (see ``_other_token``), otherwise write this core's heartbeat back.
        """
        if refreshed == 2:
            self._watched = None
            self._errors.warning("missing", "the heartbeat key of node %s was missing; "
                                 "written again", self.settings.node)
        elif refreshed == 0:
            self._other_token()
        else:
            self._watched = None

    def _other_token(self) -> None:
        """The key holds another token. It is a real core under this node name when this
        machine sees its process alive (pid and start time), or, for a core this machine
        cannot look at, when its value keeps changing (its beats keep coming) within a TTL.
        A token of a dead process, or a value that stays still for a whole TTL, is a stale
        or forged heartbeat: this core writes its own back and goes on."""
        key = self.keys.node(self.settings.node)
        got = self.client.get(key)
        raw = got.encode() if isinstance(got, str) else got
        if raw is None:
            return  # gone since: the next beat writes it
        info = _parse(raw) or {}
        alive = holder_alive(info)
        now = self.clock()
        if alive is None:
            if self._watched is None or self._watched[0] != raw:
                if self._watched is not None:
                    alive = True  # its value changed: its beats keep coming
                else:
                    self._watched = (raw, now)
                    log.warning("the heartbeat of node %s holds another token (%s); watching "
                                "it for %.0f s", self.settings.node, describe(info),
                                self.settings.heartbeat_ttl)
                    return
            elif now - self._watched[1] <= self.settings.heartbeat_ttl:
                return
        if alive:
            self._taken(info)
            return
        self._watched = None
        self._errors.warning("forged", "the heartbeat of node %s held a token of a core that "
                             "is not alive (%s): stale or forged; written back",
                             self.settings.node, describe(info))
        self.client.eval(CAS_LUA, 1, key, json.dumps(self.info()), raw,
                         int(self.settings.heartbeat_ttl * 1000))

    def _taken(self, info: dict[str, Any]) -> None:
        """Another live core holds this node's heartbeat: it started under the same name
        after this core's heartbeat had expired. Take no more work and stop."""
        self.replaced = True
        log.error("another core (%s) has taken node name %s over (this core's heartbeat had "
                  "expired); stopping", describe(info), self.settings.node)
        self.on_replaced()

    def release(self) -> None:
        """Delete the heartbeat key at a clean stop, if it is still this core's."""
        if self.replaced:
            return
        try:
            self.client.eval(RELEASE_LUA, 1, self.keys.node(self.settings.node),
                             self.identity.token)
        except redis.RedisError:
            pass
