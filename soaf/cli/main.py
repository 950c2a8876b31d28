"""The ``soaf`` command line: ``soaf core`` runs a core; the other commands talk to one.

Logging is configured only here (soaf.cli.logconfig). Exit codes: 0 success, 1 a service failed or an
error occurred, 2 bad usage (click's convention).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from soaf.cli.cache import cache
from soaf.cli.commands import COMMANDS
from soaf.cli.coreflags import take_tuning, tuning_options
from soaf.cli.dashboard import dashboard
from soaf.cli.info import info
from soaf.cli.logconfig import setup_logging
from soaf.cli.pipelines import pipelines
from soaf.cli.resubmit import resubmit
from soaf.errors import SoafError

log = logging.getLogger(__name__)


class SoafGroup(click.Group):
    """Turns soaf's errors into one ``Error: ...`` line (exit 1) instead of a traceback,
    and Ctrl-C into exit code 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SoafError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None


@click.group(cls=SoafGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soaf")
def cli() -> None:
    """soaf: run other people's programs as managed services.

    `soaf core` runs a core; the other commands talk to the cores through Redis,
    found like the core finds it (SOAF_REDIS_URL, else the embedded core's state dir
    .soaf/ in the current directory). Exit codes: 0 fine, 1 an error or a service that
    did not succeed, 2 bad usage.
    """


def retention_options(fn: Any) -> Any:
    """The retention policy's flags (soaf/config.py RetentionPolicy), shared by
    ``soaf core`` and ``soaf gc``; each defaults to its SOAF_* variable."""
    options = [
        click.option("--on-success", type=click.Choice(["remove", "outputs", "keep"]),
                     help="What becomes of a succeeded work dir once it is old enough: removed, "
                          "trimmed to its outputs and logs, or kept. Env SOAF_ON_SUCCESS. "
                          "Default: remove."),
        click.option("--keep-succeeded-hours", type=click.FloatRange(min=0),
                     help="Hours a succeeded work dir stays whole. Env SOAF_KEEP_SUCCEEDED_HOURS. "
                          "Default: 24."),
        click.option("--keep-failed-hours", type=click.FloatRange(min=0),
                     help="Hours a failed (cancelled, timed out) work dir stays, for inspection; "
                          "'inf' keeps it. Env SOAF_KEEP_FAILED_HOURS. Default: 168."),
        click.option("--max-work-bytes", metavar="SIZE",
                     help="Cap on the work root (e.g. 20G); past it the oldest finished dirs go "
                          "first. Env SOAF_MAX_WORK_BYTES. Default: no cap."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_RETENTION_FLAGS = ("on_success", "keep_succeeded_hours", "keep_failed_hours", "max_work_bytes")


def _policy(flags: dict[str, Any]) -> Any:
    from soaf.config import RetentionPolicy

    values = {name: flags.pop(name, None) for name in _RETENTION_FLAGS}
    values["max_bytes"] = values.pop("max_work_bytes")
    return RetentionPolicy.load(**values)


@cli.command()
@click.option("--redis", "redis_url", metavar="URL", envvar="SOAF_REDIS_URL",
              help="Redis to use (redis://, rediss://, unix://, redis+sentinel://). Env "
                   "SOAF_REDIS_URL (or SOAF_SENTINELS + SOAF_SENTINEL_MASTER [+ SOAF_SENTINEL_DB]). "
                   "Default: start an embedded redis-server in the state dir.")
@click.option("--work-root", type=click.Path(path_type=Path), envvar="SOAF_WORK_ROOT",
              help="Directory holding every service's work dir. Env SOAF_WORK_ROOT. "
                   "Default: <state dir>/work.")
@click.option("--plugins", type=click.Path(path_type=Path, file_okay=False), envvar="SOAF_PLUGINS",
              help="Directory holding the handlers/ and services/ packages. Env SOAF_PLUGINS. "
                   "Default: the current directory.")
@click.option("--node", envvar="SOAF_NODE",
              help="This core's name, unique among cores. Env SOAF_NODE. Default: the host name.")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="SOAF_STATE_DIR",
              help="Embedded Redis data, its URL and the secret. Env SOAF_STATE_DIR. "
                   "Default: .soaf")
@click.option("--max-services", type=click.IntRange(min=1), envvar="SOAF_MAX_SERVICES",
              help="Services run at once; beyond it no new work is read. Env SOAF_MAX_SERVICES.")
@click.option("--cpus", type=click.FloatRange(min=0, min_open=True), envvar="SOAF_CPUS",
              help="CPUs shared by the services that declare ``cpus``; one that does not "
                   "fit waits. Env SOAF_CPUS. Default: this machine's CPU count.")
@click.option("--memory-mb", type=click.FloatRange(min=0, min_open=True),
              envvar="SOAF_MEMORY_MB", metavar="MIB",
              help="Memory (MiB) shared by the services that declare ``memory_mb``. "
                   "Env SOAF_MEMORY_MB. Default: about 90% of this machine's RAM.")
@click.option("--labels", envvar="SOAF_LABELS", metavar="NAME,...",
              help="What this core has (e.g. gpu,bigmem): it takes the services whose "
                   "``requires`` these cover. Env SOAF_LABELS.")
@click.option("--prefix", envvar="SOAF_PREFIX", help="Redis key prefix. Env SOAF_PREFIX.")
@click.option("--secret-file", type=click.Path(path_type=Path, dir_okay=False),
              envvar="SOAF_SECRET_FILE",
              help="File holding the signing keys, one per line (the first signs, all are "
                   "accepted). Env SOAF_SECRET_FILE. Alternative to SOAF_SECRET.")
@click.option("--max-payload", type=click.IntRange(min=1024), envvar="SOAF_MAX_PAYLOAD",
              metavar="BYTES",
              help="Largest submission accepted; larger ones are refused unread. "
                   "Env SOAF_MAX_PAYLOAD. Default: 1048576.")
@click.option("--insecure", is_flag=True, default=None,
              help="Accept a shared Redis without a secret (signs with a well-known key: "
                   "anyone who can write to Redis can run code here). Env SOAF_INSECURE=1.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), envvar="SOAF_METRICS_PORT",
              help="Serve Prometheus metrics on this port (needs soaf[metrics]). "
                   "Env SOAF_METRICS_PORT.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, envvar="SOAF_METRICS_HOST",
              help="Address the metrics are served on. Env SOAF_METRICS_HOST.")
@click.option("--drain/--no-drain", default=True, show_default=True,
              help="On SIGTERM/SIGINT wait for running services (drain) or stop their "
                   "programs and leave them queued for recovery. A second signal forces.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@retention_options
@click.option("--gc-interval", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Seconds between sweeps of the work root (0: none). Env SOAF_GC_INTERVAL.")
@tuning_options
def core(redis_url: str | None, work_root: Path | None, plugins: Path | None, node: str | None,
         state_dir: Path | None, max_services: int | None, cpus: float | None,
         memory_mb: float | None, labels: str | None, prefix: str | None,
         secret_file: Path | None, max_payload: int | None, insecure: bool | None,
         metrics_port: int | None, metrics_host: str, drain: bool, verbose: int, quiet: bool,
         **data_flags: Any) -> None:
    """Run a core until SIGTERM/SIGINT (a second one forces the stop).

    The keys that sign payloads come from SOAF_SECRET (comma-separated for key
    rotation: the first signs, all are accepted) or a secret file; with the embedded
    Redis a key is created in the state dir when none is given. See SECURITY.md.
    """
    from soaf.config import Settings
    from soaf.core.cpuhome import CpuHome
    from soaf.core.daemon import Core
    from soaf.core.heap import settle_heap

    setup_logging(verbose, quiet)
    tuning = take_tuning(data_flags)
    try:
        settings = Settings.load(**tuning,
            redis_url=redis_url, work_root=work_root, plugins=plugins, node=node,
            state_dir=state_dir, max_services=max_services, cpus=cpus, memory_mb=memory_mb,
            labels=labels, prefix=prefix, insecure=insecure,
            secret_file=secret_file, max_payload=max_payload,
            retention=_policy(data_flags), gc_interval=data_flags.pop("gc_interval", None),
        )
        the_core = Core(settings, metrics=None if metrics_port is None
                        else (metrics_host, metrics_port))
        the_core.start()
    except SoafError as e:
        raise click.ClickException(str(e))
    signals = {"count": 0}

    def on_signal(signum: int, frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            the_core.request_stop(force=True)
        else:
            the_core.request_stop(stop_programs=not drain)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settle_heap()
    home = CpuHome(settings.core_cpu)
    try:  # after the start: the spawner and Redis were started with every CPU
        home.start()
    except Exception:  # a speed-up: the core runs without it
        log.exception("cannot keep the core's threads on one CPU; they stay spread")
    try:
        the_core.run()
    finally:
        home.stop()
        log.info("stopping: %s %d running services (a second signal forces)",
                 "draining" if drain and signals["count"] < 2 else "stopping",
                 the_core.running())
        the_core.shutdown(drain=drain and signals["count"] < 2)
        log.info("core stopped")
    _exit_past_stray_threads()


def _exit_past_stray_threads() -> None:
    """Exit now if plugin code left non-daemon threads running: the interpreter would wait
    for them forever. Exit handlers run first, as they would at a normal exit."""
    import atexit
    import threading

    stray = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not stray:
        return
    log.warning("exiting past %d thread(s) plugin code left running: %s",
                len(stray), ", ".join(sorted(stray)))
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@cli.command()
@click.option("--work-root", type=click.Path(path_type=Path, file_okay=False),
              envvar="SOAF_WORK_ROOT",
              help="The work root to sweep. Env SOAF_WORK_ROOT. Default: <state dir>/work.")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="SOAF_STATE_DIR",
              help="Env SOAF_STATE_DIR. Default: .soaf")
@retention_options
@click.option("-n", "--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def gc(work_root: Path | None, state_dir: Path | None, dry_run: bool, as_json: bool,
       **policy_flags: Any) -> None:
    """Recycle finished work dirs by the retention policy.

    Safe while cores run: only dirs whose every service has finished are touched, and
    each removal re-checks that under the work root's lock.
    """
    import json

    from soaf.config import state_dir_from_env
    from soaf.data.retention import sweep

    try:
        policy = _policy(policy_flags)
    except SoafError as e:
        raise click.ClickException(str(e))
    root = work_root or (state_dir or state_dir_from_env()) / "work"
    if not root.is_dir():
        raise click.ClickException(f"work root {root} does not exist")
    report = sweep(root, policy, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for entry in report.removed:
        click.echo(f"{verb} {entry['dir']}  ({entry['reason']}, {_size(entry['bytes'])})")
    for entry in report.trimmed:
        click.echo(f"{'would trim' if dry_run else 'trimmed'} {entry['dir']}  "
                   f"(kept outputs, {_size(entry['bytes'])})")
    click.echo(f"{len(report.removed)} removed, {len(report.trimmed)} trimmed, "
               f"{len(report.kept)} kept; {_size(report.freed)} freed of "
               f"{_size(report.total_before)} in {root}")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


for _command in [*COMMANDS, resubmit, info, pipelines, cache, dashboard]:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="soaf")


if __name__ == "__main__":
    main()
