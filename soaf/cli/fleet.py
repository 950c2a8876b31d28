"""The fleet view: ``soaf services`` and what ``soaf nodes`` shows of routing.

``soaf nodes`` lists each live core (render.nodes_table); the cells about routing (its
labels, the services it offers) come from ``routing_cells`` here.
``soaf services`` lists, per service name, the live cores that offer it and how many
submissions wait in its queues (by priority) or are held by cores.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

#: The headers of ``routing_cells``, in order (whether a core drains is the nodes table's
#: last column, STATE).
ROUTING_COLUMNS = ("LABELS", "SERVICES")
#: Offered services named in the nodes table; more are counted (``--json`` has them all).
SHOWN_SERVICES = 6


def routing_cells(node: dict[str, Any]) -> tuple[str, str]:
    """A core's labels and offered services, for the nodes table."""
    services = [str(s) for s in node.get("services") or []]
    shown = ", ".join(services[:SHOWN_SERVICES])
    if len(services) > SHOWN_SERVICES:
        shown += f" +{len(services) - SHOWN_SERVICES} more"
    return ", ".join(node.get("labels") or []) or "-", shown or "-"


def services_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("SERVICE", "CORES", "QUEUED", "TAKEN", "BY PRIORITY"):
        table.add_column(name, no_wrap=name == "SERVICE")
    for row in rows:
        cores = ", ".join(str(c) for c in row["cores"])
        by_priority = ", ".join(f"{p}: {n}" for p, n in
                                sorted(row["by_priority"].items(), key=lambda i: -int(i[0])))
        table.add_row(row["service"], cores or Text("none alive", style="red"),
                      str(row["queued"]), str(row["taken"]), by_priority or "-")
    return table
