"""How the ``soaf`` command shows things: tables and records (the live display of
``wait`` is in soaf.cli.live).

Everything goes through rich, which colours only when the output is a terminal (and
never with NO_COLOR set).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from soaf.cli.fleet import ROUTING_COLUMNS, routing_cells
from soaf.protocol.state import ServiceRecord

STATE_STYLES = {
    "queued": "dim", "building": "cyan", "preparing": "cyan", "running": "blue",
    "succeeded": "green", "failed": "bold red", "cancelled": "yellow", "timed_out": "red",
    "rejected": "bold red", "lost": "magenta",
}
#: Width of tables printed to a pipe or file, where there is no terminal to measure.
PLAIN_WIDTH = 200


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(file=stream, highlight=False, soft_wrap=not tty,
                   width=None if tty else PLAIN_WIDTH)


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def age(ts: Any, now: float | None = None) -> str:
    """``3s``, ``5m``, ``2h``, ``4d``: how long ago ``ts`` (epoch seconds) was."""
    if not isinstance(ts, (int, float)):
        return "-"
    return duration((now or time.time()) - ts)


def duration(seconds: float) -> str:
    """``3s``, ``5m``, ``2h``, ``4d``: a span of time in its largest whole unit."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def eta_text(record: ServiceRecord, now: float | None = None) -> str:
    """The time left until the record's ETA (``1m``), ``overdue`` once it passed, ``-``
    when there is none (final, or no rate known yet)."""
    eta = record.eta
    if eta is None:
        return "-"
    left = eta - (now or time.time())
    return duration(left) if left >= 0 else "overdue"


def when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return f"{datetime.fromtimestamp(ts).isoformat(sep=' ', timespec='milliseconds')} ({age(ts)} ago)"


def percent(progress: Any) -> str:
    return f"{progress:.0%}" if isinstance(progress, (int, float)) else "-"


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def show(out: Console, renderable: Any) -> None:
    """Print a table; to a pipe or file without the padding at the ends of lines."""
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    out.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in columns:
        table.add_column(name, no_wrap=name in ("ID", "NODE", "STATE"))
    return table


def records_table(records: list[ServiceRecord]) -> Table:
    table = _table("ID", "SERVICE", "STATE", "PROGRESS", "ETA", "NODE", "AGE", "INFO")
    now = time.time()
    for r in records:
        waits = r.get("waiting_for") if r.state == "queued" else None
        info = r.error if r.error and not r.ok else (r.message or (f"waits: {waits}" if waits else ""))
        if r.callback_errors and not (r.error and not r.ok):
            info = f"warning: {r.warnings[0]}"
        table.add_row(r.service_id, r.service or "-", state_text(r.state), percent(r.progress),
                      eta_text(r, now), r.node or "-", age(r.get("submitted_at"), now), info)
    return table


def size(n: Any) -> str:
    """A byte count in the unit that reads best."""
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _files(items: list[dict[str, Any]], *, outputs: bool) -> str | None:
    """One line per input or output file: name, size, and its digest and copy or source."""
    lines = []
    for f in items:
        parts = [str(f.get("name")), size(f.get("size"))]
        if outputs:
            parts.append(f"sha256 {str(f.get('sha256') or '-')[:16]}")
            if f.get("url"):
                parts.append(f"-> {f['url']}")
        elif f.get("source"):
            parts.append(f"<- {f.get('resolved') or f['source']}")
        lines.append("  ".join(parts))
    return "\n".join(lines) or None


def _attempts(attempts: Any) -> str | None:
    lines = []
    for a in attempts if isinstance(attempts, list) else []:
        wall = f", {a['wall_time']:.1f} s" if isinstance(a.get("wall_time"), (int, float)) else ""
        why = f" ({a['failure']})" if a.get("failure") else ""
        lines.append(f"#{a.get('attempt')} {a.get('state')}{why} on {a.get('node')}{wall}")
    return "\n".join(lines) or None


