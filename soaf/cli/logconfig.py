"""How the ``soaf`` command logs: the one place in soaf that configures logging.

The core logs INFO by default (``-v`` DEBUG, ``-q`` warnings only); the client commands
log warnings only unless asked (``-v`` INFO, ``-vv`` DEBUG).
"""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # watchdog logs every inotify event at DEBUG: far too much even for -v.
    logging.getLogger("watchdog").setLevel(max(level, logging.INFO))


def configure_logging(verbose: int) -> None:
    """Logging of the client commands: warnings only, ``-v`` info, ``-vv`` debug."""
    setup_logging(verbose - 1 if verbose else 0, quiet=verbose == 0)
