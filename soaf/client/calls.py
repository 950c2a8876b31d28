"""What ``Client`` and ``AsyncClient`` say to Redis and make of its answers, without I/O.

Both clients are thin shells that send what these functions build and hand the replies
back to them: where a client connects and with which key names (``Target``), the KEYS
and ARGV of each script call, what a reply means (a duplicate submission, a cancel
verdict in words, an unknown id), the paging and filters of ``list``, the parsing of
``nodes`` and ``plugins``, and how long a reading call keeps trying while Redis is down
(``Patience``). Whatever is decided here is decided once, so the two clients cannot
drift apart; the shells only differ in ``await``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from soaf.client.payload import signing_secret
from soaf.config import find_redis_url, find_secrets, state_dir_from_env
from soaf.errors import (
    ClientError,
    ConfigError,
    DuplicateService,
    NoCoreOffers,
    RedisUnavailable,
    StateError,
    UnknownService,
    ValidationError,
)
from soaf.protocol import durable
from soaf.protocol.codec import DEFAULT_MAX_PAYLOAD, check_loadable, dumps, loads
from soaf.protocol.connection import redact
from soaf.protocol.keys import DEFAULT_PREFIX, GROUP, Keys
from soaf.protocol.queues import member, parse_member
from soaf.protocol.scripts import Script
from soaf.protocol.signed import sign_control
from soaf.protocol.state import EVENTS_MAXLEN, FINAL_VALUES, ServiceRecord, decode_events
from soaf.protocol.template import ServiceParamTemplate, new_service_id, validate_template

#: Seconds a reading call keeps retrying while Redis cannot be reached.
DEFAULT_RECONNECT_FOR = 30.0
#: Control messages kept in the control stream (approximate).
CONTROL_MAXLEN = 10_000
#: Records asked for per round trip by ``list``.
LIST_PAGE = 200
#: Longest pause between two tries while Redis is unreachable, in seconds.
_PAUSE_MAX = 2.0

Reply = tuple[list[str], list[Any]]


# -- where a client connects ----------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """The Redis URL, key names, state dir and payload limit a client uses."""

    url: str
    keys: Keys
    state_dir: Path
    max_payload: int


def target(url: str | None, *, prefix: str | None, state_dir: str | Path | None,
           max_payload: int | None) -> Target:
    """Found like a core finds them: arguments, else SOAF_REDIS_URL / SOAF_PREFIX /
    SOAF_STATE_DIR / SOAF_MAX_PAYLOAD, else the embedded core's state dir (``.soaf/``).

    ConfigError when no Redis URL is found or SOAF_MAX_PAYLOAD is not a number. The
    secret is looked up only when a template is signed (see ``submit_call``)."""
    state = Path(state_dir) if state_dir is not None else state_dir_from_env()
    found = url or find_redis_url(state)
    if not found and (state / "redis").is_dir():  # an embedded core's data, no core
        raise ConfigError(
            f"no core is running on the embedded Redis in {state} (its data is in "
            f"{state / 'redis'}): start one (python start_core.py); the soaf read commands "
            "(soaf ls, soaf status ID, soaf logs ID) open its history without a core")
    if not found:
        raise ConfigError(
            "no Redis to talk to: set SOAF_REDIS_URL (or pass --redis / url=), or run "
            f"next to a core with an embedded Redis (looked for {state / 'redis.url'})"
        )
    if max_payload is None:
        env_max = os.environ.get("SOAF_MAX_PAYLOAD", "").strip()
        try:
            max_payload = int(env_max) if env_max else DEFAULT_MAX_PAYLOAD
        except ValueError:
            raise ConfigError(f"SOAF_MAX_PAYLOAD must be an integer, got {env_max!r}") from None
    keys = Keys(prefix or os.environ.get("SOAF_PREFIX") or DEFAULT_PREFIX)
    return Target(found, keys, state, max_payload)


def unreachable(url: str, e: Exception) -> StateError:
    """The soaf error for a redis-py error: RedisUnavailable for connection trouble."""
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return RedisUnavailable(f"cannot reach Redis at {redact(url)}: {e}")
    return StateError(f"Redis at {redact(url)} refused a command: {e}")


@dataclass
class Patience:
    """How long one reading call rides out an unreachable Redis.

    After each failure, ``pause`` says how long to wait before the next try (0.1 s,
    doubling up to 2 s), or raises the failure once ``reconnect_for`` seconds have
    passed since the first one, or the call's own ``deadline`` (a clock value) is near.
    """

    reconnect_for: float
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic
    _since: float | None = field(default=None, init=False)
    _pause: float = field(default=0.1, init=False)

    def pause(self, failure: RedisUnavailable) -> float:
        now = self.clock()
        if self._since is None:
            self._since = now
        left = self.reconnect_for - (now - self._since)
        if self.deadline is not None:
            left = min(left, self.deadline - now)
        if left <= 0:
            raise failure
        pause, self._pause = min(self._pause, left), min(self._pause * 2, _PAUSE_MAX)
        return pause


# -- submitting ------------------------------------------------------------------------------

def submit_call(target: Target, template: ServiceParamTemplate, secret: str | None,
                require_core: bool = False) -> Reply:
    """Check, sign and check again what a core would refuse (ValidationError naming a
    bad field, or ``payload`` when over the size limit; UnsafePayload naming a global
    the core will not load); KEYS and ARGV of the SUBMIT script that queues it in its
    service's queue, the routing fields in clear beside the signed payload."""
    validate_template(template)
    payload = dumps(template, signing_secret(secret, target.state_dir))
    if len(payload) > target.max_payload:
        raise ValidationError("payload", f"the template pickles to {len(payload)} bytes, over "
                                         f"the limit of {target.max_payload} (SOAF_MAX_PAYLOAD)")
    check_loadable(payload)
    sid, keys = template.service_id, target.keys
    service, priority = template.service, template.priority
    return ([keys.service(sid), keys.events(sid), keys.services, keys.queue(service, priority),
             keys.queues, keys.offered, keys.ready, keys.new_queues, keys.payload(sid)],
            [sid, service, time.time(), payload, keys.notify, EVENTS_MAXLEN, priority,
             member(service, priority), int(require_core), GROUP])


