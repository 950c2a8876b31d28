"""Following services until they end while a display shows them: the engine of ``soaf wait``.

It reads each service's record, hands it to the display, then follows the event
streams (``Client.follow``) from exactly those records, so no change is missed. With
``discover`` it also picks up services submitted while it waits (the next steps of a
running pipeline): it looks once a second, showing each followed service's newest
record then, and lingers a little once all it saw are final; with ``follow`` as well, it
never stops on its own (until Ctrl-C, or its timeout).
"""

from __future__ import annotations

import time
from typing import Any

from soaf.cli.live import LiveDisplay, PlainDisplay, WaitDisplay, bars_fit
from soaf.cli.render import console
from soaf.client.follow import is_final
from soaf.client.sync import Client
from soaf.errors import WaitTimeout
from soaf.protocol.state import ServiceRecord

#: How often ``wait --all`` looks for new submissions, in seconds.
DISCOVER_EVERY = 1.0
#: Seconds ``wait --all`` goes on looking for new submissions once all it saw are final,
#: so the next step of a pipeline that is being submitted right now is not missed.
LINGER = 2.0


def watch(client: Client, records: list[ServiceRecord], *, discover: bool,
          timeout: float | None, as_json: bool, out_stderr: bool = False,
          follow: bool = False) -> list[ServiceRecord]:
    """Show services until they are final (and, with ``discover``, new ones too; with
    ``follow``, until Ctrl-C); their records in the order they were first seen."""
    out = console(stderr=out_stderr)
    display: WaitDisplay
    if as_json:
        display = _Quiet()
    elif bars_fit(out):
        display = LiveDisplay(out)
    else:
        display = PlainDisplay(out)
    try:
        return _follow(client, records, display, discover=discover, timeout=timeout,
                       follow=follow)
    finally:
        display.close()


class _Quiet:
    def add(self, record: ServiceRecord) -> None: ...
    def event(self, service_id: str, event: dict[str, Any]) -> None: ...
    def warn(self, record: ServiceRecord) -> None: ...
    def close(self) -> None: ...


def _follow(client: Client, records: list[ServiceRecord], display: WaitDisplay, *,
            discover: bool, timeout: float | None, follow: bool = False) -> list[ServiceRecord]:
    deadline = None if timeout is None else time.monotonic() + timeout
    known: dict[str, ServiceRecord] = {}

    def add(record: ServiceRecord) -> None:
        known[record.service_id] = record
        display.add(record)

    for record in records:
        add(record)
    try:
        _loop(client, display, known, add, discover=discover, deadline=deadline,
              timeout=timeout, follow=follow)
    except KeyboardInterrupt:
        if not follow:
            raise
    return list(known.values())


def _loop(client: Client, display: WaitDisplay, known: dict[str, ServiceRecord],
          add: Any, *, discover: bool, deadline: float | None, timeout: float | None,
          follow: bool) -> None:
    since = time.time()
    linger_until: float | None = None
    while True:
        if discover:
            for record in reversed(client.list(since=since - 1, limit=1000)):
                if record.service_id not in known:
                    add(record)
                    since = max(since, record.get("submitted_at") or since)
        pending = [r for r in known.values() if not r.final]
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise WaitTimeout(f"{len(pending)} service(s) not final after {timeout:g} s: "
                              + ", ".join(r.service_id for r in pending[:5]))
        if not pending:
            if not discover:
                break
            linger_until = linger_until or now + LINGER
            if now >= linger_until and not follow:
                break
            time.sleep(DISCOVER_EVERY if now >= linger_until else min(0.2, linger_until - now))
            continue
        linger_until = None
        limits = [x for x in (DISCOVER_EVERY if discover else None,
                              None if deadline is None else deadline - now) if x is not None]
        try:
            for sid, event in client.follow(pending, timeout=min(limits) if limits else None):
                display.event(sid, event)
                if is_final(event):
                    known[sid] = client.status(sid)
                    display.warn(known[sid])
        except WaitTimeout:
            for record in pending:  # pick up where the stream is now
                if not known[record.service_id].final:
                    fresh = client.status(record.service_id)
                    if fresh.state != record.state or fresh.final:
                        display.event(fresh.service_id, {"state": fresh.state, "error": fresh.error,
                                                         "progress": fresh.progress})
                        if fresh.final:
                            display.warn(fresh)
                    known[fresh.service_id] = fresh
