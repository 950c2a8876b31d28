"""The ``soaf`` command line: ``soaf core`` runs a core; the other commands talk to one.

Only this module configures logging. Exit codes: 0 success, 1 a service failed or an
error occurred, 2 bad usage (click's convention).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from soaf.errors import SoafError

log = logging.getLogger("soaf.cli")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # watchdog logs every inotify event at DEBUG: far too much even for -v.
    logging.getLogger("watchdog").setLevel(max(level, logging.INFO))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soaf")
def cli() -> None:
    """soaf: run other people's programs as managed services."""


@cli.command()
@click.option("--redis", "redis_url", metavar="URL", envvar="SOAF_REDIS_URL",
              help="Redis to use (redis://, rediss://, unix://). Env SOAF_REDIS_URL. "
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
                   "anyone who can write to Redis can run code here).")
@click.option("--drain/--no-drain", default=True, show_default=True,
              help="On SIGTERM/SIGINT wait for running services (drain) or stop their "
                   "programs and leave them queued for recovery. A second signal forces.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def core(redis_url: str | None, work_root: Path | None, plugins: Path | None, node: str | None,
         state_dir: Path | None, max_services: int | None, prefix: str | None,
         secret_file: Path | None, max_payload: int | None, insecure: bool | None,
         drain: bool, verbose: int, quiet: bool) -> None:
    """Run a core until SIGTERM/SIGINT (a second one forces the stop).

    The keys that sign payloads come from SOAF_SECRET (comma-separated for key
    rotation: the first signs, all are accepted) or a secret file; with the embedded
    Redis a key is created in the state dir when none is given. See SECURITY.md.
    """
    from soaf.config import Settings
    from soaf.core import Core

    _setup_logging(verbose, quiet)
    try:
        settings = Settings.load(
            redis_url=redis_url, work_root=work_root, plugins=plugins, node=node,
            state_dir=state_dir, max_services=max_services, prefix=prefix, insecure=insecure,
            secret_file=secret_file, max_payload=max_payload,
        )
        the_core = Core(settings)
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
    try:
        the_core.run()
    finally:
        log.info("stopping: %s %d running services (a second signal forces)",
                 "draining" if drain and signals["count"] < 2 else "stopping",
                 the_core.running())
        the_core.shutdown(drain=drain and signals["count"] < 2)
        log.info("core stopped")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="soaf")


if __name__ == "__main__":
    main()
