"""Starting runs: claiming stream entries for an attempt.

The intake loop (soaf.core.daemon) and recovery (soaf.core.recovery) both start work here,
so a run is built in exactly one place (``Launcher.start``) from one set of ``Engines``.
Each started run joins the core's ``RunTable`` (soaf.core.runtable). Entries whose
services declare CPUs or memory pass the core's admission (soaf.core.admission) first:
they start, wait in the core, or are refused. Entries of a service with
``max_concurrent`` first take a fleet-wide slot (soaf.protocol.scripts.slots) or park in
the core until one frees; a service without it costs no Redis call here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from soaf.config import Settings
from soaf.core.admission import Admission, Waiting
from soaf.core.cancels import Verifier
from soaf.core.replays import signed_time
from soaf.core.runtable import RunTable
from soaf.plugin.loader import Registry
from soaf.protocol.keys import Keys
from soaf.protocol.queues import finish, split_ref
from soaf.protocol.replies import entries, text
from soaf.protocol.scripts import CLAIM, NOTE, TAKE_SLOT, UNREAD_CANCEL, is_noscript
from soaf.protocol.state import EVENTS_MAXLEN, FINAL_VALUES
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.claim import Claim
from soaf.run.policy import Needs, needs_for
from soaf.run.ports import Engines
from soaf.run.service_run import ServiceRun

log = logging.getLogger(__name__)

#: The CLAIM script's list of final states, and the plugin version as JSON (encoded once
#: per version, not per claim).
_FINALS = ",".join(FINAL_VALUES)
_json_text = functools.lru_cache(maxsize=8)(json.dumps)

#: Seconds between two tries of the entries parked for a fleet slot.
SLOT_RETRY = 0.25


class Launcher:
    """Claims entries for new attempts (the CLAIM script) and starts their runs."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, engines: Engines,
                 runs: RunTable, *, admission: Admission,
                 refuse: Callable[[str, ServiceParamTemplate, str], None],
                 requeue: Callable[[str, dict[bytes, bytes], ServiceParamTemplate], str],
                 verifier: Verifier | None = None) -> None:
        self.client = client
        self.verifier = verifier or Verifier(())
        self.keys = keys
        self.settings = settings
        self.runs = runs
        self.admission = admission
        #: Ends an entry the core can never run: (entry id, template, reason).
        self.refuse = refuse
        #: Puts an entry back at the end of its queue: (entry, its fields, template).
        self.requeue = requeue
        self.engines = dataclasses.replace(engines, on_done=self._done)
        self._slot_lock = threading.Lock()
        self._slots: dict[str, str] = {}  # service id -> slots key, for slots taken here
        self._slot_try_at = self._renew_at = 0.0

    def _done(self, run: ServiceRun) -> None:
        if run.policy.needs is not None:
            self.admission.release(run.claim.entry_id)
        self.release_slot(run.service_id)
        self.runs.done(run)

    # -- fleet slots (max_concurrent) ------------------------------------------------------

    @staticmethod
    def _cap(template: ServiceParamTemplate, registry: Registry) -> int | None:
        cap = getattr(registry.programs.get(template.service), "max_concurrent", None)
        return int(cap) if cap is not None else None

    def _take_slot(self, template: ServiceParamTemplate, cap: int, *, force: bool = False) -> bool:
        """Take (or keep) a slot of ``template``'s service; False when all are taken.
        Only a slot this call took (or forced) is this core's to give back."""
        key, sid, now = self.keys.slots(template.service), template.service_id, time.time()
        got, _count, added = TAKE_SLOT.run(
            self.client, [key], [sid, cap, now, now + self.settings.heartbeat_ttl, int(force)])
        if got and (added or force):
            with self._slot_lock:
                self._slots[sid] = key
        return bool(got)

    def release_slot(self, service_id: str) -> None:
        """Give back the slot this core took for ``service_id`` (if any)."""
        with self._slot_lock:
            key = self._slots.pop(service_id, None)
        if key is not None:
            self._remove_lease(key, service_id)

    def drop_lease(self, template: ServiceParamTemplate) -> None:
        """Remove the slot lease of a service a takeover ended without a run (lost too
        often). Its dead core left the lease behind; an expired lease is dropped only by the
        next TAKE_SLOT of its service name, so until then the slots key would still list a
        service that ended. (No cap check: the plugin that set one may have changed since.)"""
        self._remove_lease(self.keys.slots(template.service), template.service_id)

    def _remove_lease(self, key: str, service_id: str) -> None:
        try:
            self.client.zrem(key, service_id)
        except redis.RedisError as e:  # its lease runs out after the heartbeat TTL
            log.warning("cannot give back the slot of %s (%s)", service_id, e)

    def renew_slots(self) -> None:
        """Extend the leases of the slots this core holds (every heartbeat interval)."""
        now = time.monotonic()
        if now < self._renew_at:
            return
        self._renew_at = now + self.settings.heartbeat_interval
        with self._slot_lock:
            held = dict(self._slots)
        if held:
            until = time.time() + self.settings.heartbeat_ttl
            pipe = self.client.pipeline(transaction=False)
            for sid, key in held.items():
                pipe.zadd(key, {sid: until}, xx=True)
            try:
                pipe.execute()
            except redis.RedisError as e:
                log.warning("cannot renew the leases of %d slots (%s)", len(held), e)

    def _admit_parked(self, registry: Registry | None) -> None:
        """Start the parked entries whose service has a free slot now."""
        now = time.monotonic()
        if now < self._slot_try_at:
            return
        self._slot_try_at = now + SLOT_RETRY
        for waiting in self.admission.parked():
            use = registry if registry is not None and waiting.template.service in \
                registry.programs else waiting.registry
            cap = self._cap(waiting.template, use)
            if cap is not None and not self._take_slot(waiting.template, cap):
                continue
            self.admission.unpark(waiting.entry_id)
            self.client.hdel(self.keys.service(waiting.template.service_id), "waiting_for")
            self.claim_and_start([(waiting.entry_id, waiting.template)], use)

    def start(self, run_type: type[ServiceRun], template: ServiceParamTemplate, claim: Claim,
              registry: Registry, **extra: Any) -> ServiceRun:
        """Build a run (a ServiceRun, or a subclass given ``extra``) and start it."""
        run = run_type(template, claim, registry=registry, engines=self.engines, **extra)
        cap = self._cap(template, registry)
        if cap is not None and template.service_id not in self._slots:
            self._take_slot(template, cap, force=True)  # a run it owns: held past the cap
        if run.policy.needs is not None:
            self.admission.hold(claim.entry_id, run.policy.needs)
        self.runs.add(run)
        run.start()
        return run

    def claim_args(self, entry_id: str, template: ServiceParamTemplate, registry: Registry,
                   cancel: str | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the CLAIM script for one entry (RECLAIM adds to its ARGV);
        ``cancel``: the verified cancels-hash entry (read now when not given), or
        UNREAD_CANCEL for the script to read it."""
        sid = template.service_id
        if cancel is None:
            cancel = self.verifier.cancel_entries(self.client, self.keys, [sid])[0]
        return ([self.keys.service(sid), self.keys.events(sid), self.keys.services,
                 self.keys.cancels],
                [sid, template.service, time.time(), self.settings.node, entry_id,
                 self.keys.notify, EVENTS_MAXLEN, _json_text(registry.version), _FINALS,
                 cancel])

    def claim_and_start(self, accepted: list[tuple[str, ServiceParamTemplate]],
                        registry: Registry) -> None:
        """Start the entries whose services need nothing or fit now; keep those that fit
        later waiting; refuse (or leave for larger cores) those that never fit here."""
        ready: list[tuple[str, ServiceParamTemplate]] = []
        notes: list[tuple[str, str]] = []
        for entry_id, template in accepted:
            try:
                needs = needs_for(template, registry.programs.get(template.service))
            except (TypeError, ValueError) as e:
                self.refuse(entry_id, template, f"service {template.service!r} declares "
                                                f"cpus or memory_mb that are not numbers ({e})")
                continue
            cap = self._cap(template, registry)
            if cap is not None and not self._take_slot(template, cap):
                note = (f"a slot of {template.service!r} (max_concurrent {cap}, all taken "
                        "across the fleet)")
                self.admission.park(Waiting(entry_id, template, registry, Needs()))
                log.info("service %s waits for %s", template.service_id, note)
                notes.append((template.service_id, note))
                continue
            if needs is None or self.admission.try_hold(entry_id, needs):
                ready.append((entry_id, template))
                continue
            self.release_slot(template.service_id)  # not while it waits for CPUs or memory
            why = self.admission.never_fits(needs)
            if why is not None:
                self._too_big(entry_id, template, needs, why)
                continue
            note = self.admission.wait(Waiting(entry_id, template, registry, needs))
            log.info("service %s waits for %s", template.service_id, note)
            notes.append((template.service_id, note))
        if notes:
            pipe = self.client.pipeline(transaction=False)
            for sid, note in notes:
                NOTE.call(pipe, [self.keys.service(sid)], ["waiting_for", note])
            if any(is_noscript(r) for r in pipe.execute(raise_on_error=False)):
                for sid, note in notes:
                    NOTE.run(self.client, [self.keys.service(sid)], ["waiting_for", note])
        if ready:
            self._claim_and_start(ready, registry)

    def admit_waiting(self, registry: Registry | None) -> None:
        """Start the waiting entries that fit now (under ``registry``, the current plugin
        generation, when it still has their service)."""
        self._admit_parked(registry)
        ready = self.admission.take_ready()
        if not ready:
            return
        done = 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for waiting in ready:
                pipe.hdel(self.keys.service(waiting.template.service_id), "waiting_for")
            pipe.execute()
            for waiting in ready:
                use = registry if registry is not None and waiting.template.service in \
                    registry.programs else waiting.registry
                self._claim_and_start([(waiting.entry_id, waiting.template)], use)
                done += 1
        except BaseException:
            for waiting in ready[done:]:  # pending again: the intake re-reads them
                self.admission.release(waiting.entry_id)
            raise

    def _too_big(self, entry_id: str, template: ServiceParamTemplate, needs: Needs,
                 why: str) -> None:
        """An entry that needs more than this core's whole capacity: put back for a live
        core that offers enough, or refused with the largest offer in the fleet."""
        larger, largest = self._fleet_offers(needs)
        if larger:
            stream, bare_id = split_ref(self.keys, entry_id)
            fields = entries(self.client.xrange(stream, bare_id, bare_id))
            if fields and fields[0][1]:
                log.info("service %s %s; left for %s", template.service_id, why,
                         ", ".join(larger))
                self.requeue(entry_id, fields[0][1], template)
                return
        if largest is not None:
            what = f"{needs.cpus:g} CPUs" if needs.cpus > largest[0] else \
                f"{needs.memory_mb:g} MiB"
            offer = largest[0] if needs.cpus > largest[0] else largest[1]
            why = f"needs {what}; the largest core offers {offer:g}"
        self.refuse(entry_id, template, why)

    def _fleet_offers(self, needs: Needs) -> tuple[list[str], tuple[float, float] | None]:
        """Live cores (other than this one) whose capacity fits ``needs``, and the
        largest CPUs and memory any live core offers (None: none says)."""
        names = [text(n) for n in self.client.smembers(self.keys.nodes)]
        larger: list[str] = []
        cpus = memory = 0.0
        values = self.client.mget([self.keys.node(n) for n in names]) if names else []
        for name, value in zip(names, values):
            try:
                info = json.loads(value or b"")
                offer = (float(info["cpus"]), float(info["memory_mb"]))
            except (TypeError, ValueError, KeyError):
                continue  # expired, or a core that does not report its capacity
            cpus, memory = max(cpus, offer[0]), max(memory, offer[1])
            if (name != self.settings.node and needs.cpus <= offer[0]
                    and needs.memory_mb <= offer[1]):
                larger.append(name)
        return larger, (cpus, memory) if cpus or memory else None

    def _claim_and_start(self, accepted: list[tuple[str, ServiceParamTemplate]],
                         registry: Registry) -> None:
        """Claim the entries' services for a new attempt and start them; entries whose
        service is final or claimed under another entry are finished. The cancels hash is
        read first (one HMGET for the batch), except for a lone entry: its claim reads it
        (one round trip less), and only a service with a cancel request costs a second."""
        ids = [template.service_id for _, template in accepted]
        cancels = [UNREAD_CANCEL] if len(ids) == 1 else \
            self.verifier.cancel_entries(self.client, self.keys, ids)
        calls = [self.claim_args(entry_id, template, registry, cancel)
                 for (entry_id, template), cancel in zip(accepted, cancels)]
        now = time.time()
        for (_, template), (_, args) in zip(accepted, calls):
            args.append("1" if self._too_old(template, now) else "0")
        results = self._claim(calls)
        for i, reply in enumerate(results):
            if reply[0] == b"check":  # a cancel request the claim found: verified here
                ok = self.verifier.ok(reply[1], "cancel", ids[i], where="the cancels hash")
                calls[i][1][9] = text(reply[1]) if ok else ""
                results[i] = self._claim([calls[i]])[0]
        unclaimed: list[str] = []
        ended: list[str] = []  # final without running (e.g. cancelled while queued)
        for (entry_id, template), reply in zip(accepted, results):
            if reply[0] == b"expired":
                self.admission.release(entry_id)
                self.refuse(entry_id, template, self._expired_reason(template, now))
                continue
            verdict, detail = reply[0], reply[1]
            if verdict != b"run":
                self.admission.release(entry_id)
                self.release_slot(template.service_id)
                log.info("entry %s for %s not run: %s (%s)", entry_id, template.service_id,
                         verdict.decode(), detail.decode())
                unclaimed.append(entry_id)
                if verdict in (b"final", b"cancelled"):
                    ended.append(template.service_id)
                continue
            self.start(ServiceRun, template, Claim.from_reply(entry_id, reply), registry)
        if unclaimed:
            self.finish_entries(unclaimed, ended=ended)

    def _max_age(self) -> float:
        age = self.settings.max_payload_age
        return self.settings.record_ttl if age is None else age

    def _too_old(self, template: ServiceParamTemplate, now: float) -> bool:
        """Signed longer than the max payload age ago (0: no limit), or with no time at
        all (a payload of an older client: honest ones wait with their record)."""
        signed_at = signed_time(template)
        return self._max_age() > 0 and (signed_at is None or now - signed_at > self._max_age())

    def _expired_reason(self, template: ServiceParamTemplate, now: float) -> str:
        signed_at = signed_time(template)
        when = "with no signing time" if signed_at is None else f"{now - signed_at:.0f} s ago"
        return (f"payload signed {when} (max payload age {self._max_age():g} s) and "
                f"no record of {template.service_id} exists: refused as a replay; submit it again")

    def _claim(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run the CLAIM script for each call in one round trip; a claim that met an empty
        script cache never ran, so only those are sent again, with the script loaded."""
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            CLAIM.call(pipe, keys, args)
        results = pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if is_noscript(result):
                results[i] = CLAIM.run(self.client, *calls[i])
            elif isinstance(result, Exception):
                raise result
        return results

    def finish_entries(self, entry_ids: list[str], *, ended: list[str] | None = None) -> None:
        """Acknowledge and delete entries that need no (more) work; the records of the
        services in ``ended`` (final without running) start to age."""
        pipe = self.client.pipeline(transaction=False)
        ttl = int(self.settings.record_ttl)
        for sid in (ended or []) if ttl > 0 else []:
            for key in self.keys.aging(sid):
                pipe.expire(key, ttl)  # the record starts to age (before its entry is gone)
        finish(pipe, self.keys, entry_ids)
        pipe.execute()
