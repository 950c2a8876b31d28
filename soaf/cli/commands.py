"""The ``soaf`` commands that talk to cores through Redis (``soaf core`` is in soaf/cli/main.py).

Each finds Redis and the secret like a client does (``--redis``/SOAF_REDIS_URL, else
the embedded core's state dir), prints tables on a terminal and plain lines or JSON
(``--json``) elsewhere. A SoafError becomes a one-line ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click

from soaf.cli import offline
from soaf.cli.fleet import services_table
from soaf.cli.logconfig import configure_logging
from soaf.cli.monitor import watch
from soaf.cli.render import (
    console,
    nodes_table,
    plugins_table,
    print_json,
    record_table,
    records_table,
    show,
)
from soaf.cli.templatefile import check_local_inputs, from_options, load_templates
from soaf.client.follow import unique
from soaf.client.sync import Client
from soaf.errors import UnknownService


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--redis``, ``--prefix``, ``--state-dir`` and ``-v``, as every client command has."""
    for option in reversed([
        click.option("--redis", "redis_url", metavar="URL", envvar="SOAF_REDIS_URL",
                     help="Redis the cores use. Env SOAF_REDIS_URL. Default: the embedded "
                          "core's, found in the state dir."),
        click.option("--prefix", envvar="SOAF_PREFIX", help="Redis key prefix. Env SOAF_PREFIX."),
        click.option("--state-dir", type=click.Path(path_type=Path), envvar="SOAF_STATE_DIR",
                     help="Where an embedded core keeps its Redis URL and secret. Default: .soaf"),
        click.option("-v", "--verbose", count=True, help="Log what soaf does (-vv: more)."),
    ]):
        fn = option(fn)
    return fn


def with_client(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the connection options and ``-v``; call ``fn(client, ...)``."""
    return _with_client(fn, history=False)


def with_history(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``with_client`` for the read commands: when no core runs, an embedded core's data
    is opened for the command (soaf.cli.offline)."""
    return _with_client(fn, history=True)


def _with_client(fn: Callable[..., Any], *, history: bool) -> Callable[..., Any]:
    @connection_options
    @functools.wraps(fn)
    def wrapper(redis_url: str | None, prefix: str | None, state_dir: Path | None,
                verbose: int, **kwargs: Any) -> Any:
        configure_logging(verbose)
        opened = offline.history(redis_url, state_dir) if history else nullcontext(False)
        with opened as own, Client(redis_url, prefix=prefix, state_dir=state_dir) as client:
            click.get_current_context().meta[offline.OFFLINE] = own
            return fn(client, **kwargs)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


# -- submit ------------------------------------------------------------------------------------

@click.command()
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-s", "--service", metavar="NAME", help="The service to run (instead of FILE).")
@click.option("-a", "--arg", "args", multiple=True, metavar="KEY=VALUE",
              help="An entry of args; VALUE is read as JSON when it parses (3, true, [1,2]), "
                   "else as text. Repeatable.")
@click.option("-i", "--input", "inputs", multiple=True, metavar="[NAME=]PATH|URL",
              help="An input file (local paths are made absolute); NAME renames it in the "
                   "work dir. Repeatable.")
@click.option("-o", "--output", "outputs", multiple=True, metavar="NAME",
              help="An output file name or glob the program writes. Repeatable.")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE",
              help="An environment variable for the program. Repeatable.")
@click.option("--id", "service_id", help="The service id (default: a new one).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds the program may run.")
@click.option("--retries", type=click.IntRange(min=0), help="Further attempts after a failure.")
@click.option("--watch-interval", type=click.FloatRange(min=0, min_open=True),
              help="Seconds between the handler's file checks.")
@click.option("--work-path", help="A work dir under the work root, shared by templates naming it.")
@click.option("-w", "--wait", "then_wait", is_flag=True,
              help="Then wait for the service(s) like `soaf wait` (exit 1 if one fails).")
@click.option("--no-check", is_flag=True,
              help="Submit even if a local input path does not exist here (it exists only "
                   "on the core's machine).")
