"""Which cancel requests a core believes: those signed with one of its secrets.

Anyone who can write to Redis can add an entry to the cancels hash or a message to the
control stream; only a holder of the secret can sign one (soaf.protocol.signed). The
heartbeat (cancels of running services), the launcher and the takeover (cancels of a
service about to start) and the control thread all ask a ``Verifier``; what fails is
ignored with a log line at most once a minute per kind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from soaf.core.ratelog import RateLimitedLog
from soaf.protocol.keys import Keys
from soaf.protocol.signed import check_control

log = logging.getLogger(__name__)


class Verifier:
    """Checks signed control values against the core's secrets."""

    def __init__(self, secrets: Sequence[str | bytes], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.secrets = list(secrets)
        self._log = RateLimitedLog(log, clock=clock)

    def ok(self, value: Any, kind: str, target: str, *, where: str) -> bool:
        """Whether ``value`` signs (``kind``, ``target``); a refusal is logged."""
        why = check_control(value, kind, target, self.secrets)
        if why is None:
            return True
        self._log.warning(f"{where}:{kind}", "ignored a %s for %r in %s: %s (logged at "
                          "most once a minute)", kind, target[:80], where, why)
        return False

    def cancel_entries(self, client: redis.Redis, keys: Keys, ids: list[str]) -> list[str]:
        """For each id, its cancels-hash entry if it is a valid signed cancel, else ''."""
        if not ids:
            return []
        try:
            values = client.hmget(keys.cancels, ids)
        except redis.ResponseError:  # not a hash (tampered): no cancel; the first script to meet it drops it
            return [""] * len(ids)
        if not isinstance(values, list):
            return [""] * len(ids)
        return [v.decode() if isinstance(v, bytes) and self.ok(v, "cancel", sid,
                                                                 where="the cancels hash")
                else "" for sid, v in zip(ids, values)]
