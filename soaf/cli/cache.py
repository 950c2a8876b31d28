"""``soaf cache``: list the result cache's entries, or forget them."""

from __future__ import annotations

import click
from rich import box
from rich.table import Table

from soaf.cli.commands import json_option, with_client
from soaf.cli.render import age, console, print_json, show, state_text
from soaf.client.cache import cache_entries, clear_cache
from soaf.client.sync import Client


@click.command()
@click.argument("action", type=click.Choice(["ls", "clear"]), default="ls", required=False)
@click.argument("service", required=False)
@json_option
@with_client
def cache(client: Client, action: str, service: str | None, as_json: bool) -> None:
    """The result cache: which earlier run answers templates with `cache=True` (or of a
    service with `cacheable = True`).

    \b
        soaf cache ls [SERVICE]      the entries, newest first
        soaf cache clear [SERVICE]   forget them (the runs and their outputs stay)

    A plugin change needs no clearing: its digest is part of every key.
    """
    if action == "clear":
        count = clear_cache(client, service)
        if as_json:
            print_json({"cleared": count})
        else:
            click.echo(f"cleared {count} entr{'y' if count == 1 else 'ies'}"
                       + (f" of {service}" if service else ""))
        return
    rows = cache_entries(client, service)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("the result cache is empty", err=True)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("SERVICE", "KEY", "RUN", "STATE", "AGE"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(row["service"], row["key"][:16], row["service_id"],
                      state_text(row["state"]), age(row["at"]))
    show(console(), table)
