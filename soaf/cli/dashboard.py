"""``soaf dashboard``: the web dashboard and HTTP API (soaf.dashboard), as a process."""

from __future__ import annotations

from pathlib import Path

import click

from soaf.cli.commands import connection_options
from soaf.cli.logconfig import configure_logging
from soaf.errors import SoafError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="SOAF_DASHBOARD_HOST",
              help="Address to listen on. Env SOAF_DASHBOARD_HOST.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8765, show_default=True,
              envvar="SOAF_DASHBOARD_PORT", help="Port to listen on. Env SOAF_DASHBOARD_PORT.")
@connection_options
def dashboard(host: str, port: int, redis_url: str | None, prefix: str | None,
              state_dir: Path | None, verbose: int) -> None:
    """Serve the web dashboard and the HTTP API (/api) until Ctrl-C.

    Reading needs nothing. Cancel, resubmit, reload and POST /api/submit need the token
    SOAF_DASHBOARD_TOKEN (made and printed here when unset): sign in with it in the
    browser, or send 'Authorization: Bearer <token>'. Submitting signs templates with
    the cores' key (SOAF_SECRET, or the embedded core's state dir). Needs soaf[dashboard].
    """
    configure_logging(max(verbose, 1))
    try:
        from soaf.dashboard import server
    except ImportError as e:
        raise click.ClickException(f"the dashboard needs its extra ({e}): "
                                   "pip install 'soaf[dashboard]'")
    token = server.token_from_env()
    if token.generated:
        click.echo(f"SOAF_DASHBOARD_TOKEN was unset; this run's token: {token.value}", err=True)
    where = f"http://{host}:{port}/" if port else f"{host}, on a free port (named below)"
    click.echo(f"dashboard on {where} (API: /api, OpenAPI: /api/openapi.json)", err=True)
    try:
        server.serve(host=host, port=port, token=token.value, url=redis_url, prefix=prefix,
                     state_dir=state_dir)
    except SoafError as e:
        raise click.ClickException(str(e))
