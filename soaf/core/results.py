"""The result cache in Redis: which succeeded run answers each cache key of a service.

One hash per service (``Keys.cache``): cache key -> JSON ``{"id", "at", "sig"}``, and
the set ``Keys.caches`` of the services that have one. Entries are written only by a
core, when a cacheable run succeeded, and signed with the core's secret (the signed
control values of soaf.protocol.signed, kind ``cache``, target ``<service>/<key>/<id>``):
someone who can write to Redis but lacks the secret cannot make a template be answered
by a run of their choosing. Whatever goes wrong with Redis here, the service simply
runs: the cache is an optimisation, never a reason to fail.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import redis

from soaf.core.cancels import Verifier
from soaf.protocol.keys import Keys
from soaf.protocol.replies import hash_of
from soaf.protocol.signed import sign_control
from soaf.protocol.state import ServiceRecord

log = logging.getLogger(__name__)


class ResultCache:
    """Looks up and records the runs that answer cache keys (soaf.run.cached.ResultStore)."""

    def __init__(self, client: redis.Redis, keys: Keys, secrets: Sequence[str | bytes],
                 verifier: Verifier) -> None:
        self.client, self.keys = client, keys
        self.secret = secrets[0]
        self.verifier = verifier

    def find(self, service: str, key: str) -> ServiceRecord | None:
        """The record of the run recorded for ``key``, if its entry is signed by a core."""
        try:
            raw = self.client.hget(self.keys.cache(service), key)
            entry = json.loads(raw) if raw else None
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                return None
            sid = entry["id"]
            if not self.verifier.ok(entry.get("sig"), "cache", f"{service}/{key}/{sid}",
                                    where="the result cache"):
                return None
            data = hash_of(self.client.hgetall(self.keys.service(sid)))
            if not data:  # the run's record expired (SOAF_RECORD_TTL): the entry is spent
                self.client.hdel(self.keys.cache(service), key)
                return None
        except (redis.RedisError, ValueError) as e:
            log.warning("cannot read the result cache of %s (the service runs): %s", service, e)
            return None
        return ServiceRecord.from_hash(sid, data)

    def remember(self, service: str, key: str, service_id: str) -> None:
        """Make ``service_id`` (succeeded) the answer for ``key``."""
        sig = sign_control("cache", f"{service}/{key}/{service_id}", self.secret)
        entry = json.dumps({"id": service_id, "at": time.time(), "sig": sig})
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self.keys.cache(service), key, entry)
            pipe.sadd(self.keys.caches, service)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("cannot record %s in the result cache: %s", service_id, e)
