"""How a Lua script is called: by its SHA1, its text sent only when Redis lacks it."""

from __future__ import annotations

import hashlib
from typing import Any

import redis


class Script:
    """A Lua script called by its SHA1 (EVALSHA), so its text crosses the wire once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def call(self, target: Any, keys: list[str], args: list[Any]) -> Any:
        """Queue (on a pipeline) or run (on a client) the script."""
        return target.evalsha(self.sha, len(keys), *keys, *args)

    def run(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        """Run on a client; load the script first if Redis does not know it."""
        try:
            return self.call(client, keys, args)
        except redis.exceptions.NoScriptError:
            return client.eval(self.text, len(keys), *keys, *args)

    def load(self, client: redis.Redis) -> None:
        client.script_load(self.text)


def is_noscript(result: Any) -> bool:
    return isinstance(result, redis.exceptions.NoScriptError)
