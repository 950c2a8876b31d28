"""What a core reads: the queues of the services it offers, best first (docs/protocol.md).

A core *offers* a service when its current plugin generation has it and the core's
labels cover the service's ``requires``. It reads only those services' queues, so no core
ever sees (let alone refuses) work it cannot run, and what it reads follows its plugins:
the queues are chosen again from the current generation at every take. The TAKE script
(soaf.protocol.scripts.queues) delivers exactly as many entries as the core has room for,
highest (aged) priority first, whatever the number of queues; with nothing to take, the
core blocks on those queues (and on the announcements of new queues) with one XREAD
until one grows.

Every heartbeat the core also writes, in one ZADD, that it offers its services until its
heartbeat would expire (``Keys.offered``): a client learns there, in its SUBMIT script,
whether any live core offers what it submits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from soaf.plugin.loader import Registry
from soaf.plugin.program import ServiceProgramTemplate
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.queues import PRIORITY_AGING, parse_member, ref
from soaf.protocol.replies import Entry, Pending, pending, stream_batch, text
from soaf.protocol.scripts import TAKE

log = logging.getLogger(__name__)

#: Entries read per stream and call when a core collects what it still holds.
PAGE = 100
#: Seconds after which a core looks at every queue it offers again, busy or idle (a safety
#: net for entries that were not marked ready, e.g. pushed by a plain XADD).
FULL_SCAN = 2.0


def requirements(program: type[ServiceProgramTemplate]) -> frozenset[str] | None:
    """The labels ``program`` requires; None when its ``requires`` is not a set of names
    (such a service is offered by no core, and the core says so in its log)."""
    value: object = getattr(program, "requires", frozenset())
    if isinstance(value, str) or not isinstance(value, (set, frozenset, list, tuple)):
        return None
    return frozenset(value) if all(isinstance(v, str) for v in value) else None


def covers(program: type[ServiceProgramTemplate], labels: frozenset[str]) -> bool:
    needed = requirements(program)
    return needed is not None and needed <= labels


def offered(registry: Registry | None, labels: frozenset[str]) -> list[str]:
    """The services a core with ``labels`` offers under ``registry`` (none without one)."""
    if registry is None:
        return []
    return sorted(name for name, program in registry.programs.items() if covers(program, labels))


def entry_ref(keys: Keys, stream: str, entry_id: str) -> str:
    """The reference of an entry read from ``stream``; a bare id for the old submit
    stream, as older versions recorded it (soaf.protocol.queues)."""
    return entry_id if stream == keys.submit else ref(stream, entry_id)


def queue_service(keys: Keys, stream: str) -> str | None:
    """The service whose queue ``stream`` is; None for any other stream."""
    if not stream.startswith(keys.queue_prefix):
        return None
    parsed = parse_member(stream[len(keys.queue_prefix):])
    return parsed[0] if parsed is not None else None


def streams(client: redis.Redis, keys: Keys, services: Iterable[str] | None = None) -> list[str]:
    """The old submit stream and every queue (of ``services`` only, if given)."""
    wanted = None if services is None else set(services)
    found = [keys.submit]
    try:
        members = client.smembers(keys.queues)
    except redis.ResponseError:  # not a set: someone wrote over it; queues list it again
        members = set()
    for raw in sorted(members):
        parsed = parse_member(text(raw))
        if parsed is not None and (wanted is None or parsed[0] in wanted):
            found.append(keys.queue(*parsed))
    return found


def holders(client: redis.Redis, stream_names: list[str]) -> dict[str, dict[str, int]]:
    """Per stream, the consumers that hold unacknowledged entries and how many (one
    XPENDING summary per stream, in one round trip). Missing streams count as empty."""
    pipe = client.pipeline(transaction=False)
    for name in stream_names:
        pipe.xpending(name, GROUP)
    found: dict[str, dict[str, int]] = {}
    for name, reply in zip(stream_names, pipe.execute(raise_on_error=False)):
        if isinstance(reply, Exception) or not isinstance(reply, dict):
            continue  # no such stream or group: nothing is pending there
        found[name] = {text(c["name"]): int(c["pending"]) for c in reply.get("consumers") or []}
    return found


def own_pending(client: redis.Redis, keys: Keys, consumer: str,
                stream_names: list[str] | None = None) -> list[Pending]:
    """Every entry delivered to ``consumer`` and not acknowledged yet, as references
    (fields None for one no longer in its stream): what a core had when it stopped or
    lost its connection."""
    names = stream_names if stream_names is not None else streams(client, keys)
    todo = {name: "0" for name, held in holders(client, names).items() if held.get(consumer)}
    found: list[Pending] = []
    while todo:
        pipe = client.pipeline(transaction=False)
        order = list(todo)
        for name in order:
            pipe.xreadgroup(GROUP, consumer, {name: todo[name]}, count=PAGE)
        more: dict[str, str] = {}
        for name, reply in zip(order, pipe.execute()):
            batch = pending(stream_batch(reply))
            found.extend((entry_ref(keys, name, entry_id), fields) for entry_id, fields in batch)
            if len(batch) == PAGE:
                more[name] = batch[-1][0]
        todo = more
    return found


class Router:
    """Takes work for one core from the queues of the services it offers."""

    def __init__(self, client: redis.Redis, blocking: redis.Redis, keys: Keys, *, node: str,
                 labels: frozenset[str], registry: Callable[[], Registry | None],
                 ttl: float, stopping: threading.Event) -> None:
        self.client = client
        self.blocking = blocking
        self.keys = keys
        self.node = node
        self.labels = labels
        self.registry = registry
        self.ttl = ttl
        self.stopping = stopping
        self._unusable: set[str] = set()  # services whose ``requires`` was logged as bad
        #: Where to wait for work (stream -> id after which its next entry would come), for
        #: the services in ``_watch_for``; None when it may be wrong (a scan makes it again).
        #: ``_quiet``: every queue this core reads was drained by its last take, so the next
        #: one blocks on ``_watch`` at once (XREAD returns at once if one grew meanwhile).
        self._watch: dict[str, str] | None = None
        self._watch_for: list[str] = []
        self._quiet = False
        self._scan_at = 0.0

    def offered(self) -> list[str]:
        registry = self.registry()
        if registry is not None:
            for name, program in registry.programs.items():
                if requirements(program) is None and name not in self._unusable:
                    self._unusable.add(name)
                    log.error("service %r declares requires = %r, not a set of label names: "
                              "no core takes it until that is fixed", name,
                              getattr(program, "requires", None))
        return offered(registry, self.labels)

    def publish_offers(self) -> None:
        """Write that this core offers its services until its heartbeat would expire (a
        core that drains offers nothing: its offers run out)."""
        services = [] if self.stopping.is_set() else self.offered()
        if services:
            until = time.time() + self.ttl
            self.client.zadd(self.keys.offered, dict.fromkeys(services, until), gt=True)

    def take(self, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` entries (as references) delivered to this core, best first;
        with none, wait up to ``block_ms`` for one of its queues to grow and try again.

        A take looks only at the ready queues. A scan of every queue it offers says where
        to wait (``_watch``), and the core keeps that list right itself: a take moves each
        queue it took from past its last entry. So once a take got less than it asked for
        (all there was), the core blocks on the list without asking Redis anything else;
        a wake on a stream it then takes nothing from (the new-queue bell, the old submit
        stream, an entry another core took, a plain XADD) makes the next take a scan, and
        so does a change of its offers or ``FULL_SCAN`` seconds."""
        services = self.offered()
        if services != self._watch_for or time.monotonic() >= self._scan_at:
            self._watch = None
        if self._watch is None:
            taken, moved, watch = self._take(count, services, scan=True)
            self._watch, self._watch_for = dict(watch), services
            self._scan_at = time.monotonic() + FULL_SCAN
            self._quiet = self._follow(moved, set()) and len(taken) < count
            if taken:
                return taken
        elif not self._quiet:
            taken, moved, _ = self._take(count, services, scan=False)
            self._quiet = self._follow(moved, set()) and len(taken) < count
            if taken:
                return taken
        if block_ms <= 0 or self._watch is None:
            return []
        streams: dict[Any, Any] = self._watch
        grown: Any = self.blocking.xread(streams, count=1, block=block_ms)
        if not grown:
            return []
        taken, moved, _ = self._take(count, services, scan=False)
        self._quiet = self._follow(moved, {text(item[0]) for item in grown}) \
            and len(taken) < count
        return taken

    def _follow(self, moved: dict[str, str], grown: set[str]) -> bool:
        """Move the watched streams past the entries just taken (``moved``: stream -> last
        id taken); False (and no list: the next take scans) when the list may be wrong:
        a stream that ``grown`` names was not taken from, or one taken from is not on it."""
        if self._watch is None or not grown <= moved.keys() <= self._watch.keys():
            self._watch = None
            return False
        self._watch.update(moved)
        return True

    def _take(self, count: int, services: list[str], *, scan: bool
              ) -> tuple[list[Entry], dict[str, str], list[tuple[str, str]]]:
        """The entries taken, the last id taken per stream, and (with ``scan``) where to
        wait."""
        args = [GROUP, self.node, count, int(time.time() * 1000), int(PRIORITY_AGING * 1000),
                self.keys.queue_prefix, int(scan), *services]
        taken, watch = TAKE.run(self.client, [self.keys.queues, self.keys.submit, self.keys.ready,
                                              self.keys.new_queues], args)
        entries: list[Entry] = []
        moved: dict[str, str] = {}
        for raw_stream, raw_id, flat in taken:
            stream, entry_id = text(raw_stream), text(raw_id)
            entries.append((entry_ref(self.keys, stream, entry_id),
                            dict(zip(flat[::2], flat[1::2]))))
            moved[stream] = entry_id
        return entries, moved, [(text(stream), text(last)) for stream, last in watch]
