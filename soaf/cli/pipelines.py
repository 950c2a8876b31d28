"""``soaf pipelines``: the named pipelines recorded in Redis, and stopping one of them."""

from __future__ import annotations

from typing import Any

import click
from rich import box
from rich.table import Table

from soaf.cli.commands import json_option, with_client
from soaf.cli.render import age, console, percent, print_json, show, state_text
from soaf.client.ledger import cancel_pipeline, describe, list_pipelines
from soaf.client.sync import Client
from soaf.errors import PipelineError


@click.command()
@click.argument("action", required=False, default="list",
                type=click.Choice(["list", "show", "cancel"]))
@click.argument("name", required=False)
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Most recently active pipelines listed at most.")
@json_option
@with_client
def pipelines(client: Client, action: str, name: str | None, limit: int, as_json: bool) -> None:
    """Named pipelines (Pipeline(client, name=...)) and the state of each step.

    \b
        soaf pipelines               every pipeline, most recently active first
        soaf pipelines show NAME     the steps of one
        soaf pipelines cancel NAME   cancel its running steps; its script submits no more

    Running a cancelled pipeline's script again starts a new run, which submits the
    cancelled steps again.
    """
    if action == "list":
        if name is not None:
            raise click.UsageError(f"`list` takes no name; did you mean `show {name}`?")
        found = list_pipelines(client, limit=limit)
        if as_json:
            print_json(found)
        elif found:
            show(console(), steps_table(found))
        else:
            click.echo("no named pipelines", err=True)
        return
    if name is None:
        raise click.UsageError(f"`{action}` needs the pipeline's NAME")
    if action == "cancel":
        done = cancel_pipeline(client, name)
        if as_json:
            print_json([{"step": step, "result": verdict} for step, verdict in done])
            return
        for step, verdict in done:
            click.echo(f"{step}: {verdict}")
        click.echo(f"pipeline {name!r} cancelled ({len(done)} running step(s) stopped)")
        return
    one = describe(client, name)
    if one is None:
        raise PipelineError(f"no pipeline named {name!r}; `soaf pipelines` lists them")
    if as_json:
        print_json(one)
    else:
        show(console(), steps_table([one]))


def steps_table(found: list[dict[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("PIPELINE", "STEP", "SERVICE", "STATE", "PROGRESS", "ID", "AGE"):
        table.add_column(column, no_wrap=column in ("ID", "STATE"))
    for p in found:
        name = p["name"] + (" (cancelled)" if p["cancelled"] else "")
        if not p["steps"]:
            table.add_row(name, "-", "-", "no steps", "-", "-", "-")
        for i, s in enumerate(p["steps"]):
            table.add_row(name if i == 0 else "", s["step"], s["service"] or "-",
                          state_text(s["state"]), percent(s["progress"]), s["service_id"],
                          age(p["updated_at"]) if i == 0 else "")
    return table
