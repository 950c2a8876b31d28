"""The live display of ``soaf wait``: on a terminal a progress bar per service; in a
pipe, a file or a terminal too narrow for the bars (or of unknown size) one plain line
per change instead."""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from soaf.cli.render import duration, percent, state_text
from soaf.protocol.state import FINAL_VALUES, ServiceRecord


class WaitDisplay(Protocol):
    def add(self, record: ServiceRecord) -> None: ...
    def event(self, service_id: str, event: dict[str, Any]) -> None: ...
    def warn(self, record: ServiceRecord) -> None: ...
    def close(self) -> None: ...


def _label(record: ServiceRecord) -> str:
    return f"{record.service or '?'} {record.service_id[:12]}"


class InfoColumn(ProgressColumn):
    """The time left until a task's ETA (the ``eta`` field, Unix time; redrawn live, and
    only while there is one), then its message, cut to ``width``."""

    def __init__(self, width: int) -> None:
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis", max_width=width))

    def render(self, task: Task) -> Text:
        text = Text()
        eta = task.fields.get("eta")
        if isinstance(eta, (int, float)) and not task.finished and task.stop_time is None:
            left = eta - time.time()
            text.append(f"ETA {duration(left)} " if left >= 0 else "overdue ", style="dim")
        text.append(str(task.fields.get("info") or ""))
        return text


#: Columns a progress bar line needs without its ETA and message: label (service and id),
#: bar, percentage, state, elapsed time and the gaps. ETA and message get what is left.
BAR_LINE = 67
#: Narrower terminals (or ones whose size is unknown, e.g. under ``script``) get plain lines.
MIN_BAR_WIDTH = BAR_LINE + 5


def bars_fit(out: Console) -> bool:
    """Whether ``out`` is a terminal wide enough for ``LiveDisplay``. A terminal that
    reports no size (0 columns) counts as too narrow, unless COLUMNS says otherwise:
    rich would guess 80 and squeeze the bars."""
    if not out.is_terminal:
        return False
    if not os.environ.get("COLUMNS"):
        try:
            if os.get_terminal_size(out.file.fileno()).columns <= 0:
                return False
        except (AttributeError, ValueError, OSError):
            return False
    return out.width >= MIN_BAR_WIDTH


class LiveDisplay:
    """Progress bars on a terminal: one per service, its state, ETA and message beside it.
    The bar keeps its width; a long message is cut to what the line has left."""

    def __init__(self, out: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=20), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[state]}", table_column=Column(no_wrap=True)),
            TimeElapsedColumn(), InfoColumn(max(10, out.width - BAR_LINE - 1)),
            console=out, transient=False, refresh_per_second=8,
        )
        self.tasks: dict[str, TaskID] = {}
        self.progress.start()

    def add(self, record: ServiceRecord) -> None:
        self.tasks[record.service_id] = self.progress.add_task(
            # rich annotates add_task's completed as int; its Task.completed is a float.
            _label(record), total=1.0, completed=record.progress or 0.0,  # type: ignore[arg-type]
            state=state_text(record.state).markup, info=record.message or "", eta=record.eta)
        if record.final:
            self._final(record.service_id, record.state, record.error)
            self.warn(record)

    def warn(self, record: ServiceRecord) -> None:
        """A final service's callback errors, beside its bar."""
        task = self.tasks.get(record.service_id)
        if task is not None and record.callback_errors:
            self.progress.update(task, info=f"warning: {record.warnings[0]}")

    def event(self, service_id: str, event: dict[str, Any]) -> None:
        task = self.tasks.get(service_id)
        if task is None:
            return
        changes: dict[str, Any] = {}
        if isinstance(event.get("progress"), (int, float)):
            changes["completed"] = event["progress"]
            changes["eta"] = event.get("eta")
        if event.get("message"):
            changes["info"] = str(event["message"])
        if "state" in event:
            changes["state"] = state_text(event["state"]).markup
        if changes:
            self.progress.update(task, **changes)
        if event.get("state") in FINAL_VALUES:
            self._final(service_id, event["state"], event.get("error"))

    def _final(self, service_id: str, state: str, error: Any) -> None:
        task = self.tasks[service_id]
        changes: dict[str, Any] = {"state": state_text(state).markup}
        if state == "succeeded":
            changes["completed"] = 1.0
        elif error:
            changes["info"] = str(error)
        self.progress.update(task, **changes)
        self.progress.stop_task(task)

    def close(self) -> None:
        self.progress.stop()


class PlainDisplay:
    """One line per change, for pipes and files: ``<id> <service> <what>``."""

    #: Progress is reported again once it moved this much (or reached 100%).
    STEP = 0.1

    def __init__(self, out: Console) -> None:
        self.out = out
        self.labels: dict[str, str] = {}
        self.shown: dict[str, float] = {}
        self.states: dict[str, str] = {}

    def _line(self, service_id: str, text: str) -> None:
        # soft_wrap: a narrow terminal wraps the line itself; rich would break it in two
        self.out.print(f"{service_id} {self.labels.get(service_id, '?')} {text}", markup=False,
                       soft_wrap=True)

    def add(self, record: ServiceRecord) -> None:
        self.labels[record.service_id] = record.service or "?"
        self.shown[record.service_id] = record.progress or 0.0
        self.states[record.service_id] = record.state
        if record.final:
            text = f"{record.state}: {record.error}" if record.error else record.state
        elif record.progress is not None:
            text = f"{record.state} {percent(record.progress)}"
        else:
            text = record.state
        self._line(record.service_id, text)
        if record.final:
            self.warn(record)

    def warn(self, record: ServiceRecord) -> None:
        if record.callback_errors:
            self._line(record.service_id, f"warning: {record.warnings[0]}")

    def event(self, service_id: str, event: dict[str, Any]) -> None:
        value = event.get("progress")
        if isinstance(value, (int, float)):
            last = self.shown.get(service_id, 0.0)
            if value - last >= self.STEP or (value >= 1.0 > last):
                self.shown[service_id] = value
                eta = event.get("eta")
                left = (f" (ETA {duration(eta - time.time())})"
                        if isinstance(eta, (int, float)) and value < 1.0 else "")
                self._line(service_id, f"progress {percent(value)}{left}")
        state = event.get("state")
        if state and state != self.states.get(service_id):
            self.states[service_id] = state
            error = event.get("error")
            self._line(service_id, f"{state}: {error}" if error and state in FINAL_VALUES else state)

    def close(self) -> None:
        pass

