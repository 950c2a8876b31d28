"""Plugin versions in Redis: numbers that keep rising across restarts, and the load report.

A version is ``<number>-<hash8>``. The number comes from a per-node counter in Redis
(``Keys.plugin_number``), raised atomically on every successful load, so a core that
restarts goes on from where it stopped instead of starting again at 1, and two
versions of one node never share a number. If Redis cannot be reached at that moment
the core counts on from its own last number and lifts the counter past it later.

The report (``Keys.plugins``, one JSON value per node, read by ``Client.plugins()``)
holds the version serving now, its services, and the last load error with its file,
line and time; a good load clears the error. See docs/plugins.md.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis

from soaf.plugin.loader import PluginLoader
from soaf.protocol.keys import Keys
from soaf.protocol.scripts import NEXT_NUMBER_LUA

log = logging.getLogger(__name__)



def plugin_report(loader: PluginLoader) -> dict[str, Any]:
    """What clients read about a node's plugins (see the module docstring)."""
    registry = loader.current
    error = loader.error
    return {
        "version": registry.version if registry else None,
        "number": registry.number if registry else None,
        "digest": registry.digest if registry else None,
        "loaded_at": registry.loaded_at if registry else None,
        "services": sorted(registry.programs) if registry else [],
        "handlers": sorted(registry.handlers) if registry else [],
        "attempted_at": loader.attempted_at,
        "error": error.text if error else None,
        "error_file": error.file if error else None,
        "error_line": error.line if error else None,
        "error_at": error.at if error else None,
    }


class PluginVersions:
    """Numbers and reports one node's plugin versions in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, node: str) -> None:
        self.redis = client
        self.keys = keys
        self.node = node
        self._lock = threading.Lock()

    def next_number(self, last: int) -> int:
        """The number of the next version (``last`` is this process's newest one)."""
        try:
            return int(self.redis.eval(NEXT_NUMBER_LUA, 1, self.keys.plugin_number(self.node),
                                       last))
        except redis.RedisError as e:
            log.warning("cannot reach Redis to number the plugin version (%s); using %d",
                        e, last + 1)
            return last + 1

    def publish(self, loader: PluginLoader) -> None:
        """Write the report now.

        Building and writing happen under one lock, so a heartbeat that read the
        previous version cannot overwrite the report of a reload that just finished.
        """
        with self._lock:
            try:
                self.redis.hset(self.keys.plugins, self.node, json.dumps(plugin_report(loader)))
            except redis.RedisError as e:
                log.debug("cannot publish the plugin report (%s); the heartbeat will", e)
