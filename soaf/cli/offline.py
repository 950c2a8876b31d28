"""The history of an embedded core that is not running: read commands open its data themselves.

An embedded core keeps its Redis data in its state dir (``redis/``, an append-only file)
and stops its redis-server when it stops. So that ``soaf ls``, ``status``, ``logs``,
``wait`` (on final services) and ``info`` still work then, ``history`` takes the state
dir's ``core.lock`` alone, which succeeds only while no core runs on it, starts the
embedded redis-server on the data for the length of the command, and stops it after.
A core that starts meanwhile waits for the lock (soaf.core.embedded ``hold``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click

from soaf.config import state_dir_from_env

#: ``click.Context.meta`` key set while a command runs on data it opened itself.
OFFLINE = "soaf.offline"


@contextlib.contextmanager
def history(redis_url: str | None, state_dir: Path | None) -> Iterator[bool]:
    """Yields True while the embedded data of ``state_dir`` is open for this command
    alone (no core runs on it), False when the command should talk to Redis as usual."""
    from soaf.core.embedded import DATA_DIR, EmbeddedRedis

    state = state_dir or state_dir_from_env()
    if redis_url or os.environ.get("SOAF_REDIS_URL", "").strip() or not (state / DATA_DIR).is_dir():
        yield False
        return
    embedded = EmbeddedRedis(state)
    if not embedded.hold(alone=True):
        yield False  # a core runs on it: ask that core's Redis
        return
    try:
        embedded.start()  # or re-use the server a killed core left running
        yield True
    finally:
        embedded.stop()  # only a server started here; the lock in any case


def running_needed(what: str) -> click.ClickException:
    """The error of a command that needs a running core but runs on opened data."""
    return click.ClickException(
        f"{what}, but no core is running (this command opened the embedded Redis's data "
        "itself): start a core (python start_core.py) to finish it")
