"""Control messages: what clients ask of running cores through the control stream.

``cancel`` (a service by id) and ``reload`` (the plugins), each for every core or for the
one named in ``node``. Messages are read from the newest one that existed when the core
started (``Control.start_from``), so none sent after that is missed, however late the
thread first reads. A message is acted on only if its ``sig`` verifies (see
soaf.protocol.signed); unsigned and forged messages, and unknown types (an older core
ignores what a newer client sends), are skipped with a log line at most once a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from soaf.core.cancels import Verifier
from soaf.core.ratelog import RateLimitedLog
from soaf.protocol.keys import Keys
from soaf.protocol.replies import entries, stream_entries

log = logging.getLogger(__name__)

#: Milliseconds one read of the control stream blocks.
READ_BLOCK_MS = 1000


class Control:
    """The control thread of one core (``loop``)."""

    def __init__(self, blocking: redis.Redis, keys: Keys, node: str, *,
                 cancel: Callable[[str], object], reload: Callable[[], object],
                 stopping: threading.Event, verifier: Verifier,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.blocking = blocking
        self.keys = keys
        self.node = node
        self.cancel = cancel
        self.reload = reload
        self.stopping = stopping
        self.last = "0-0"
        self.verifier = verifier
        self._errors = RateLimitedLog(log, clock=clock)

    def start_from(self, client: redis.Redis) -> None:
        """Read only messages newer than the newest one in the stream now."""
        newest = entries(client.xrevrange(self.keys.control, count=1))
        self.last = newest[0][0] if newest else "0-0"

    def loop(self) -> None:
        while not self.stopping.is_set():
            try:
                resp = self.blocking.xread({self.keys.control: self.last}, count=100,
                                           block=READ_BLOCK_MS)
            except redis.RedisError:
                self.stopping.wait(1.0)
                continue
            except Exception:  # e.g. the control stream is not a stream
                self._errors.exception("read", "cannot read the control stream")
                self.stopping.wait(1.0)
                continue
            for entry_id, fields in stream_entries(resp):
                self.last = entry_id
                try:
                    self.handle(fields)
                except Exception:
                    self._errors.exception("handle", "control message %s failed", entry_id)

    def handle(self, fields: dict[bytes, bytes]) -> None:
        kind = fields.get(b"type", b"").decode(errors="replace")
        target = fields.get(b"node", b"").decode(errors="replace")
        if target and target != self.node:
            return
        sig = fields.get(b"sig")
        if kind == "cancel":
            sid = fields.get(b"id", b"").decode(errors="replace")
            if self.verifier.ok(sig, "cancel", sid, where="the control stream"):
                self.cancel(sid)
        elif kind == "reload":
            if self.verifier.ok(sig, "reload", target, where="the control stream"):
                self.reload()
        else:
            self._errors.warning("unknown", "ignored a control message of unknown type %r "
                                 "(logged at most once a minute)", kind[:80])
