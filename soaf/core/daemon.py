"""The core daemon: reads submissions, runs services, reports on itself. Wires the engines.

``Core.start()`` connects (starting the embedded Redis when no URL is configured),
claims its node name (soaf.core.heartbeat), loads the plugins, builds the engines and
hands each the few collaborators it uses (never the core itself), resumes the work its
node had when its core last stopped (soaf.core.recovery) and starts the helper threads;
``Core.run()`` is the intake loop: only while it has free capacity it takes entries from
the queues of the services it offers (soaf.core.routing), decodes each batch
(soaf.core.intake) and starts runs (soaf.core.launcher). Signal handlers only set flags;
the loop does the work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from soaf.config import Settings
from soaf.core.admission import Admission
from soaf.core.cancels import Verifier
from soaf.core.control import Control
from soaf.core.enforcer import LimitEnforcer
from soaf.core.heartbeat import Heartbeat, Identity, beats_connection, claim_node
from soaf.core.intake import Gate, Refusal
from soaf.core.launcher import Launcher
from soaf.core.logkeeper import LogKeeper
from soaf.core.ratelog import RateLimitedLog
from soaf.core.recovery import Recovery
from soaf.core.results import ResultCache
from soaf.core.routing import Router, offered, own_pending
from soaf.core.runtable import RunTable
from soaf.core.secrets import core_secrets
from soaf.core.writer import StateWriter
from soaf.data import retention
from soaf.errors import ConfigError, PluginError, RedisUnavailable
from soaf.plugin.loader import PluginLoader
from soaf.plugin.reloader import Reloader
from soaf.plugin.versions import PluginVersions
from soaf.process import cgroup
from soaf.process.reaper import Reaper, become_subreaper, raise_open_files_limit
from soaf.protocol.connection import connect, redact
from soaf.protocol.keys import Keys
from soaf.protocol.replies import Entry, hash_of
from soaf.protocol.state import ServiceRecord
from soaf.run.ports import Engines

log = logging.getLogger(__name__)

#: Milliseconds one XREADGROUP may block; bounds how fast the loop notices a stop.
READ_BLOCK_MS = 500
#: The same while services wait for CPUs or memory: how soon a freed share is used.
WAITING_BLOCK_MS = 50
#: Seconds before the first retry of a plugin load that failed at start; doubled per
#: failure up to PLUGIN_RETRY_MAX. Until one succeeds the core takes no work.
PLUGIN_RETRY, PLUGIN_RETRY_MAX = 1.0, 60.0


class Core:
    """One core: ``start()``, then ``run()`` until ``request_stop()``."""

    def __init__(self, settings: Settings, *, metrics: tuple[str, int] | None = None) -> None:
        self.settings, self.metrics_address = settings, metrics
        self.metrics: Any = None  # soaf.metrics.exporter.CoreMetrics once served
        self.keys = Keys(settings.prefix)
        self.consumer = settings.node
        self.runs = RunTable()
        self.admission = Admission(cpus=settings.cpus, memory_mb=settings.memory_mb,
                                   node=settings.node)
        self.versions: PluginVersions | None = None
        self.loader = PluginLoader(settings.plugins, numbers=self._next_plugin_number)
        self.reloader: Reloader | None = None
        self.embedded: Any = None
        self.url: str | None = None
        self._stopping = threading.Event()
        self._stop_programs = threading.Event()
        self._force = threading.Event()
        # Entries re-read after a lost connection; at start, Recovery.resume_own does it.
        self._check_own_pending = False
        self._plugin_retry_at = 0.0
        self._plugin_backoff = PLUGIN_RETRY
        self._errors = RateLimitedLog(log)
        self.started_at = time.time()
        self.identity = Identity()

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self._connect()
        try:
            s.work_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"work root {s.work_root} cannot be created: {e}") from e
        claim_node(self.redis, self.keys.node(s.node), s.node, json.dumps(self.node_info()),
                   s.heartbeat_ttl)
        self.beats = beats_connection(self.url, s)  # the heartbeat's: it never waits long
        versions = self.versions = PluginVersions(self.beats, self.keys, s.node)
        try:
            self.loader.load(timeout=s.reload_timeout)
        except PluginError:
            log.error("no plugin version loaded; this core takes no work until one loads "
                      "(retried from %g s to every %g s, and on every change)",
                      PLUGIN_RETRY, PLUGIN_RETRY_MAX)
            self._plugin_retry_at = time.monotonic() + PLUGIN_RETRY
        versions.publish(self.loader)
        self.writer = StateWriter(self.redis, self.keys, record_ttl=s.record_ttl, replicas=s.durable_replicas)
        self.writer.start()
        if not become_subreaper():
            log.warning("cannot become a child subreaper; orphans of programs go to PID 1")
        raise_open_files_limit()
        self.reaper = Reaper.with_spawner()  # its programs' parent outlives a killed core
        self.reloader = Reloader(
            self.loader, debounce=s.reload_debounce, poll=s.reload_poll, watch=s.reload_watch,
            timeout=s.reload_timeout, on_result=lambda ok: self._publish_versions(),
        )
        self.reloader.start()
        self.keeper = LogKeeper(self.writer.put, max_bytes=s.log_max_bytes,
                                interval=s.log_interval, lines=s.log_lines,
                                connected=lambda: self.writer.connected)
        self.keeper.start()
        self.enforcer = LimitEnforcer()
        self.enforcer.start()
        self.cgroups = cgroup.setup()
        self._wire()
        if self.metrics_address is not None:  # Prometheus (soaf.core.scrape)
            from soaf.core import scrape
            self.metrics = scrape.serve(self.metrics_address, s, runs=self.runs, writer=self.writer,
                                        loader=self.loader, admission=self.admission, client=self.redis)
        self.control.start_from(self.redis)
        self._spawn(self.heartbeat.loop, "soaf-heartbeat")
        self.recovery.resume_own()
        self._spawn(self.control.loop, "soaf-control")
        self.sweeper = retention.Sweeper(s.work_root, s.retention, interval=s.gc_interval,
                                         in_use=self.runs.work_dirs)
        self.sweeper.start()
        self._spawn(self.recovery.loop, "soaf-recovery")
        self._publish_versions()  # a core that says it is ready has said what it offers
        log.info("core %s ready: %d service slots, work root %s, plugins from %s",
                 s.node, s.max_services, s.work_root.resolve(), s.plugins.resolve())

    def _connect(self) -> None:
        s = self.settings
        if s.redis_url is None:
            from soaf.core.embedded import EmbeddedRedis

            self.embedded = EmbeddedRedis(s.state_dir)
            self.embedded.hold(alone=False)  # waits while `soaf ls` ... has the data open
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
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise RedisUnavailable(f"cannot reach Redis at {redact(self.url)}: {e}") from e

    def _wire(self) -> None:
        """Build the engines, each with the collaborators it uses and nothing more."""
        s, client, keys = self.settings, self.redis, self.keys
        self.verifier = Verifier(self.secrets)
        self.router = Router(client, self.blocking, keys, node=s.node, labels=s.labels,
                             registry=lambda: self.loader.current, ttl=s.heartbeat_ttl,
                             stopping=self._stopping)
        self.heartbeat = Heartbeat(
            self.beats, keys, s, self.identity, info=self.node_info,
            runs=self.runs.current, cancel=self.runs.cancel, on_replaced=self.request_stop,
            after_beat=self._publish_versions, stopping=self._stopping,
            revive=self.embedded.revive if self.embedded is not None else None,
            verifier=self.verifier)
        engines = Engines(settings=s, writer=self.writer, reaper=self.reaper,
                          keeper=self.keeper, enforcer=self.enforcer, lookup=self._lookup,
                          still_current=self.heartbeat.still_current, cgroups=self.cgroups,
                          results=ResultCache(client, keys, self.secrets, self.verifier))
        self.gate = Gate(client, keys, secrets=self.secrets, max_payload=s.max_payload,
                         work_root=s.work_root, node=s.node, put=self.writer.put,
                         registry=lambda: self.loader.current, labels=s.labels,
                         max_submit_delay=s.max_submit_delay)
        self.launcher = Launcher(client, keys, s, engines, self.runs, admission=self.admission,
                                 refuse=self._refuse, requeue=self.gate.requeue,
                                 verifier=self.verifier)
        self.recovery = Recovery(
            client, keys, s, launcher=self.launcher, gate=self.gate, runs=self.runs,
            connected_since=self.heartbeat.steady_since,
            connected=lambda: self.writer.connected, registry=lambda: self.loader.current,
            stopping=self._stopping, offered=self.router.offered, token=self.identity.token)
        reloader = self.reloader
        assert reloader is not None
        self.control = Control(self.blocking, keys, s.node, cancel=self.runs.cancel,
                               reload=reloader.request, stopping=self._stopping,
                               verifier=self.verifier)

    def _refuse(self, entry_id: str, template: Any, reason: str) -> None:
        """End an entry this core can never run, where its submitter sees why."""
        self.gate.refuse(entry_id, {}, Refusal(reason, template.service_id, template.service,
                                               trusted=True))

    def _publish_versions(self) -> None:
        """After each heartbeat and plugin load: the plugin version and the offers."""
        if self.versions is not None:
            self.versions.publish(self.loader)
        router = getattr(self, "router", None)
        if router is not None:
            try:
                router.publish_offers()
            except redis.RedisError as e:
                log.warning("cannot publish the services this core offers (%s)", e)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

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
        self.runs.slot_freed.set()

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
                for run in self.runs.current():
                    if not run.interrupt_requested or (force and not run.force):
                        run.interrupt(force=force)
            if deadline is not None and time.monotonic() > deadline:
                log.error("shutdown timed out with %d services running", self.running())
                break
            self.runs.slot_freed.wait(0.2)
            self.runs.slot_freed.clear()
        self.sweeper.stop()
        self.enforcer.stop()
        self.keeper.stop()
        self.writer.stop(timeout=10)
        self.reaper.close()
        self.heartbeat.release()
        if self.metrics is not None:
            self.metrics.close()
        if self.embedded is not None:
            self.embedded.stop()

    def running(self) -> int:
        return len(self.runs)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- intake ---------------------------------------------------------------------------

    def run(self) -> None:
        """The intake loop; returns when a stop was requested."""
        backoff = 0.1
        while not self._stopping.is_set():
            if self.loader.current is None:
                self._await_plugins()  # leave the work to cores that can run it
                continue
            if not self.writer.connected:
                self._stopping.wait(0.2)  # take no new work while Redis is away
                continue
            self.launcher.renew_slots()  # nothing to do unless runs hold fleet slots
            if self.admission.waiting:
                self._admit_waiting()
            # Entries waiting for CPUs or memory take a slot each.
            free = self.settings.max_services - self.running() - self.admission.waiting
            if free <= 0:
                self.runs.slot_freed.wait(0.5)
                self.runs.slot_freed.clear()
                continue
            try:
                entries, previous = self._read(free, block=WAITING_BLOCK_MS
                                               if self.admission.waiting else READ_BLOCK_MS)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("cannot read submissions (%s); retrying in %.1f s", e, backoff)
                self._check_own_pending = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except redis.ResponseError:
                self._errors.exception("read", "cannot read submissions")
                self._stopping.wait(1.0)
                continue
            backoff = 0.1
            if not entries or self._stopping.is_set():
                continue  # anything read but not claimed stays pending: recoverable
            try:
                self._accept(entries, previous)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("lost Redis while accepting %d entries (%s); they stay pending",
                            len(entries), e)
                self._check_own_pending = True
            except Exception:  # nothing an entry or a record holds may stop the intake
                self._errors.exception("accept", "accepting %d entries failed; they stay "
                                       "pending until this core restarts", len(entries))

    def _await_plugins(self) -> None:
        """No plugin version has loaded: ask the reloader to try again once the backoff
        has passed (a load can fail for reasons outside the plugin files: a module or a
        file they need that is not there yet)."""
        now = time.monotonic()
        if now >= self._plugin_retry_at:
            log.info("no plugins loaded yet; trying again")
            assert self.reloader is not None
            self.reloader.request()
            self._plugin_retry_at = now + self._plugin_backoff
            self._plugin_backoff = min(self._plugin_backoff * 2, PLUGIN_RETRY_MAX)
        self._stopping.wait(0.2)

    def _accept(self, entries: list[Entry], previous: str | None) -> None:
        """Decode a batch and start its good entries. Entries this node had before a lost
        connection (``previous``) go through recovery, which decides how to go on."""
        accepted, registry = self.gate.decode(entries, fresh=previous is None)
        if not accepted:
            return
        assert registry is not None
        if previous is None:
            self.launcher.claim_and_start(accepted, registry)
        else:
            self.recovery.recover_all(accepted, registry, previous,
                                      "claimed while the connection to Redis broke")

    def _admit_waiting(self) -> None:
        try:
            self.launcher.admit_waiting(self.loader.current)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("lost Redis while starting waiting services (%s)", e)
            self._check_own_pending = True
        except Exception:
            self._errors.exception("admit", "starting waiting services failed")

    def _read(self, count: int, *, block: int = READ_BLOCK_MS) -> tuple[list[Entry], str | None]:
        """Entries to accept, and the node that had them before (None: new ones)."""
        if self._check_own_pending:
            found = self._own_pending()
            self._check_own_pending = False
            if found:
                log.info("re-taking %d entries whose delivery a lost connection cut short", len(found))
                return found, self.consumer
        return self.runs.not_held(self.router.take(count, block)), None

    def _own_pending(self) -> list[Entry]:
        """Entries delivered to this consumer whose delivery or claim a lost connection cut
        short. Runs that ended but whose final state (and ack) the writer still holds are
        not among them: they must not run again."""
        mine = self.runs.entries() | self.admission.waiting_entries()
        return [(entry_id, fields or {}) for entry_id, fields
                in own_pending(self.blocking, self.keys, self.consumer)
                if entry_id not in mine]

    def _lookup(self, service_id: str) -> dict[str, Any] | None:
        """Another service's record fields, for resolving ``soaf://`` inputs."""
        data = hash_of(self.redis.hgetall(self.keys.service(service_id)))
        return ServiceRecord.from_hash(service_id, data).raw if data else None

    # -- reporting ------------------------------------------------------------------------

    def node_info(self) -> dict[str, Any]:
        registry = self.loader.current
        writer = getattr(self, "writer", None)
        return {
            "node": self.settings.node, **self.identity.fields(),
            "started_at": self.started_at, "ts": time.time(), "running": self.running(),
            "max_services": self.settings.max_services, **self.admission.usage(),
            "plugin_version": registry.version if registry else None,
            "redis_connected": writer.connected if writer is not None else True,
            "labels": sorted(self.settings.labels), "draining": self.stopping,
            "services": [] if self.stopping else offered(registry, self.settings.labels),
        }

    def _next_plugin_number(self, last: int) -> int:
        return self.versions.next_number(last) if self.versions is not None else last + 1

    def reload_plugins(self) -> bool:
        """Load a new plugin generation now, in this thread, and report it; False (old one
        kept) if it fails. The ``reload`` control message does the same in the reloader."""
        assert self.reloader is not None, "start() the core first"
        return self.reloader.reload()