def queue_durable(pipe: Any, script: Script, keys: list[str], args: list[Any],
                  replicas: int) -> None:
    """Queue ``script`` and a WAIT for ``replicas`` on one pipeline (one connection: WAIT
    counts the replicas holding what its own connection wrote). After a duplicate, which
    writes nothing, WAIT still waits for everything the master had, the original too."""
    pipe.eval(script.text, len(keys), *keys, *args)
    pipe.wait(replicas, durable.WAIT_MS)


def durably_submitted(template: ServiceParamTemplate, results: list[Any], replicas: int) -> str:
    """``submitted`` for a durable submit: NotReplicated unless ``replicas`` confirmed it;
    then DuplicateService means the first try is on the master and its replicas."""
    durable.confirmed(int(results[1]), replicas, f"the submission of {template.service_id}")
    return submitted(template, results[0])


def submitted(template: ServiceParamTemplate, reply: Any) -> str:
    """The service id, from the SUBMIT script's reply; DuplicateService if it existed,
    NoCoreOffers if a core was required and none offers the service."""
    service_id = template.service_id
    created, detail = reply
    if created == 2:
        raise NoCoreOffers(f"no live core offers {template.service!r}: nothing was queued "
                           "(see `soaf services`; submit without require_core=True to queue "
                           "it until a core that offers it starts)")
    if not created:
        state = detail.decode(errors="replace").strip('"')
        raise DuplicateService(f"service id {service_id!r} was already submitted "
                               f"(state {state})")
    return service_id


def resubmitted(target: Target, service_id: str, payload: bytes | None,
                secret: str | None) -> ServiceParamTemplate:
    """The template ``service_id`` was submitted with (its payload, kept beside the
    record), as a copy under a new id, ready for ``submit``. The payload is verified and
    unpickled like a core does (SignatureError, UnsafePayload); ClientError when none is
    kept (the service came by a plain XADD, or its record expired)."""
    if payload is None:
        raise ClientError(f"no payload is kept for {service_id!r} (submitted by a plain XADD, "
                          "or its record expired): submit the template again")
    secrets = [secret] if secret is not None else find_secrets(target.state_dir)
    template = loads(payload, secrets, max_size=max(target.max_payload, len(payload)))
    if not isinstance(template, ServiceParamTemplate):
        raise ClientError(f"the payload kept for {service_id!r} is not a template")
    fresh = copy.copy(template)
    fresh.service_id, fresh.signed_at = new_service_id(), None
    return fresh


# -- reading ---------------------------------------------------------------------------------

def unknown(service_id: str) -> UnknownService:
    return UnknownService(f"no service with id {service_id!r}")


def record_from(service_id: str, data: dict[bytes, bytes]) -> ServiceRecord | None:
    """The record in an HGETALL reply; None for an empty one (no such service)."""
    return ServiceRecord.from_hash(service_id, data) if data else None


