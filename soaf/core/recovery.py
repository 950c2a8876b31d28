"""Recovery of work whose core died: resume it on restart, or take it over from a dead node.

Stream entries stay pending in the consumer group until their service's final state is
written, so nothing a core was given is forgotten when it dies. They come back in two
ways:

* **Restart.** A core that starts re-reads the entries still pending under its own node
  name. Where the journal shows that the attempt can be finished on this machine, it is
  (soaf.run.recovered: the program is re-adopted, or collected if it ended meanwhile); otherwise
  whatever is left of it is stopped and the attempt is marked ``lost``.
* **Takeover.** A core that has been connected for a whole heartbeat TTL looks for
  consumers with pending entries whose heartbeat key is gone, and moves their entries to
  itself with one Lua script that checks the heartbeat and claims in the same step: of
  two survivors racing for one dead node, exactly one gets each entry, and a core whose
  heartbeat is alive is never robbed, however long its services run (there is no
  idle-time reclaim). Programs of the dead core that run on this machine are stopped
  (after verifying pid and start time); on another machine they are stopped by that
  node's core when it restarts. The attempt is marked ``lost``.

A ``lost`` attempt is followed by a new attempt, unless the service's retries are used
up: then it ends ``failed`` with the reason (one script writes both, so an attempt never
gets two final states).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from soaf.plugin.loader import Registry
from soaf.process import shim
from soaf.process.identity import ProcIdentity, find_by_marker, started_ago, stop_group
from soaf.protocol.keys import GROUP
from soaf.protocol.scripts import RECLAIM, TAKEOVER_LUA
from soaf.protocol.state import EVENTS_MAXLEN, FINAL_VALUES, ServiceRecord
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.journal import Journal, exit_path, journal_path, load, local_journals, remove_files
from soaf.run.recovered import RecoveredRun
from soaf.run.service_run import Claim, ServiceRun

if TYPE_CHECKING:
    from soaf.core.daemon import Core

log = logging.getLogger(__name__)



def max_attempts(template: ServiceParamTemplate, registry: Registry | None) -> int:
    """1 + the retries of the template (or, if it sets none, of its service)."""
    retries = template.retries
    if not retries and registry is not None:
        try:
            retries = int(getattr(registry.program(template.service), "retries", 0) or 0)
        except Exception:
            retries = 0
    return 1 + max(0, int(retries))


def take_over(client: redis.Redis, heartbeat_key: str, stream: str, dead: str, taker: str,
              count: int) -> list[tuple[str, dict[bytes, bytes] | None]]:
    """Move up to ``count`` entries pending for ``dead`` to ``taker`` if ``dead``'s
    heartbeat is gone; the entries moved (fields None for an entry no longer in the stream)."""
    resp = client.eval(TAKEOVER_LUA, 2, heartbeat_key, stream, GROUP, dead, taker, count)
    out: list[tuple[str, dict[bytes, bytes] | None]] = []
    for item in resp or []:
        if not item:
            continue
        raw_id, flat = item[0], item[1]
        fields = None if flat is None else {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        out.append((raw_id.decode(), fields))
    return out


class Recovery:
    """The recovery duties of one core (restart and takeover)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.node = core.settings.node
        self.taken_over = 0

    # -- restart ----------------------------------------------------------------------------

    def resume_own(self) -> int:
        """Re-take every entry still pending under this node name; returns how many."""
        entries = self._own_entries()
        self._sweep({entry_id for entry_id, _ in entries})
        if entries:
            log.info("re-taking %d entries this node had when its core stopped", len(entries))
        self._accept(entries, self.node, f"its core ({self.node}) stopped")
        return len(entries)

    def _accept(self, entries: list[tuple[str, dict[bytes, bytes] | None]], previous: str,
                reason: str) -> None:
        gone = [entry_id for entry_id, fields in entries if fields is None]
        if gone:  # no longer in the stream (finished and deleted): nothing to do
            self.core.finish_entries(gone)
        present = [(entry_id, fields) for entry_id, fields in entries if fields is not None]
        if present:
            self.core.accept(present, previous=previous, reason=reason)

    def _own_entries(self) -> list[tuple[str, dict[bytes, bytes] | None]]:
        found: list[tuple[str, dict[bytes, bytes] | None]] = []
        start = "0"
        while True:
            resp = self.core.redis.xreadgroup(GROUP, self.node, {self.core.keys.submit: start},
                                              count=100)
            batch = resp[0][1] if resp else []
            if not batch:
                return found
            for raw_id, fields in batch:
                found.append((raw_id.decode(), fields))
            start = batch[-1][0].decode()

    def _sweep(self, pending: set[str]) -> None:
        """Stop programs this node started for runs it no longer owns (taken over by another
        core meanwhile, or already final) and drop their journals."""
        for path, journal in local_journals(self.core.settings.work_root, self.node):
            record = self.record(journal.service_id)
            if (record is not None and not record.final and record.get("entry") in pending
                    and record.attempt == journal.attempt):
                continue  # its entry is recovered below
            self._stop_leftover(journal, why="no longer owned by this node")
            remove_files(path, journal)

    # -- one entry ----------------------------------------------------------------------------

    def record(self, service_id: str) -> ServiceRecord | None:
        data = self.core.redis.hgetall(self.core.keys.service(service_id))
        return ServiceRecord.from_hash(service_id, data) if data else None

    def recover(self, entry_id: str, template: ServiceParamTemplate, registry: Registry,
                previous: str, reason: str) -> None:
        """Finish, re-run or close the service of an entry that ``previous`` had."""
        sid = template.service_id
        record = self.record(sid)
        if (record is None or record.final or record.state == "queued"
                or record.get("entry") != entry_id):
            # Not started, final, or a duplicate: the plain claim knows what to do.
            self.core.claim_and_start([(entry_id, template)], registry)
            return
        root = self.core.settings.work_root
        path = journal_path(root, previous, sid, record.attempt)
        local = load(path)
        shared = Journal.from_dict(record.get("journal"))
        # Nothing journaled for this attempt: it may still have spawned its program just
        # before the crash; the exit file's path, known in advance, finds that one.
        journal = _current(record.attempt, local, shared) or Journal(
            service_id=sid, attempt=record.attempt, node=previous, steps=["prepared"],
            work_dir=record.get("work_dir"),
            exit_file=str(exit_path(root, previous, sid, record.attempt)))
        if previous == self.node or (journal.final is not None and journal.core_gone()):
            # This node's own attempt; or, from a dead core of this machine, an attempt
            # whose after_watch_callback has run and only the final write was lost: the
            # final is written as journaled, never running the callback again.
            run = self._resume(entry_id, template, registry, record, journal)
            if run is not None:
                self.core.launch(run)
                return
        for candidate in (local, shared, journal):
            if candidate is not None:
                self._stop_leftover(candidate, why="its attempt is lost")
        if local is not None:
            remove_files(path, local)
        self._reclaim(entry_id, template, registry, reason, previous)

    def _reclaim(self, entry_id: str, template: ServiceParamTemplate, registry: Registry,
                 reason: str, previous: str) -> None:
        """Record the attempt in progress as lost and start a new one (or end it failed)."""
        core, sid = self.core, template.service_id
        keys = [core.keys.service(sid), core.keys.events(sid), core.keys.services,
                core.keys.cancels]
        args = [sid, template.service, time.time(), self.node, entry_id, core.keys.notify,
                EVENTS_MAXLEN, json.dumps(registry.version), ",".join(FINAL_VALUES),
                max_attempts(template, registry), reason, previous]
        verdict, detail, attempt, seq, attempts = RECLAIM.run(core.redis, keys, args)
        if verdict != b"run":
            log.warning("service %s: attempt lost (%s); %s", sid, reason,
                        "no retries left: failed" if verdict == b"failed"
                        else f"not run: {verdict.decode()} ({detail.decode()})")
            core.finish_entries([entry_id])
            return
        log.warning("service %s: attempt %d was lost (%s); running attempt %d", sid,
                    int(attempt) - 1, reason, int(attempt))
        core.launch(ServiceRun(
            template, Claim(entry_id, int(attempt), int(seq), Claim.parse_attempts(attempts)),
            **core.run_kwargs(registry)))

    def _resume(self, entry_id: str, template: ServiceParamTemplate, registry: Registry,
                record: ServiceRecord, journal: Journal) -> RecoveredRun | None:
        """A run that finishes ``journal``'s attempt here, or None if that cannot be done."""
        kwargs: dict[str, Any] = {}
        if journal.final is None:
            if journal.work_dir is None or not Path(journal.work_dir).is_dir():
                return None  # its callbacks would have nothing to look at
            identity = _identity(journal)
            if identity is not None and identity.alive():
                kwargs["identity"] = identity
            elif journal.exit is not None and "exited" in journal.steps:
                kwargs["returncode"] = journal.exit.get("returncode")
            else:
                # Ended while no core watched it: the shim left its status, or it never
                # ran, or the shim died with it and how it ended is unknown: re-run then.
                code = shim.read_exit(Path(journal.exit_file)) if journal.exit_file else None
                if code is None:
                    return None
                kwargs["returncode"] = code
        earlier = record.get("attempts")
        earlier = [a for a in earlier if isinstance(a, dict)] if isinstance(earlier, list) else []
        return RecoveredRun(template, Claim(entry_id, record.attempt, record.seq, earlier),
                            previous=journal, record=record,
                            **kwargs, **self.core.run_kwargs(registry))

    def _stop_leftover(self, journal: Journal, *, why: str) -> None:
        identity = _identity(journal)
        if identity is None or not identity.alive():
            return
        log.warning("stopping the program of service %s attempt %d (pid %d): %s",
                    journal.service_id, journal.attempt, identity.pid, why)
        stop_group(identity, self.core.settings.kill_grace)

    # -- takeover ----------------------------------------------------------------------------

    def may_take_over(self) -> bool:
        """Only after a whole TTL of good heartbeats: after an outage of Redis (heartbeat
        keys expire meanwhile) every live core has had time to renew its own heartbeat
        before anyone is declared dead."""
        since = self.core.heartbeat.connected_since
        return (since is not None and self.core.writer.connected
                and time.monotonic() - since >= self.core.settings.heartbeat_ttl)

    def take_over_dead(self) -> int:
        """Take over entries of dead nodes, as many as this core has free slots for."""
        if not self.may_take_over() or self.core.loader.current is None:
            return 0  # without plugins this core could not run what it took
        core = self.core
        free = core.settings.max_services - core.running()
        if free <= 0:
            return 0
        moved = 0
        for info in core.redis.xinfo_consumers(core.keys.submit, GROUP):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name == self.node or free <= 0:
                continue
            entries = take_over(core.redis, core.keys.node(name), core.keys.submit, name,
                                self.node, free)
            if not entries:
                continue
            log.warning("node %s is dead (no heartbeat); took over %d of its entries",
                        name, len(entries))
            self._accept(entries, name, f"its core ({name}) died: heartbeat expired")
            moved += len(entries)
            free -= len(entries)
        self.taken_over += moved
        return moved

    def loop(self) -> None:
        """The takeover thread: look for dead nodes every heartbeat interval."""
        core = self.core
        while not core.stopping:
            try:
                self.take_over_dead()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.debug("takeover check failed: %s", e)
            except Exception:
                log.exception("takeover check failed")
            core.wait_stopping(core.settings.heartbeat_interval)


def _current(attempt: int, *journals: Journal | None) -> Journal | None:
    """Of the journals that belong to ``attempt``, the one that got furthest."""
    found = [j for j in journals if j is not None and j.attempt == attempt]
    return max(found, key=lambda j: (j.final is not None, len(j.steps))) if found else None


def _identity(journal: Journal) -> ProcIdentity | None:
    """The journal's program, or (spawned but not yet journaled) the live shim whose
    command line names this attempt's exit file, a path no other process has."""
    if journal.process:
        return journal.identity
    if journal.exit_file and "prepared" in journal.steps:
        found = find_by_marker(journal.exit_file)
        if found:
            journal.shimmed = True
            ago = started_ago(found[0])
            journal.running_at = time.time() - ago if ago is not None else None
            return found[0]
    return None