@with_client
def submit(client: Client, file: Path | None, service: str | None, args: tuple[str, ...],
           inputs: tuple[str, ...], outputs: tuple[str, ...], env: tuple[str, ...],
           service_id: str | None, timeout: float | None, retries: int | None,
           watch_interval: float | None, work_path: str | None, then_wait: bool,
           no_check: bool) -> None:
    """Submit a service and print its id.

    Either from FILE - a Python file that defines `template` (or `templates`, a list;
    subclasses defined there travel with them) or a JSON file with the template's
    fields, e.g. {"service": "wordcount", "input_files": ["a.txt"], "args": {"delay": 1}}
    (relative paths from the file's directory) - or from options:

    \b
        soaf submit -s wordcount -i examples/data/alpha.txt -a delay=0.5 --wait
    """
    options = (args, inputs, outputs, env, service_id, timeout, retries, watch_interval, work_path)
    if file is not None and (service or any(o not in (None, ()) for o in options)):
        raise click.UsageError("give either FILE or --service with options, not both")
    if file is None and not service:
        raise click.UsageError("give a template FILE or --service NAME")
    if file is not None:
        templates = load_templates(file)
    else:
        templates = [from_options(
            service=service or "", args=args, inputs=inputs, outputs=outputs, env=env,
            service_id=service_id, timeout=timeout, retries=retries,
            watch_interval=watch_interval, work_path=work_path)]
    if not no_check:
        check_local_inputs(templates)
    ids = [client.submit(t) for t in templates]
    for sid in ids:
        click.echo(sid)
    if then_wait:
        records = [client.status(sid) for sid in ids]
        finals = watch(client, records, discover=False, timeout=None, as_json=False,
                       out_stderr=True)
        raise SystemExit(0 if all(r.ok for r in finals) else 1)


# -- reading -------------------------------------------------------------------------------------

@click.command("ls")
@click.option("--state", help="Only services in this state (queued, running, failed ...).")
@click.option("--service", help="Only services of this name.")
@click.option("--node", help="Only services taken by this core.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Newest services shown at most.")
@json_option
@with_history
def ls(client: Client, state: str | None, service: str | None, node: str | None, limit: int,
       as_json: bool) -> None:
    """List services, newest first.

    Columns: id, service, state, progress, ETA (time left), node, age (since submitted), and the
    error or message.
    """
    records = client.list(state=state, service=service, node=node, limit=limit)
    if as_json:
        print_json([r.to_dict() for r in records])
    elif records:
        show(console(), records_table(records))
    else:
        click.echo("no services", err=True)


@click.command()
@click.argument("service_id")
@json_option
@with_history
def status(client: Client, service_id: str, as_json: bool) -> None:
    """Show the record of one service.

    Custom fields set by its handler are marked with *; warnings list callback errors
    (how many, the last one); -v adds the traceback of a plugin or callback error.
    """
    record = client.status(service_id)
    if as_json:
        print_json(record.to_dict())
    else:
        ctx = click.get_current_context()
        show(console(), record_table(record, verbose=ctx.params.get("verbose", 0) > 0))


@click.command()
@click.argument("ids", nargs=-1)
@click.option("-a", "--all", "all_", is_flag=True,
              help="Every service not final now, and those submitted while waiting "
                   "(a running pipeline's next steps).")
@click.option("-f", "--follow", is_flag=True,
              help="With --all: keep watching for new services until Ctrl-C.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after SECONDS (exit 1).")
@json_option
@with_history
def wait(client: Client, ids: tuple[str, ...], all_: bool, follow: bool, timeout: float | None,
         as_json: bool) -> None:
    """Wait for services to end; a progress bar each on a terminal.

    Exit code 0 when all succeeded, 1 when one did not (failed, cancelled, timed out,
    rejected) or the wait timed out. --all --follow watches until Ctrl-C instead of
    ending once nothing runs.
    """
    if not ids and not all_:
        raise click.UsageError("give service ids, or --all")
    if follow and not all_:
        raise click.UsageError("--follow goes with --all")
    records = [client.status(sid) for sid in unique(ids)]
    if all_:
        known = {r.service_id for r in records}
        records += [r for r in reversed(client.list(limit=1000))
                    if not r.final and r.service_id not in known]
    if click.get_current_context().meta.get(offline.OFFLINE):
        running = [r.service_id for r in records if not r.final]
        if running or follow:
            raise offline.running_needed(f"{', '.join(running) or '--follow'} waits for "
                                         "services that are not final")
    finals = watch(client, records, discover=all_, timeout=timeout, as_json=as_json,
                   follow=follow)
    bad = [r for r in finals if r.final and not r.ok]
    if as_json:
        print_json([r.to_dict() for r in finals])
    elif not finals:
        click.echo("nothing to wait for", err=True)
    else:
        counts: dict[str, int] = {}
        for r in finals:
            counts[r.state] = counts.get(r.state, 0) + 1
        warned = sum(1 for r in finals if r.final and r.callback_errors)
        console(stderr=True).print(", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                                   + (f" ({warned} with callback errors: soaf status ID -v)"
                                      if warned else ""))
    raise SystemExit(1 if bad else 0)


@click.command()
@click.argument("service_id")
@click.option("-f", "--follow", is_flag=True, help="Go on printing new lines until the service ends.")
@click.option("-n", "--tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines.")
@click.option("--stderr", "stream", flag_value="stderr", default="stdout",
              help="The program's standard error instead of its standard output.")
