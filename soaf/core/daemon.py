"""The core daemon: reads submissions, runs services, reports on itself. Wires the engines.

``Core.start()`` connects (starting the embedded Redis when no URL is configured),
claims its node name (soaf.core.heartbeat), loads the plugins, resumes the work its node had
when its core last stopped (soaf.core.recovery) and starts the helper threads (the plugin
reloader among them); ``Core.run()`` is the intake loop: it reads the submit stream
through the consumer group only while it has free capacity, claims each entry, and hands
it to a ``ServiceRun``. Signal handlers only set flags; the loop does the work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import redis

from soaf.config import Settings, core_secrets
from soaf.core.enforcer import Supervisor
from soaf.core.heartbeat import Heartbeat, Identity, claim_node
from soaf.core.intake import Refusal, decode_entry
from soaf.core.logkeeper import LogKeeper
from soaf.core.recovery import Recovery
from soaf.core.writer import StateWriter
from soaf.data import retention
from soaf.errors import ConfigError, PluginError, RedisUnavailable
from soaf.plugin.loader import PluginLoader, Registry
from soaf.plugin.reloader import Reloader
from soaf.plugin.versions import PluginVersions
from soaf.process.spawn import Reaper, become_subreaper, raise_open_files_limit
from soaf.protocol.connection import connect, redact
from soaf.protocol.keys import GROUP, ID_FIELD, PAYLOAD_FIELD, Keys
from soaf.protocol.scripts import CLAIM, is_noscript
from soaf.protocol.state import EVENTS_MAXLEN, FINAL_VALUES, Change, ServiceRecord, State
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.service_run import Claim, ServiceRun

log = logging.getLogger(__name__)

#: Secrets shorter than this get a warning at start (an HMAC of a known message lets
#: anyone holding one payload test guesses offline).
MIN_SECRET_LENGTH = 16
#: Dead letters kept (approximate).
DEADLETTER_MAXLEN = 10_000
#: Milliseconds one XREADGROUP may block; bounds how fast the loop notices a stop.
READ_BLOCK_MS = 500


class Core:
    """One core: ``start()``, then ``run()`` until ``request_stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.consumer = settings.node
        self.runs: dict[str, ServiceRun] = {}
        self.versions: PluginVersions | None = None
        self.loader = PluginLoader(settings.plugins, numbers=self._next_plugin_number)
        self.reloader: Reloader | None = None
        self.embedded: Any = None
        self.url: str | None = None
        self.secrets: list[str] = list(settings.secrets)
        self._runs_lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._stopping = threading.Event()
        self._stop_programs = threading.Event()
        self._force = threading.Event()
        self._threads: list[threading.Thread] = []
        # Entries re-read after a lost connection; at start, Recovery.resume_own does it.
        self._check_own_pending = False
        self.started_at = time.time()
        self.identity = Identity()
        self.heartbeat = Heartbeat(self)
        self.recovery = Recovery(self)
        #: Runs that have ended but whose final state is not in Redis yet, by entry id.
        self._finishing: dict[str, ServiceRun] = {}

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        if s.redis_url is None:
            from soaf.core.embedded import EmbeddedRedis

            self.embedded = EmbeddedRedis(s.state_dir)
            self.url = self.embedded.start()
            log.info("embedded Redis at %s (state in %s)", redact(self.url), s.state_dir.resolve())
        else:
            self.url = s.redis_url
            log.info("using Redis at %s", redact(self.url))
        self.secrets = core_secrets(s, redact(self.url), embedded=self.embedded is not None)
        self.redis = connect(self.url, name=f"soaf-core-{s.node}")
        self.blocking = connect(self.url, blocking=True, name=f"soaf-core-{s.node}-intake")
        try:
            self.redis.ping()
            self._create_group()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise RedisUnavailable(f"cannot reach Redis at {redact(self.url)}: {e}") from e
        try:
            s.work_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"work root {s.work_root} cannot be created: {e}") from e
        claim_node(self.redis, self.keys.node(s.node), s.node,
                            json.dumps(self.node_info()), s.heartbeat_ttl)
        self.versions = PluginVersions(self.redis, self.keys, s.node)
        try:
            self.loader.load(timeout=s.reload_timeout)
        except PluginError:
            log.error("no plugin version loaded; fix the plugins and they will be loaded")
        self.versions.publish(self.loader)
        self.writer = StateWriter(self.redis, self.keys, record_ttl=s.record_ttl)
        self.writer.start()
        if not become_subreaper():
            log.warning("cannot become a child subreaper; orphans of programs go to PID 1")
        raise_open_files_limit()
        self.reaper = Reaper()
        self.reloader = Reloader(
            self.loader, debounce=s.reload_debounce, poll=s.reload_poll, watch=s.reload_watch,
            timeout=s.reload_timeout, on_result=lambda ok: self.versions.publish(self.loader),
        )
        self.reloader.start()
        # Control messages are read from the newest one that exists now, so none sent
        # after start() returns is missed, however late the control thread first reads.
        newest = self.redis.xrevrange(self.keys.control, count=1)
        self._control_from = newest[0][0].decode() if newest else "0-0"
        self.keeper = LogKeeper(self.writer.put, max_bytes=s.log_max_bytes,
                                interval=s.log_interval, lines=s.log_lines,
                                connected=lambda: self.writer.connected)
        self.keeper.start()
        self.supervisor = Supervisor()
        self.supervisor.start()
        self._spawn(self.heartbeat.loop, "soaf-heartbeat")
        self.recovery.resume_own()
        self._spawn(self._control_loop, "soaf-control")
        self.sweeper = retention.Sweeper(s.work_root, s.retention, interval=s.gc_interval,
                                         in_use=self.work_dirs_in_use)
        self.sweeper.start()
        self._spawn(self.recovery.loop, "soaf-recovery")
        log.info("core %s ready: %d service slots, work root %s, plugins from %s",
                 s.node, s.max_services, s.work_root.resolve(), s.plugins.resolve())

    def _create_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.submit, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- stop -----------------------------------------------------------------------------

    def request_stop(self, *, stop_programs: bool = False, force: bool = False) -> None:
        """Stop taking work. ``stop_programs``: stop the running programs too (their
        services are left for recovery); ``force``: and wait for nothing (no grace period,
        no after_watch_callback). Only sets flags: safe in a signal handler."""
        if force:
            self._force.set()
        if stop_programs or force:
            self._stop_programs.set()
        self._stopping.set()
        self._slot_freed.set()

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Wait for running services (or stop them), write every state, close.

        Services that end meanwhile get their final state; those whose programs are
        stopped go back to ``queued`` with their stream entries unacknowledged."""
        self.request_stop(stop_programs=not drain)
        if self.reloader is not None:
            self.reloader.stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if self._stop_programs.is_set():
                force = self._force.is_set()
                for run in self.current_runs():
                    if not run.interrupt_requested or (force and not run.force):
                        run.interrupt(force=force)
            if deadline is not None and time.monotonic() > deadline:
                log.error("shutdown timed out with %d services running", self.running())
                break
            self._slot_freed.wait(0.2)
            self._slot_freed.clear()
        self.sweeper.stop()
        self.supervisor.stop()
        self.keeper.stop()
        self.writer.stop(timeout=10)
        self.reaper.close()
        self.heartbeat.release()
        if self.embedded is not None:
            self.embedded.stop()

    def running(self) -> int:
        with self._runs_lock:
            return len(self.runs)

    def current_runs(self) -> list[ServiceRun]:
        with self._runs_lock:
            return list(self.runs.values())

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_stopping(self, timeout: float) -> bool:
        return self._stopping.wait(timeout)

    # -- intake ---------------------------------------------------------------------------

    def run(self) -> None:
        """The intake loop; returns when a stop was requested."""
        backoff = 0.1
        while not self._stopping.is_set():
            if not self.writer.connected:
                self._stopping.wait(0.2)  # take no new work while Redis is away
                continue
            free = self.settings.max_services - self.running()
            if free <= 0:
                self._slot_freed.wait(0.5)
                self._slot_freed.clear()
                continue
            try:
                entries, previous = self._read(free)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("cannot read submissions (%s); retrying in %.1f s", e, backoff)
                self._check_own_pending = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # Redis came back without its data (no persistence): start the group again.
                log.error("the consumer group is gone (Redis restarted without its data?); "
                          "creating it again")
                self._create_group()
                continue
            backoff = 0.1
            if not entries or self._stopping.is_set():
                continue  # anything read but not claimed stays pending: recoverable
            try:
                self.accept(entries, previous=previous,
                            reason="claimed while the connection to Redis broke")
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("lost Redis while accepting %d entries (%s); they stay pending",
                            len(entries), e)
                self._check_own_pending = True

    def _read(self, count: int) -> tuple[list[tuple[str, dict[bytes, bytes]]], str | None]:
        """Entries to accept, and the node that had them before (None: new ones)."""
        if self._check_own_pending:
            # Entries delivered to this consumer whose delivery or claim a lost connection
            # cut short. Runs that ended but whose final state (and ack) the writer still
            # holds are not among them: they must not run again.
            with self._runs_lock:
                self._finishing = {e: r for e, r in self._finishing.items()
                                   if not r.final_written.is_set()}
                mine = {run.claim.entry_id for run in self.runs.values()} | set(self._finishing)
            found: list[tuple[str, dict[bytes, bytes]]] = []
            start = "0"
            while True:
                resp = self.blocking.xreadgroup(
                    GROUP, self.consumer, {self.keys.submit: start}, count=100
                )
                batch = resp[0][1] if resp else []
                if not batch:
                    break
                for raw_id, fields in batch:
                    entry_id = raw_id.decode()
                    if entry_id not in mine:
                        found.append((entry_id, fields or {}))
                start = batch[-1][0].decode()
            self._check_own_pending = False
            if found:
                log.info("re-taking %d entries whose delivery a lost connection cut short",
                         len(found))
                return found, self.consumer
        resp = self.blocking.xreadgroup(
            GROUP, self.consumer, {self.keys.submit: ">"}, count=count, block=READ_BLOCK_MS
        )
        if not resp:
            return [], None
        return [(raw_id.decode(), fields or {}) for raw_id, fields in resp[0][1]], None

    def accept(self, entries: list[tuple[str, dict[bytes, bytes]]], *,
               previous: str | None = None, reason: str = "") -> None:
        """Decode a batch of entries, claim the good ones in one round trip, start them.

        ``previous`` names the node that had the entries before (this one after a restart
        or a lost connection, or a dead one): soaf.core.recovery then decides, per entry, how
        to go on.
        """
        registry = self.loader.current
        accepted: list[tuple[str, ServiceParamTemplate]] = []
        for entry_id, fields in entries:
            try:
                template = decode_entry(
                    fields, secrets=self.secrets, max_payload=self.settings.max_payload,
                    registry=registry, work_root=self.settings.work_root,
                )
            except Refusal as refusal:
                self._refuse(entry_id, fields, refusal)
                continue
            accepted.append((entry_id, template))
        if not accepted:
            return
        assert registry is not None
        if previous is not None:
            for entry_id, template in accepted:
                self.recovery.recover(entry_id, template, registry, previous, reason)
            return
        self.claim_and_start(accepted, registry)

    def claim_and_start(self, accepted: list[tuple[str, ServiceParamTemplate]],
                        registry: Registry) -> None:
        """Claim the entries' services for a new attempt (one round trip) and start them;
        entries whose service is final or claimed under another entry are finished."""
        version = json.dumps(registry.version)
        finals = ",".join(FINAL_VALUES)
        now = time.time()
        calls = []
        for entry_id, template in accepted:
            sid = template.service_id
            calls.append((
                [self.keys.service(sid), self.keys.events(sid), self.keys.services,
                 self.keys.cancels],
                [sid, template.service, now, self.settings.node, entry_id,
                 self.keys.notify, EVENTS_MAXLEN, version, finals],
            ))
        results = self._claim(calls)
        unclaimed: list[str] = []
        ended: list[str] = []  # final without running (e.g. cancelled while queued)
        for (entry_id, template), (verdict, detail, attempt, seq, attempts) in zip(
            accepted, results
        ):
            if verdict != b"run":
                log.info("entry %s for %s not run: %s (%s)", entry_id, template.service_id,
                         verdict.decode(), detail.decode())
                unclaimed.append(entry_id)
                if verdict in (b"final", b"cancelled"):
                    ended.append(template.service_id)
                continue
            self.launch(ServiceRun(
                template, Claim(entry_id, int(attempt), int(seq), Claim.parse_attempts(attempts)),
                **self.run_kwargs(registry)))
        if unclaimed:
            self.finish_entries(unclaimed, ended=ended)

    def finish_entries(self, entry_ids: list[str], *, ended: list[str] | None = None) -> None:
        """Acknowledge and delete entries that need no (more) work; the records of the
        services in ``ended`` (final without running) start to age."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.keys.submit, GROUP, *entry_ids)
        pipe.xdel(self.keys.submit, *entry_ids)
        ttl = int(self.settings.record_ttl)
        for sid in (ended or []) if ttl > 0 else []:
            for key in (self.keys.service(sid), self.keys.events(sid)):
                pipe.expire(key, ttl)  # the record starts to age
        pipe.execute()

    def run_kwargs(self, registry: Registry) -> dict[str, Any]:
        return {"registry": registry, "settings": self.settings, "writer": self.writer,
                "reaper": self.reaper, "on_done": self._done, "keeper": self.keeper,
                "supervisor": self.supervisor, "lookup": self._lookup}

    def launch(self, run: ServiceRun) -> None:
        run.still_current = self.heartbeat.still_current
        with self._runs_lock:
            self.runs[run.service_id] = run
        run.start()

    def _claim(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run CLAIM_LUA for each call in one round trip; a claim that met an empty
        script cache never ran, so only those are sent again, with the script loaded."""
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            CLAIM.call(pipe, keys, args)
        results = pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if is_noscript(result):
                results[i] = CLAIM.run(self.redis, *calls[i])
            elif isinstance(result, Exception):
                raise result
        return results

    def _refuse(self, entry_id: str, fields: dict[bytes, bytes], refusal: Refusal) -> None:
        log.warning("refused entry %s: %s", entry_id, refusal.reason)
        if refusal.service_id is not None:
            now = time.time()
            values: dict[str, Any] = {
                "state": State.REJECTED.value, "error": refusal.reason, "rejected_at": now,
                "finished_at": now, "service_id": refusal.service_id, "node": self.settings.node,
            }
            if refusal.service:
                values["service"] = refusal.service
            # Attempt 0, seq 2: applies only over a fresh 'queued' record (or none), so a
            # refusal never overwrites a service that is already running elsewhere.
            self.writer.put(Change(refusal.service_id, 0, 2, values, ack=entry_id))
            if refusal.trusted:
                return
        payload = fields.get(PAYLOAD_FIELD.encode(), b"")
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.keys.deadletter, {
            "entry": entry_id,
            "reason": refusal.reason,
            "id": fields.get(ID_FIELD.encode(), b"")[:200],
            "size": len(payload),
            "preview": payload[:64].hex(),
            "node": self.settings.node,
            "ts": time.time(),
        }, maxlen=DEADLETTER_MAXLEN, approximate=True)
        pipe.xack(self.keys.submit, GROUP, entry_id)
        pipe.xdel(self.keys.submit, entry_id)
        pipe.execute()

    def _lookup(self, service_id: str) -> dict[str, Any] | None:
        """Another service's record fields, for resolving ``soaf://`` inputs."""
        data = self.redis.hgetall(self.keys.service(service_id))
        return ServiceRecord.from_hash(service_id, data).raw if data else None

    def work_dirs_in_use(self) -> set[Path]:
        with self._runs_lock:
            return {run.work_dir for run in self.runs.values() if run.work_dir is not None}

    def _done(self, run: ServiceRun) -> None:
        with self._runs_lock:
            self.runs.pop(run.service_id, None)
            self._finishing = {e: r for e, r in self._finishing.items()
                               if not r.final_written.is_set()}
            if run.final_queued and not run.final_written.is_set():
                self._finishing[run.claim.entry_id] = run
        self._slot_freed.set()

    # -- heartbeat and control --------------------------------------------------------------

    def node_info(self) -> dict[str, Any]:
        registry = self.loader.current
        writer = getattr(self, "writer", None)
        return {
            "node": self.settings.node, **self.identity.fields(),
            "started_at": self.started_at, "ts": time.time(), "running": self.running(),
            "max_services": self.settings.max_services,
            "plugin_version": registry.version if registry else None,
            "redis_connected": writer.connected if writer is not None else True,
        }

    def _next_plugin_number(self, last: int) -> int:
        return self.versions.next_number(last) if self.versions is not None else last + 1

    def cancel_local(self, service_id: str) -> bool:
        with self._runs_lock:
            run = self.runs.get(service_id)
        if run is None:
            return False
        if not run.cancel_requested:
            log.info("cancelling service %s", service_id)
        run.cancel()
        return True

    def _control_loop(self) -> None:
        last = self._control_from
        while not self._stopping.is_set():
            try:
                resp = self.blocking.xread({self.keys.control: last}, count=100, block=1000)
            except redis.RedisError:
                self._stopping.wait(1.0)
                continue
            for _, messages in resp or []:
                for raw_id, fields in messages:
                    last = raw_id.decode()
                    self._control(fields)

    def _control(self, fields: dict[bytes, bytes]) -> None:
        kind = fields.get(b"type", b"").decode(errors="replace")
        target = fields.get(b"node", b"").decode(errors="replace")
        if target and target != self.settings.node:
            return
        if kind == "cancel":
            self.cancel_local(fields.get(b"id", b"").decode(errors="replace"))
        elif kind == "reload":
            if self.reloader is not None:
                self.reloader.request()
        else:
            log.warning("unknown control message %r", kind)

    def reload_plugins(self) -> bool:
        """Load a new plugin generation now, in this thread, and report it; False (old one
        kept) if it fails. The ``reload`` control message does the same in the reloader."""
        assert self.reloader is not None, "start() the core first"
        return self.reloader.reload()
