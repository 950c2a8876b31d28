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
  idle-time reclaim). It looks only in the queues of the services it offers (and the old
  submit stream), so it takes over only what it can run. The attempt is marked ``lost``
  (a newer attempt fences the old one), and only then are the dead core's programs that
  run on this machine stopped (after verifying pid and start time): a core taken for dead
  that was alive writes the end of a program stopped so, and that write must meet the
  newer attempt. On another machine they are stopped by that node's core when it
  restarts.

A ``lost`` attempt is followed by a new attempt, unless the service's attempts are used
up (soaf.run.policy, the same rule as for retries): then it ends ``failed`` with the
reason (one script writes both, so an attempt never gets two final states).

Recovery never sees the core: it decodes entries through the gate (soaf.core.intake) and
starts runs through the launcher (soaf.core.launcher), like the intake loop does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from soaf.config import Settings
from soaf.core.intake import Gate
from soaf.core.launcher import Launcher
from soaf.core.liveness import Liveness, take_over
from soaf.core.ratelog import RateLimitedLog
from soaf.core.routing import entry_ref, holders, own_pending, queue_service, streams
from soaf.core.runtable import RunTable
from soaf.plugin.loader import Registry
from soaf.process import shim
from soaf.process.identity import ProcIdentity, started_ago, stop_group, verified
from soaf.protocol.keys import Keys
from soaf.protocol.replies import Entry, Pending, hash_of, text
from soaf.protocol.scripts import RECLAIM
from soaf.protocol.state import ServiceRecord, State
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.claim import Claim
from soaf.run.journal import Journal, exit_path, journal_path, load, local_journals, remove_files
from soaf.run.policy import policy_for
from soaf.run.recovered import RecoveredRun
from soaf.run.service_run import ServiceRun

log = logging.getLogger(__name__)


def lost_budget(template: ServiceParamTemplate, registry: Registry | None) -> int:
    """Attempts that may be lost before the service fails (soaf.run.policy, as for any
    run); lost attempts never use up retries."""
    program = None
    if registry is not None:
        try:
            program = registry.program(template.service)
        except Exception:  # the service left the plugins: the template's values alone
            program = None
    return policy_for(template, program).max_lost