@with_history
def logs(client: Client, service_id: str, follow: bool, tail: int | None, stream: str) -> None:
    """Print the output of a service's program.

    It is read from Redis, so this works from any machine; the work-dir file is read
    only when Redis has no copy, on the machine that holds it.
    """
    if follow and click.get_current_context().meta.get(offline.OFFLINE) \
            and not client.status(service_id).final:
        raise offline.running_needed(f"{service_id} is not final")
    for line in client.logs(service_id, tail=tail, follow=follow, stream=stream):
        click.echo(line)


# -- steering --------------------------------------------------------------------------------------

@click.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("-w", "--wait", "then_wait", is_flag=True, help="Wait until they have ended.")
@with_client
def cancel(client: Client, ids: tuple[str, ...], then_wait: bool) -> None:
    """Cancel services: queued ones never start, running ones are stopped."""
    found: list[str] = []
    for sid in unique(ids):
        try:
            click.echo(f"{sid}: {client.cancel(sid)}")
            found.append(sid)
        except UnknownService as e:
            click.echo(f"{sid}: {e}", err=True)
    if then_wait:
        for record in client.as_completed(found):
            click.echo(f"{record.service_id}: {record.state}")
    raise SystemExit(0 if len(found) == len(unique(ids)) else 1)


@click.command()
@json_option
@with_client
def plugins(client: Client, as_json: bool) -> None:
    """Show every core's plugin version, services and last reload error."""
    data = client.plugins()
    alive = {n.get("node") for n in client.nodes()}
    if as_json:
        print_json({node: {**info, "alive": node in alive} for node, info in data.items()})
    elif data:
        show(console(), plugins_table(data, {str(a) for a in alive}))
    else:
        click.echo("no core has reported its plugins yet", err=True)


@click.command()
@json_option
@with_client
def nodes(client: Client, as_json: bool) -> None:
    """Show the cores alive now: host, load (running / slots), labels, the services they
    offer, whether they drain, plugin version and heartbeat age."""
    found = client.nodes()
    if as_json:
        print_json(found)
    elif found:
        show(console(), nodes_table(found))
    else:
        click.echo("no core is alive", err=True)


@click.command()
@json_option
@with_client
def services(client: Client, as_json: bool) -> None:
    """Per service: the live cores that offer it, and how many submissions wait.

    QUEUED waits in its queues (BY PRIORITY: how many at each priority, highest first);
    TAKEN is held by cores (running, or waiting there for CPUs, memory or a slot). A
    service no live core offers shows "none alive": its submissions wait until a core
    that offers it starts.
    """
    rows = client.services()
    if as_json:
        print_json(rows)
    elif rows:
        show(console(), services_table(rows))
    else:
        click.echo("no service is offered or queued", err=True)


@click.command()
@click.option("--node", help="Only this core (default: all).")
@click.option("--timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds to wait for the cores to report the outcome.")
@json_option
@with_client
def reload(client: Client, node: str | None, timeout: float, as_json: bool) -> None:
    """Make cores reload their plugins now.

    Waits for each core to report the outcome; exit 1 if one failed to load them
    (it keeps its last good version) or did not answer.
    """
    targets = [n["node"] for n in client.nodes() if node is None or n.get("node") == node]
    if not targets:
        raise click.ClickException(f"no core {'named ' + node + ' ' if node else ''}is alive")
    before = client.plugins()
    client.reload(node)
    deadline = time.monotonic() + timeout
    after = before
    while time.monotonic() < deadline:
        after = client.plugins()
        if all(_reloaded(before.get(t), after.get(t)) for t in targets):
            break
        time.sleep(0.1)
    results = {t: {**after.get(t, {}), "reloaded": _reloaded(before.get(t), after.get(t))}
               for t in targets}
    if as_json:
        print_json(results)
    failed = 0
    for target, info in results.items():
        if not info["reloaded"]:
            failed += 1
            if not as_json:
                click.echo(f"{target}: no answer within {timeout:g} s", err=True)
        elif info.get("error"):
            failed += 1
            if not as_json:
                click.echo(f"{target}: reload failed, still on {info.get('version')}: "
                           f"{info['error']}", err=True)
        elif not as_json:
            click.echo(f"{target}: plugins version {info.get('version')} "
                       f"({', '.join(info.get('services') or []) or 'no services'})")
    raise SystemExit(1 if failed else 0)


def _reloaded(before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
    """Whether a core reported a load (or a failed one) since ``before`` was read."""
    if after is None:
        return False
    before = before or {}
    return (after.get("loaded_at") != before.get("loaded_at")
            or after.get("error_at") != before.get("error_at"))


COMMANDS = [submit, ls, status, wait, logs, cancel, plugins, nodes, services, reload]
