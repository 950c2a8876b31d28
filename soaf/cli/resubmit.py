"""``soaf resubmit``: run a service's template again, under a new id.

The template comes back from the signed payload ``Client.submit`` keeps beside each
record (``soaf:payload:{<id>}``, aging with the record), verified like a core verifies
it: the same service, arguments, inputs and extra fields, for a run that failed for a
reason since fixed, or one to repeat.
"""

from __future__ import annotations

import click

from soaf.cli.commands import with_client
from soaf.client.follow import unique
from soaf.client.sync import Client
from soaf.errors import SoafError


@click.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("-w", "--wait", "then_wait", is_flag=True,
              help="Wait until the new services have ended; exit 1 if one did not succeed.")
@with_client
def resubmit(client: Client, ids: tuple[str, ...], then_wait: bool) -> None:
    """Submit each service's template again under a new id; print "OLD NEW" per service.

    Exits 1 if a service could not be resubmitted (no payload kept: submitted by a plain
    XADD, or its record expired; or its template's class cannot be imported here) or,
    with --wait, if a new one did not succeed."""
    made: list[str] = []
    for sid in unique(ids):
        try:
            new = client.resubmit(sid)
        except SoafError as e:
            click.echo(f"{sid}: {e}", err=True)
            continue
        made.append(new)
        click.echo(f"{sid} {new}")
    ok = len(made) == len(unique(ids))
    if then_wait:
        for record in client.as_completed(made):
            click.echo(f"{record.service_id}: {record.state}")
            ok = ok and record.ok
    raise SystemExit(0 if ok else 1)
