"""What ``Client`` and ``AsyncClient`` share: one constructor, so they take the same
arguments and find Redis, the keys and the limits the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Generic, TypeVar

from soaf.client import calls
from soaf.client.calls import DEFAULT_RECONNECT_FOR

#: The redis-py client class of a flavour (sync or asyncio).
R = TypeVar("R")
#: The notify-channel listener of a flavour (soaf.client.listener).
L = TypeVar("L")


class ClientBase(Generic[R, L]):
    """Where Redis is and how to reach it; ``_connect`` opens a connection of the flavour,
    ``_listen`` makes the (not yet connected) listener its waits share."""

    #: The connection name prefix shown by CLIENT LIST.
    client_name = "soaf-client"

    def __init__(
        self,
        url: str | None = None,
        *,
        secret: str | None = None,
        prefix: str | None = None,
        state_dir: str | Path | None = None,
        reconnect_for: float = DEFAULT_RECONNECT_FOR,
        max_payload: int | None = None,
    ) -> None:
        self._target = calls.target(url, prefix=prefix, state_dir=state_dir,
                                    max_payload=max_payload)
        self.url, self.keys = self._target.url, self._target.keys
        self.max_payload = self._target.max_payload
        self.reconnect_for = reconnect_for
        self._secret = secret
        self.redis: R = self._connect(self.url, blocking=False, name=self.client_name)
        self._blocking: R = self._connect(self.url, blocking=True,
                                          name=f"{self.client_name}-wait")
        self._listener: L = self._listen()

    def _connect(self, url: str, *, blocking: bool, name: str) -> R:
        raise NotImplementedError

    def _listen(self) -> L:
        raise NotImplementedError