def record_table(record: ServiceRecord, *, verbose: bool = False) -> Table:
    """One record as ``field value`` lines: what ran (command, pid, files), what it cost,
    how it ended (attempts, warnings), then the handler's custom fields."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    r = record
    command = r.get("command")
    pid = r.get("pid")
    if r.get("shim_pid"):
        pid = f"{pid or '?'} (shim {r.get('shim_pid')})"
    peak = r.get("max_rss_kb")
    rows: list[tuple[str, Any]] = [
        ("id", r.service_id), ("service", r.service), ("state", state_text(r.state)),
        ("progress", percent(r.progress) if r.progress is not None else None),
        ("message", r.message), ("error", r.error), ("node", r.node),
        ("attempt", r.attempt or None), ("plugin version", r.plugin_version),
        ("command", shlex.join(map(str, command)) if isinstance(command, list) else command),
        ("pid", pid), ("exit code", r.exit_code), ("signal", r.get("signal")),
        ("stopped with", r.get("stopped_with")), ("work dir", r.get("work_dir")),
        ("inputs", _files(r.inputs, outputs=False)), ("outputs", _files(r.outputs, outputs=True)),
        ("output target", r.get("output_target")), ("cached from", r.get("cached_from")),
    ]
    for name in ("submitted", "building", "preparing", "running", "finished"):
        ts = r.get(f"{name}_at")
        if ts is not None:
            rows.append((name, when(ts)))
    if r.get("wall_time") is not None:
        rows.append(("wall time", f"{r.get('wall_time'):.3f} s"))
    if r.get("cpu_time") is not None:
        rows.append(("cpu time", f"{r.get('cpu_time'):.3f} s"))
    if isinstance(peak, (int, float)):
        rows.append(("peak memory", size(peak * 1024)))
    rows += [("attempts", _attempts(r.get("attempts"))),
             ("warnings", "\n".join(r.warnings) or None)]
    for key, value in sorted(r.fields.items()):
        rows.append((f"{key} *", value if isinstance(value, str) else json.dumps(value)))
    if verbose and r.traceback:
        rows.append(("traceback", r.traceback.rstrip()))
    if verbose and r.get("callback_traceback"):
        rows.append(("callback traceback", str(r.get("callback_traceback")).rstrip()))
    for name, value in rows:
        if value is not None and value != "":
            table.add_row(name, value if isinstance(value, Text) else str(value))
    return table


def capacity(used: Any, total: Any, unit: str = "") -> str:
    """``used/total (free)`` of a core's CPUs or memory; ``-`` when it does not say."""
    if not isinstance(total, (int, float)) or not isinstance(used, (int, float)):
        return "-"
    return f"{used:g}/{total:g}{unit} ({max(0.0, total - used):g} free)"


def nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = _table("NODE", "HOST", "PID", "LOAD", *ROUTING_COLUMNS, "CPUS", "MEMORY", "PLUGINS",
                   "UP", "HEARTBEAT", "REDIS", "STATE")
    now = time.time()
    for n in nodes:
        state = Text("draining", style="yellow") if n.get("draining") else Text("accepting")
        table.add_row(str(n.get("node")), str(n.get("host", "-")), str(n.get("pid", "-")),
                      f"{n.get('running', 0)}/{n.get('max_services', '?')}"
                      + (f" +{n['waiting']} waiting" if n.get("waiting") else ""),
                      *routing_cells(n),
                      capacity(n.get("cpus_used"), n.get("cpus")),
                      capacity(n.get("memory_mb_used"), n.get("memory_mb"), " MiB"),
                      str(n.get("plugin_version") or "-"), age(n.get("started_at"), now),
                      f"{age(n.get('ts'), now)} ago",
                      "ok" if n.get("redis_connected", True) else Text("lost", style="red"),
                      state)
    return table


def plugins_table(plugins: dict[str, Any], alive: set[str]) -> Table:
    table = _table("NODE", "ALIVE", "VERSION", "LOADED", "SERVICES", "LAST ERROR")
    now = time.time()
    for node, info in sorted(plugins.items()):
        error = info.get("error")
        table.add_row(node, "yes" if node in alive else Text("no", style="dim"),
                      str(info.get("version") or "-"), f"{age(info.get('loaded_at'), now)} ago",
                      ", ".join(info.get("services") or []) or "-",
                      Text(f"{error} ({age(info.get('error_at'), now)} ago)", style="red")
                      if error else "")
    return table


# -- soaf wait --------------------------------------------------------------------------------
