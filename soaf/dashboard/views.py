"""How the pages show values: times, progress with an ETA, states; Jinja2 filters.

Everything is returned as plain text; the templates escape it (autoescape is on for
every template, see ``environment``), so a value a program or a user chose can never
become markup.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import jinja2

from soaf.protocol.state import FINAL_VALUES

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def environment() -> jinja2.Environment:
    """The templates, with autoescape on for all of them (not only ``.html``)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.ChainableUndefined)
    env.filters.update(ago=ago, since=since, when=when, duration=duration, percent=percent, eta=eta,
                       tojson_text=tojson_text, size=size, event_text=event_text,
                       records=records, load=load)
    env.globals["FINAL"] = FINAL_VALUES
    return env


def lenient(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` where a missing key reads as None: records, heartbeats and events carry
    only the fields that apply, and a template tests ``is not none``."""
    return collections.defaultdict(lambda: None, values)


def records(value: Any) -> list[dict[str, Any]]:
    """The objects of a list field (attempts, inputs, outputs); nothing for anything else,
    so a record someone edited by hand still renders."""
    return [lenient(v) for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def load(node: dict[str, Any]) -> int:
    """A core's running services as a percentage of its slots (0 for nonsense)."""
    running, slots = node.get("running"), node.get("max_services")
    if not isinstance(running, (int, float)) or not isinstance(slots, (int, float)) or slots <= 0:
        return 0
    return percent(running / slots)


def ago(ts: Any, now: float | None = None) -> str:
    """``"12 s ago"`` for a Unix time; ``""`` for none."""
    return since(ts, now) + " ago" if isinstance(ts, (int, float)) else ""


def since(ts: Any, now: float | None = None) -> str:
    """How long since a Unix time: ``"3 min 4 s"``; ``""`` for none."""
    return duration((now or time.time()) - ts) if isinstance(ts, (int, float)) else ""


def when(ts: Any) -> str:
    """A Unix time as UTC text."""
    if not isinstance(ts, (int, float)):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d} UTC"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def percent(progress: Any) -> int:
    """Progress (0..1) as a whole percentage, clamped; 0 for none."""
    if not isinstance(progress, (int, float)) or progress != progress:
        return 0
    return int(max(0.0, min(1.0, float(progress))) * 100)


def eta(row: dict[str, Any], now: float | None = None) -> str:
    """Time left for a running service, from its progress so far: ``"~12 s left"``."""
    p, since = row.get("progress"), row.get("running_at")
    if row.get("state") != "running" or not isinstance(p, (int, float)) \
            or not isinstance(since, (int, float)) or not 0 < p < 1:
        return ""
    elapsed = (now or time.time()) - since
    return f"~{duration(elapsed * (1 - p) / p)} left"


#: Event keys the timeline leaves out: shown otherwise (state, time) or internal.
EVENT_HIDDEN = frozenset({"seq", "ts", "attempt", "state", "event_id", "journal"})


def event_text(event: dict[str, Any]) -> str:
    """What an event changed, in one line: ``progress=40% message=...`` (custom fields by
    their own names; the ``*_at`` times, equal to the event's own, left out).
    static/live.js formats live events the same way."""
    parts = []
    for key, value in sorted(event.items()):
        if key in EVENT_HIDDEN or key.endswith("_at"):
            continue
        name = key.removeprefix("f:")
        if key == "progress" and isinstance(value, (int, float)):
            text = f"{percent(value)}%"
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
        parts.append(f"{name}={text}")
    return " ".join(parts)


def tojson_text(value: Any) -> str:
    """A value as indented JSON text (for display, escaped by the template)."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def size(n: Any) -> str:
    if not isinstance(n, int):
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
