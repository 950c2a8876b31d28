"""Where a submission waits: per-service, per-priority queues, and references to entries.

A submission is one entry in the stream ``Keys.queue(service, priority)``; the cores that
offer the service read it through the consumer group ``cores``. An entry is named
everywhere (runs, admission, the record's ``entry`` field, acknowledgements) by a
*reference* ``<stream>/<entry id>``: stream ids never contain ``/``, so the last one
splits it. A bare entry id, as older versions wrote, names an entry of the old single
submit stream (``Keys.submit``), so records and pending entries from before an upgrade
keep their meaning.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from soaf.protocol.keys import GROUP, Keys

#: Priorities a template may carry (higher is taken first).
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
#: Seconds of waiting that raise an entry's priority by one when cores choose what to take
#: next (the anti-starvation rule): an entry of priority 0 that has waited ten minutes
#: goes before a fresh one of priority 9.
PRIORITY_AGING = 60.0

_MEMBER = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]{0,127}):(-?\d{1,4})$")


def ref(stream: str, entry_id: str) -> str:
    """The reference of entry ``entry_id`` of ``stream``."""
    return f"{stream}/{entry_id}"


def split_ref(keys: Keys, entry_ref: str) -> tuple[str, str]:
    """(stream, entry id) of a reference; a bare id is an entry of ``keys.submit``."""
    stream, sep, entry_id = entry_ref.rpartition("/")
    return (stream, entry_id) if sep else (keys.submit, entry_id)


def member(service: str, priority: int) -> str:
    """A queue's member in the ``Keys.queues`` set."""
    return f"{service}:{priority}"


def parse_member(value: str) -> tuple[str, int] | None:
    """(service, priority) of a ``Keys.queues`` member, or None for anything else (Redis
    is not trusted: a member someone added by hand is ignored)."""
    found = _MEMBER.match(value)
    if found is None or not MIN_PRIORITY <= int(found.group(2)) <= MAX_PRIORITY:
        return None
    return found.group(1), int(found.group(2))


def finish(pipe: Any, keys: Keys, refs: Iterable[str]) -> None:
    """Queue on ``pipe`` the acknowledgement and deletion of the entries ``refs`` name,
    one XACK and one XDEL per stream."""
    by_stream: dict[str, list[str]] = defaultdict(list)
    for entry_ref in refs:
        stream, entry_id = split_ref(keys, entry_ref)
        by_stream[stream].append(entry_id)
    for stream, ids in by_stream.items():
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def parse_labels(value: str | Iterable[str]) -> frozenset[str]:
    """A core's labels from ``gpu,bigmem`` (or an iterable of names); ValueError naming a
    label that is not letters, digits and ``_.-``."""
    names = value.split(",") if isinstance(value, str) else list(value)
    labels = frozenset(n.strip() for n in names if n.strip())
    for label in sorted(labels):
        if not _LABEL.match(label):
            raise ValueError(f"label {label!r} must be 1-64 letters, digits or '_.-', "
                             "starting with a letter or digit")
    return labels
