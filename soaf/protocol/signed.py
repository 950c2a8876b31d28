"""Signed control values: the proof that a cancel or a reload comes from a holder of the
secret.

A control message on the control stream and an entry of the cancels hash carry ``sig``,
a signed envelope (soaf.protocol.codec, the one payloads use) around a small JSON body::

    {"target":"<service id, or the node name ('' for all) of a reload>","ts":<unix time>,"type":"cancel"}

(keys sorted, no spaces). A core acts on a message only if the envelope verifies with
one of its secrets and the body names the message's own type and target, so a
signature cannot be moved from one service to another or from a cancel to a reload.

A core that puts a submission back into the stream (for a core with more capacity)
signs a ``requeue`` of the service id the same way: the new entry is then judged by the
time of the requeue, not by the time the payload was signed (soaf.core.intake).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from soaf.errors import SoafError
from soaf.protocol.codec import sign, verify

#: Largest signed control value read (a body is well under 1 KiB).
MAX_SIGNED = 4096


def control_body(kind: str, target: str, ts: float) -> bytes:
    """The bytes a control value signs."""
    return json.dumps({"type": kind, "target": target, "ts": round(ts, 3)},
                      sort_keys=True, separators=(",", ":")).encode()


def sign_control(kind: str, target: str, secret: str | bytes, *,
                 now: float | None = None) -> str:
    """The ``sig`` of a control message or cancels-hash entry."""
    body = control_body(kind, target, time.time() if now is None else now)
    return sign(body, secret).decode()


def check_control(value: Any, kind: str, target: str, secrets: Sequence[str | bytes]
                  ) -> str | None:
    """None when ``value`` is a valid signature of (``kind``, ``target``); else why not."""
    why, _ts = _checked(value, kind, target, secrets)
    return why


def signed_at(value: Any, kind: str, target: str, secrets: Sequence[str | bytes]
              ) -> float | None:
    """When ``value`` was signed, if it is a valid signature of (``kind``, ``target``)."""
    why, ts = _checked(value, kind, target, secrets)
    return ts if why is None else None


def _checked(value: Any, kind: str, target: str, secrets: Sequence[str | bytes]
             ) -> tuple[str | None, float | None]:
    if value is None or value == b"" or value == "":
        return "unsigned", None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        return "unsigned", None
    try:
        body = json.loads(verify(value, secrets, max_size=MAX_SIGNED))
    except (SoafError, ValueError) as e:
        return f"bad signature ({e})", None
    if not isinstance(body, dict) or body.get("type") != kind or body.get("target") != target:
        return "signed for another message", None
    ts = body.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts):
        return None, float(ts)
    return None, None
