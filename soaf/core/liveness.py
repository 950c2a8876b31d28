"""Which other cores are dead, as one core can tell from Redis: the judge of takeovers.

A core is dead once its heartbeat key has been missing for a whole TTL, seen by the core
that judges (a key deleted once is renewed by its live core at its next beat). Every look
is made where the judge sees its own heartbeat, in the same script (MISSING_LUA,
TAKEOVER_LUA): a server that lacks it is not the one the judge's beats reach, and there
every live core can look dead. That happens when a failover flaps: Sentinel promotes a
replica, calls it down a second later and promotes another, and the first keeps acting as
a master until Sentinel reaches it; each connection of a core follows whichever master
Sentinel named when it connected, so its heartbeat may go to one server while its takeover
looks at the other, where the other cores' beats are missing too. Without the check, two
live cores would take each other's services over again and again, until the services
failed as "lost too often". A promoted replica that lacks the last writes (the heartbeat
keys among them) is the same case until every core has beaten again. Until its own
heartbeat is back in view, a core judges nobody, and its count of how long others' keys
were missing starts over.
"""

from __future__ import annotations

import logging
import time

import redis

from soaf.core.ratelog import RateLimitedLog
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.replies import Pending, pending
from soaf.protocol.scripts import MISSING_LUA, TAKEOVER_LUA

log = logging.getLogger(__name__)


def missing_heartbeats(client: redis.Redis, keys: Keys, names: list[str], own: str,
                       token: str) -> set[str] | None:
    """The nodes among ``names`` whose heartbeat key is missing, as seen on the server where
    ``own``'s heartbeat holds ``token``; None when it does not (nothing can be judged there)."""
    reply = client.eval(MISSING_LUA, 1 + len(names), keys.node(own),
                        *(keys.node(name) for name in names), token)
    if not isinstance(reply, list):
        return None
    return {name for name, flag in zip(names, reply) if flag == 1}


def take_over(client: redis.Redis, keys: Keys, stream: str, dead: str, taker: str,
              token: str, count: int) -> list[Pending]:
    """Move up to ``count`` entries pending for ``dead`` to ``taker`` if ``dead``'s
    heartbeat is gone and ``taker``'s own heartbeat (holding ``token``) is on the same
    server; the entries moved (fields None for an entry no longer in the stream)."""
    resp = client.eval(TAKEOVER_LUA, 3, keys.node(dead), stream, keys.node(taker), GROUP, dead,
                       taker, count, token)
    # EVAL returns XCLAIM's entries with their fields flat: [id, [k1, v1, k2, v2 ...]].
    return pending([(item[0], None if item[1] is None else dict(zip(item[1][::2], item[1][1::2])))
                    for item in resp or [] if item])


class Liveness:
    """How long this core has seen each other node's heartbeat missing."""

    def __init__(self, client: redis.Redis, keys: Keys, node: str, token: str,
                 ttl: float) -> None:
        self.client = client
        self.keys = keys
        self.node = node
        self.token = token
        self.ttl = ttl
        #: When this core first found each node's heartbeat missing (monotonic).
        self._missing_since: dict[str, float] = {}
        #: The nodes whose heartbeat the last look found.
        self.alive: set[str] = set()
        self._errors = RateLimitedLog(log)

    def dead(self, names: list[str]) -> list[str]:
        """The nodes among ``names`` (other than this one) whose heartbeat has been missing
        for a whole TTL, in the order given."""
        others = [name for name in names if name != self.node]
        if not others:
            return []
        missing = missing_heartbeats(self.client, self.keys, others, self.node, self.token)
        now = time.monotonic()
        if missing is None:
            if self._missing_since:
                self._errors.warning(
                    "own", "the heartbeat of this core (%s) is not where it looks for dead "
                    "cores (a failover that left two masters, or a replica promoted without "
                    "the last writes): judging no core dead until it is", self.node)
            self._missing_since.clear()
            self.alive = set()
            return []
        self.alive = {name for name in others if name not in missing}
        for name in self.alive:
            self._missing_since.pop(name, None)
        return [name for name in others if name in missing
                and now - self._missing_since.setdefault(name, now) >= self.ttl]
