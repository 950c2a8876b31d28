"""When an entry is a replay: a captured signed payload pushed into a queue again.

A payload is signed with its time (``signed_at``, inside the pickle), and Redis, not
the writer, stamps each stream entry with the time it was added (its id). Client.submit
(and a plain XADD right after ``soaf.dumps``) adds the entry within moments of signing,
so an entry added much later is a replay, whatever its record says. An entry a core
moves (back to its queue, or from the old submit stream) carries the core's signed
``requeue`` (soaf.protocol.signed) and counts from then. The claim adds the other rule
(soaf.core.launcher): with no record, a payload older than the max payload age, or
with no time at all, is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from soaf.protocol.keys import REQUEUE_FIELD
from soaf.protocol.signed import sign_control, signed_at
from soaf.protocol.template import ServiceParamTemplate


def signed_time(template: ServiceParamTemplate) -> float | None:
    """The time the payload was signed (``signed_at`` from the instance dict, so no
    property runs), or None when it has none or it is not a finite number."""
    try:
        value = vars(template).get("signed_at")
    except TypeError:  # no instance dict
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(value) else None


def added_at(entry_id: str) -> float | None:
    """When Redis added a stream entry (the milliseconds of its id), in Unix seconds."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) / 1000 if ms.isdigit() and seq.isdigit() else None


def added_late(entry_id: str, fields: dict[bytes, bytes], template: ServiceParamTemplate, *,
               secrets: Sequence[str], max_delay: float) -> str | None:
    """Why an entry was added too long after its payload (or its last requeue) was
    signed, else None."""
    added = added_at(entry_id)
    if max_delay <= 0 or added is None:
        return None
    requeued = signed_at(fields.get(REQUEUE_FIELD.encode()), "requeue", template.service_id,
                         secrets)
    since = requeued if requeued is not None else signed_time(template)
    if since is None or added - since <= max_delay:
        return None  # an older client's payload has no time: the claim judges it
    return (f"entry added {added - since:.0f} s after its payload was signed (max submit delay "
            f"{max_delay:g} s): refused as a replay of a captured payload; submit it again "
            "(if the submitting host's clock is that far behind Redis's, fix the clock or "
            "raise SOAF_MAX_SUBMIT_DELAY)")


def requeue_field(service_id: str, secrets: Sequence[str]) -> dict[str, str]:
    """The field a core adds to an entry it moves, so it counts from now."""
    return {REQUEUE_FIELD: sign_control("requeue", service_id, secrets[0])} if secrets else {}