def events_from(service_id: str, record: ServiceRecord | None,
                entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The events of an XRANGE reply, each with its ``event_id`` (the events of one
    write share their entry's); UnknownService when there is neither an event nor a
    record."""
    if not entries and record is None:
        raise unknown(service_id)
    return [{**event, "event_id": raw_id.decode()}
            for raw_id, data in entries for event in decode_events(data)]


@dataclass
class ListQuery:
    """The pages ``list`` reads (newest first) and the records it keeps.

    A shell asks ``page()`` for the next ZREVRANGEBYSCORE arguments (None once done),
    reads those ids' records and hands both to ``feed``; ``found`` is the answer."""

    state: str | None = None
    service: str | None = None
    node: str | None = None
    since: float | None = None
    limit: int = 100
    found: list[ServiceRecord] = field(default_factory=list)
    _start: int = field(default=0, init=False)
    _done: bool = field(default=False, init=False)

    def page(self) -> tuple[str | float, int, int] | None:
        """``(min score, start, count)`` of the next page, or None when there is no more."""
        if self._done or len(self.found) >= self.limit:
            return None
        return ("-inf" if self.since is None else self.since), self._start, LIST_PAGE

    def feed(self, ids: list[bytes], hashes: list[dict[bytes, bytes]]) -> None:
        if not ids:
            self._done = True
            return
        self._start += len(ids)
        for raw, data in zip(ids, hashes):
            record = record_from(raw.decode(), data)
            if record is not None and self.matches(record):
                self.found.append(record)
                if len(self.found) >= self.limit:
                    return

    def matches(self, record: ServiceRecord) -> bool:
        return ((self.state is None or record.state == self.state)
                and (self.service is None or record.service == self.service)
                and (self.node is None or record.node == self.node))


def _object(raw: bytes | None) -> dict[str, Any] | None:
    """A JSON object from Redis; None for anything else (Redis is not trusted)."""
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def plugins_from(data: dict[bytes, bytes]) -> dict[str, Any]:
    """``plugins()``: the plugins hash, by node name (entries that are not JSON objects
    are left out)."""
    found = {k.decode(errors="replace"): _object(v) for k, v in data.items()}
    return {k: v for k, v in found.items() if v is not None}


def node_names(members: Iterable[bytes]) -> list[str]:
    """The names in the nodes set, sorted."""
    return sorted(n.decode() for n in members)


def nodes_from(values: list[bytes | None]) -> list[dict[str, Any]]:
    """``nodes()``: the heartbeats still alive (an expired one reads as None; one that is
    not a JSON object is left out)."""
    return [node for node in map(_object, values) if node is not None]


def queues_from(members: Iterable[bytes]) -> list[tuple[str, int]]:
    """``(service, priority)`` of every queue in the ``Keys.queues`` set, sorted."""
    return sorted(q for m in members if (q := parse_member(m.decode(errors="replace"))))


def count_queues(pipe: Any, keys: Keys, queues: list[tuple[str, int]]) -> None:
    """Queue on ``pipe`` what ``services_from`` reads: per queue its length and the
    entries delivered to cores and not finished yet."""
    for service, priority in queues:
        pipe.xlen(keys.queue(service, priority))
        pipe.xpending(keys.queue(service, priority), GROUP)


def services_from(nodes: list[dict[str, Any]], queues: list[tuple[str, int]],
                  counts: list[Any]) -> list[dict[str, Any]]:
    """``services()``: per service name, the live cores that offer it, how many entries
    wait in its queues (``queued``, and ``by_priority``) and how many cores hold
    (``taken``: running, or waiting in a core for CPUs, memory or a slot)."""
    found: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return found.setdefault(name, {"service": name, "cores": [], "queued": 0, "taken": 0,
                                       "by_priority": {}})

    for node in nodes:
        for name in node.get("services") or []:
            entry(str(name))["cores"].append(node.get("node"))
    for (service, priority), length, held in zip(queues, counts[::2], counts[1::2]):
        length = length if isinstance(length, int) else 0
        taken = held.get("pending", 0) if isinstance(held, dict) else 0
        row = entry(service)
        row["taken"] += taken
        if length - taken > 0:
            row["queued"] += length - taken
            row["by_priority"][str(priority)] = length - taken
    return [found[name] for name in sorted(found)]


# -- steering --------------------------------------------------------------------------------

def cancel_call(target: Target, service_id: str, secret: str | None) -> Reply:
    """KEYS and ARGV of the CANCEL script (see soaf/protocol/scripts/records.py), signed."""
    keys, now = target.keys, time.time()
    sig = sign_control("cancel", service_id, signing_secret(secret, target.state_dir), now=now)
    return ([keys.service(service_id), keys.events(service_id), keys.cancels, keys.control],
            [service_id, now, keys.notify, EVENTS_MAXLEN, ",".join(FINAL_VALUES),
             CONTROL_MAXLEN, sig])


def cancelled(service_id: str, reply: Any) -> str:
    """What the CANCEL script did, in words; UnknownService for an unknown id."""
    verdict, state = (v.decode() if isinstance(v, bytes) else str(v) for v in reply)
    if verdict == "unknown":
        raise unknown(service_id)
    if verdict == "final":
        return f"already {state}; nothing to cancel"
    if verdict == "cancelled":
        return "cancelled (it was queued and never started)"
    return f"cancel requested; it was {state} and will end cancelled"


def reload_call(target: Target, node: str | None, secret: str | None
                ) -> tuple[str, dict[str, str], int]:
    """XADD arguments (stream, fields, maxlen) asking cores (all, or ``node``) to reload."""
    sig = sign_control("reload", node or "", signing_secret(secret, target.state_dir))
    fields = {"type": "reload", **({"node": node} if node else {}), "sig": sig}
    return target.keys.control, fields, CONTROL_MAXLEN
