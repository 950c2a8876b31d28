"""Every Redis key and channel name soaf uses; no other module spells a key.

All names start with a prefix (default ``soaf``) so several deployments, or test runs,
can share one Redis. Keys that belong to one service carry the id in a hash tag
(``{id}``) so that, on Redis Cluster, a service's record and its events share a slot.
See docs/protocol.md for what each key holds.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "soaf"
#: The consumer group every core reads the submit stream through.
GROUP = "cores"
#: The stream entry field that carries the signed template (``soaf.dumps`` output).
PAYLOAD_FIELD = "payload"
#: An optional stream entry field naming the service id in clear, so that a payload
#: that cannot be trusted can still be reported on the submitter's record.
ID_FIELD = "id"
#: The submit-stream field of an entry a core put back into the stream: a signed
#: ``requeue`` of the service id (soaf.protocol.signed), so the entry is judged by the
#: time of the requeue and not by the time its payload was signed.
REQUEUE_FIELD = "requeue"
#: Routing fields in clear beside the signed payload: a core routes on them before it
#: unpickles anything, and refuses the entry if they differ from the verified payload's.
SERVICE_FIELD = "service"
PRIORITY_FIELD = "priority"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def submit(self) -> str:
        """The single submission stream of older versions (and of plain XADDs that name no
        queue): cores forward its entries to their queues (soaf.core.routing)."""
        return f"{self.prefix}:submit"

    def queue(self, service: str, priority: int) -> str:
        """Stream: the submissions of one service at one priority, read by the cores that
        offer the service through the consumer group ``cores``."""
        return f"{self.queue_prefix}{service}:{priority}"

    @property
    def queue_prefix(self) -> str:
        """What every queue's name starts with; the TAKE script adds ``<service>:<priority>``."""
        return f"{self.prefix}:q:"

    @property
    def queues(self) -> str:
        """Set: every queue that ever got an entry, as ``<service>:<priority>``."""
        return f"{self.prefix}:queues"

    @property
    def ready(self) -> str:
        """Set: the queues (``<service>:<priority>``) that may hold entries no core has
        read yet; a core's TAKE looks only there, and drops the queues it finds drained."""
        return f"{self.prefix}:ready"

    @property
    def new_queues(self) -> str:
        """Stream (capped): one entry per queue created, so idle cores, which block only on
        the queues they know, learn of a new one at once."""
        return f"{self.prefix}:queues:new"

    @property
    def offered(self) -> str:
        """Sorted set: service name -> the time until which a live core offers it (the
        latest heartbeat expiry of the cores that offer it)."""
        return f"{self.prefix}:offered"

    def service(self, service_id: str) -> str:
        """Hash: the state record of one service."""
        return f"{self.prefix}:svc:{{{service_id}}}"

    def events(self, service_id: str) -> str:
        """Stream: every state change and field update of one service, for replay (an
        entry's ``data`` is one event or a JSON array of events written together:
        soaf.protocol.state.decode_events)."""
        return f"{self.prefix}:ev:{{{service_id}}}"

    def log(self, service_id: str) -> str:
        """Stream: the newest lines of one service's stdout/stderr, capped (``log_lines``).

        Entry fields: ``s`` the stream (``stdout``, ``stderr``, or ``soaf`` for soaf's own
        notes, e.g. how much of a flood was not copied), ``a`` the attempt, ``l`` the line
        (bytes, no newline). The capped files in the work dir keep the longer tail."""
        return f"{self.prefix}:log:{{{service_id}}}"

    def payload(self, service_id: str) -> str:
        """String: the signed payload the service was submitted with (``soaf.dumps``
        output), written by ``Client.submit`` with the record; it ages with the record,
        so a resubmit (and anything else that needs the template) can read it."""
        return f"{self.prefix}:payload:{{{service_id}}}"

    def aging(self, service_id: str) -> tuple[str, ...]:
        """The keys of one service that expire together once it is final: record,
        events, log lines and payload."""
        return (self.service(service_id), self.events(service_id), self.log(service_id),
                self.payload(service_id))

    @property
    def services(self) -> str:
        """Sorted set: every known service id, scored by its submit time."""
        return f"{self.prefix}:services"

    @property
    def notify(self) -> str:
        """Pub/sub channel: a short JSON note for every write of events, for live followers."""
        return f"{self.prefix}:notify"

    @property
    def control(self) -> str:
        """Stream of control messages to cores (cancel, reload)."""
        return f"{self.prefix}:control"

    @property
    def cancels(self) -> str:
        """Hash: service id -> time of a cancel request; durable until the service ends."""
        return f"{self.prefix}:cancels"

    @property
    def deadletter(self) -> str:
        """Stream: submissions that could not be trusted or decoded (capped)."""
        return f"{self.prefix}:deadletter"

    @property
    def plugins(self) -> str:
        """Hash: the plugin version serving on each node and its last load error."""
        return f"{self.prefix}:plugins"

    def plugin_number(self, node: str) -> str:
        """String: the number of a node's newest plugin version, so numbers keep rising
        across restarts of its core."""
        return f"{self.prefix}:plugins:number:{node}"

    def node(self, name: str) -> str:
        """String with a TTL: a core's heartbeat; gone means the core is dead."""
        return f"{self.prefix}:node:{name}"

    @property
    def nodes(self) -> str:
        """Set: names of every core that ever registered."""
        return f"{self.prefix}:nodes"

    def node_pattern(self) -> str:
        return f"{self.prefix}:node:*"

    def slots(self, service: str) -> str:
        """Sorted set of the ids running a ``max_concurrent`` service, scored by lease end."""
        return f"{self.prefix}:slots:{service}"

    def pipeline(self, name: str) -> str:
        """Hash: the steps of the named pipeline ``name``; step name -> JSON entry with the
        service id it got, its template's digest, service and order (docs/pipelines.md)."""
        return f"{self.prefix}:pipeline:{name}"

    @property
    def pipelines(self) -> str:
        """Sorted set: the names of named pipelines, scored by when a step was last recorded."""
        return f"{self.prefix}:pipelines"

    def cache(self, service: str) -> str:
        """Hash: the result cache of one service; cache key -> JSON ``{id, at, sig}``, the
        succeeded run whose results answer templates with that key (docs/cache.md)."""
        return f"{self.prefix}:cache:{service}"

    @property
    def caches(self) -> str:
        """Set: the names of the services that have a result cache hash."""
        return f"{self.prefix}:caches"