class Recovery:
    """The recovery duties of one core (restart and takeover)."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, *,
                 launcher: Launcher, gate: Gate, runs: RunTable,
                 connected_since: Callable[[], float | None], connected: Callable[[], bool],
                 registry: Callable[[], Registry | None], stopping: threading.Event,
                 offered: Callable[[], list[str]], token: str) -> None:
        """``token``: the one in this core's heartbeat (soaf.core.liveness: it judges
        others dead only where it sees its own heartbeat)."""
        self.client = client
        self.keys = keys
        self.settings = settings
        self.launcher = launcher
        self.gate = gate
        self.runs = runs
        self.connected_since = connected_since
        self.connected = connected
        self.registry = registry
        self.stopping = stopping
        #: The services this core offers now (soaf.core.routing).
        self.offered = offered
        self.node = settings.node
        self.taken_over = 0
        self._errors = RateLimitedLog(log)
        self.liveness = Liveness(client, keys, self.node, token, settings.heartbeat_ttl)
        #: Dead nodes found holding nothing: nothing more can be delivered to them until
        #: their heartbeat is back, so their queues are not searched again.
        self._emptied: set[str] = set()
        self._emptied_for: list[str] = []

    # -- restart ----------------------------------------------------------------------------

    def resume_own(self) -> int:
        """Re-take every entry still pending under this node name; returns how many."""
        entries = own_pending(self.client, self.keys, self.node)
        # Runs of services it no longer offers are stopped; their entries go back to
        # their queues (through the gate) for a core that offers them.
        offered = set(self.offered())
        self._sweep({entry_id for entry_id, _ in entries
                     if queue_service(self.keys, entry_id.rpartition("/")[0]) in offered
                     or "/" not in entry_id})
        if entries:
            log.info("re-taking %d entries this node had when its core stopped", len(entries))
        self._accept(entries, self.node, f"its core ({self.node}) stopped")
        return len(entries)

    def _accept(self, entries: list[Pending], previous: str,
                reason: str) -> None:
        gone = [entry_id for entry_id, fields in entries if fields is None]
        if gone:  # no longer in the stream (finished and deleted): nothing to do
            self.launcher.finish_entries(gone)
        present: list[Entry] = [(e, fields) for e, fields in entries if fields is not None]
        if present:
            accepted, registry = self.gate.decode(present, fresh=False)
            if accepted:
                assert registry is not None
                self.recover_all(accepted, registry, previous, reason)

    def recover_all(self, accepted: list[tuple[str, ServiceParamTemplate]], registry: Registry,
                    previous: str, reason: str) -> None:
        """Go on with decoded entries that ``previous`` had (see ``recover``)."""
        for entry_id, template in accepted:
            self.recover(entry_id, template, registry, previous, reason)

    def _sweep(self, pending: set[str]) -> None:
        """Stop programs this node started for runs it no longer owns (taken over by another
        core meanwhile, or already final) and drop their journals."""
        for path, journal in local_journals(self.settings.work_root, self.node):
            record = self.record(journal.service_id)
            if (record is not None and not record.final and record.get("entry") in pending
                    and record.attempt == journal.attempt):
                continue  # its entry is recovered below
            self._stop_leftover(journal, why="no longer owned by this node")
            remove_files(path, journal)

    # -- one entry ----------------------------------------------------------------------------

    def record(self, service_id: str) -> ServiceRecord | None:
        data = hash_of(self.client.hgetall(self.keys.service(service_id)))
        return ServiceRecord.from_hash(service_id, data) if data else None

    def recover(self, entry_id: str, template: ServiceParamTemplate, registry: Registry,
                previous: str, reason: str) -> None:
        """Finish, re-run or close the service of an entry that ``previous`` had."""
        sid = template.service_id
        record = self.record(sid)
        if (record is None or record.final or record.state == "queued"
                or record.get("entry") != entry_id):
            # Not started, final, or a duplicate: the plain claim knows what to do.
            self.launcher.claim_and_start([(entry_id, template)], registry)
            return
        root = self.settings.work_root
        path = journal_path(root, previous, sid, record.attempt)
        local = load(path)
        # Nothing journaled on this disk for this attempt: it may still have spawned its
        # program just before the crash; the exit file's path, known in advance and under
        # this work root, finds that one.
        guess = Journal(service_id=sid, attempt=record.attempt, node=previous,
                        steps=["prepared"], work_dir=record.get("work_dir"),
                        exit_file=str(exit_path(root, previous, sid, record.attempt)))
        if previous == self.node:
            # This node's own attempt, after a restart. The copy in Redis tells the steps
            # and how the program ended, never which process it is.
            shared = Journal.from_record(record.get("journal"),
                                         exit_file=exit_path(root, previous, sid, record.attempt))
            if shared is not None:
                shared.service_id = sid
            journal = _current(record.attempt, local, shared) or guess
            if journal.work_dir is None and local is not None:  # Redis's copy has none
                journal.work_dir = local.work_dir
            candidates = [local, shared, journal]
            mine = True
        else:
            # Another node's attempt: finished here only on proof found on this machine,
            # its journal on this disk naming a core of this host that is verifiably dead
            # (a survivor adopts what it left running). What Redis says is not enough.
            journal = local if local is not None and local.attempt == record.attempt else guess
            candidates = [local, guess]
            mine = local is not None and local.core_gone()
        if mine and self._resume(entry_id, template, registry, record, journal, path):
            return
        # Fence first, then stop: the attempt's core may be alive after all (its heartbeat
        # did not reach Redis for a TTL), and it writes the end of the program stopped here
        # at once. Written after the reclaim, that end meets the newer attempt and is
        # refused; written before it, it would end the service "killed by SIGTERM".
        claim = self._reclaim(entry_id, template, registry, reason, previous)
        for candidate in candidates:
            if candidate is not None:
                self._stop_leftover(candidate, why="its attempt is lost")
        if local is not None:
            remove_files(path, local)
        if claim is not None:
            self.launcher.start(ServiceRun, template, claim, registry)

    def _reclaim(self, entry_id: str, template: ServiceParamTemplate, registry: Registry,
                 reason: str, previous: str) -> Claim | None:
        """Record the attempt in progress as lost; the new attempt's claim, or None when
        the service is not run again (final, lost too often, a duplicate)."""
        sid = template.service_id
        keys, args = self.launcher.claim_args(entry_id, template, registry)
        args += [lost_budget(template, registry), reason, previous]
        reply = RECLAIM.run(self.client, keys, args)
        verdict, detail = reply[0], reply[1]
        if verdict != b"run":
            log.warning("service %s: attempt lost (%s); %s", sid, reason,
                        "lost too often: failed" if verdict == b"failed"
                        else f"not run: {verdict.decode()} ({detail.decode()})")
            self.launcher.finish_entries([entry_id])
            if verdict == b"failed":  # (any other verdict: a live core may hold the lease)
                self.launcher.drop_lease(template)
            return None
        claim = Claim.from_reply(entry_id, reply)
        log.warning("service %s: attempt %d was lost (%s); running attempt %d", sid,
                    claim.attempt - 1, reason, claim.attempt)
        return claim

    def _resume(self, entry_id: str, template: ServiceParamTemplate, registry: Registry,
                record: ServiceRecord, journal: Journal, path: Path) -> bool:
        """Start a run that finishes ``journal``'s attempt here (``path``: where its node
        keeps that journal on this disk); False if that cannot be done."""
        kwargs: dict[str, Any] = {}
        on_disk = load(path)  # the plugin call under way is only ever believed from disk
        if on_disk is not None and on_disk.attempt == journal.attempt:
            journal.in_call, journal.died_in = on_disk.in_call, list(on_disk.died_in)
        if journal.final is None and journal.in_call is not None:
            # The core died inside this plugin call: twice in a row, and it is not called
            # a third time (a callback that kills the core would kill every restart).
            journal.died_in = [*journal.died_in[-1:], journal.in_call]
            journal.in_call = None
            if journal.died_in == [journal.died_in[0]] * 2:
                self._stop_leftover(journal, why="its core died twice in a plugin call")
                journal.final = died_twice(journal, record, self.node)
        if journal.final is None:
            if journal.work_dir is None or not _inside(self.settings.work_root,
                                                       journal.work_dir):
                return False  # its callbacks would have nothing (of ours) to look at
            identity = _identity(journal)
            if identity is not None and identity.alive():
                kwargs["identity"] = identity
            elif journal.exit is not None and "exited" in journal.steps:
                kwargs["returncode"] = journal.exit.get("returncode")
            else:
                # Ended while no core watched it: the shim left its status, or it never
                # ran, or the shim died with it and how it ended is unknown: re-run then.
                code = shim.read_exit(Path(journal.exit_file), wait=2) if journal.exit_file else None
                if code is None:
                    return False
                kwargs["returncode"] = code
        earlier = record.get("attempts")
        earlier = [a for a in earlier if isinstance(a, dict)] if isinstance(earlier, list) else []
        self.launcher.start(RecoveredRun, template,
                            Claim(entry_id, record.attempt, record.seq, earlier), registry,
                            previous=journal, previous_path=path, record=record, **kwargs)
        return True

    def _stop_leftover(self, journal: Journal, *, why: str) -> None:
        identity = _identity(journal)
        if identity is None or not identity.alive():
            return
        log.warning("stopping the program of service %s attempt %d (pid %d): %s",
                    journal.service_id, journal.attempt, identity.pid, why)
        stop_group(identity, self.settings.kill_grace)

    # -- takeover ----------------------------------------------------------------------------

    def may_take_over(self) -> bool:
        """Only after a whole TTL of good heartbeats: after an outage of Redis (heartbeat
        keys expire meanwhile) every live core has had time to renew its own heartbeat
        before anyone is declared dead."""
        since = self.connected_since()
        return (since is not None and self.connected()
                and time.monotonic() - since >= self.settings.heartbeat_ttl)

    def take_over_dead(self) -> int:
        """Take over entries of dead nodes, as many as this core has free slots for."""
        if not self.may_take_over() or self.registry() is None:
            return 0  # without plugins this core could not run what it took
        free = self.settings.max_services - len(self.runs)
        if free <= 0:
            return 0
        offered = self.offered()
        if offered != self._emptied_for:  # queues it did not search before
            self._emptied, self._emptied_for = set(), offered
        # Cores register their names; consumers of the old submit stream may predate that.
        names = sorted({text(n) for n in self.client.smembers(self.keys.nodes)}
                       | set(holders(self.client, [self.keys.submit]).get(self.keys.submit, {})))
        dead = self.liveness.dead(names)
        self._emptied -= self.liveness.alive  # their heartbeat is back: search them again
        dead = [name for name in dead if name not in self._emptied]
        if not dead:
            return 0
        held = holders(self.client, streams(self.client, self.keys, offered))
        moved = 0
        for name in dead:
            found = [stream for stream, counts in held.items() if counts.get(name)]
            if not found:
                self._emptied.add(name)
            for stream in found:
                if free <= 0:
                    break
                entries = take_over(self.client, self.keys, stream, name, self.node,
                                    self.liveness.token, free)
                if not entries:
                    continue
                log.warning("node %s is dead (no heartbeat); took over %d of its entries",
                            name, len(entries))
                self._accept([(entry_ref(self.keys, stream, entry_id), fields)
                              for entry_id, fields in entries],
                             name, f"its core ({name}) died: heartbeat expired")
                moved += len(entries)
                free -= len(entries)
        self.taken_over += moved
        return moved

    def loop(self) -> None:
        """The takeover thread: look for dead nodes every heartbeat interval."""
        while not self.stopping.is_set():
            try:
                self.take_over_dead()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.debug("takeover check failed: %s", e)
            except Exception:
                self._errors.exception("takeover", "takeover check failed")
            self.stopping.wait(self.settings.heartbeat_interval)


def died_twice(journal: Journal, record: ServiceRecord, node: str) -> dict[str, Any]:
    """The final values of an attempt whose cores died twice in a row in one plugin call."""
    error = f"the core died twice in {journal.died_in[-1]}"
    log.error("service %s attempt %d: %s; it is not called again", journal.service_id,
              journal.attempt, error)
    earlier = record.get("attempts")
    earlier = [a for a in earlier if isinstance(a, dict)] if isinstance(earlier, list) else []
    values = {"state": State.FAILED.value, "failure": "plugin", "error": error,
              "failed_in": journal.died_in[-1]}
    return {**values, "attempts": [*earlier, {**values, "attempt": journal.attempt,
                                              "node": node, "ended_at": time.time()}]}


def _current(attempt: int, *journals: Journal | None) -> Journal | None:
    """Of the journals that belong to ``attempt``, the one that got furthest."""
    found = [j for j in journals if j is not None and j.attempt == attempt]
    return max(found, key=lambda j: (j.final is not None, len(j.steps))) if found else None


def _inside(root: Path, work_dir: str) -> bool:
    """True if ``work_dir`` is a directory inside the work root (after resolving links)."""
    try:
        path = Path(work_dir).resolve()
        return path.is_dir() and Path(root).resolve() in path.parents
    except (OSError, ValueError):
        return False


def _identity(journal: Journal) -> ProcIdentity | None:
    """The journal's program, or (spawned but not yet journaled) the live shim or program
    its exit file leads to (soaf.process.shim.find_program). Either way verified here
    (soaf.process.identity.verified): its group is read from /proc."""
    if journal.process:
        identity = journal.identity
        return verified(identity) if identity is not None else None
    if journal.exit_file and "prepared" in journal.steps:
        found = [v for p in shim.find_program(journal.exit_file, journal.run_token)
                 if (v := verified(p)) is not None]
        if found:
            journal.shimmed = True
            ago = started_ago(found[0])
            journal.running_at = time.time() - ago if ago is not None else None
            return found[0]
    return None
