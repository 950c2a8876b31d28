"""``soaf info``: where the cores' Redis and signing key are, and how a plain script gets them.

An embedded core writes its Redis URL (password included) to ``<state dir>/redis.url``
and its key to ``<state dir>/secret``; this says so, with the key's id (never the key)
and the lines a redis-py script needs. With no core running it reads the embedded data
like the other read commands (soaf.cli.offline).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from soaf.cli import offline
from soaf.cli.commands import json_option, with_history
from soaf.cli.render import print_json
from soaf.client.sync import Client
from soaf.config import INSECURE_SECRET, SECRET_FILE, URL_FILE, find_secrets, state_dir_from_env
from soaf.protocol.codec import key_id
from soaf.protocol.connection import redact


def _secret_source(state: Path) -> tuple[str, str]:
    """Where the signing key comes from, and a redis-py line that reads it."""
    if os.environ.get("SOAF_SECRET", "").strip():
        return "SOAF_SECRET", 'secret = os.environ["SOAF_SECRET"].split(",")[0].strip()'
    path = os.environ.get("SOAF_SECRET_FILE", "").strip()
    if path:
        return path, f"secret = open({path!r}).readline().strip()"
    file = (state / SECRET_FILE).resolve()
    if file.exists():
        return str(file), f"secret = open({str(file)!r}).read().strip()"
    return "the well-known insecure key (SOAF_INSECURE)", f"secret = {INSECURE_SECRET!r}"


def describe(client: Client, state: Path, *, opened: bool) -> dict[str, Any]:
    keys = find_secrets(state)
    source, line = _secret_source(state)
    from_env = bool(os.environ.get("SOAF_REDIS_URL", "").strip())
    url_file = (state / URL_FILE).resolve()
    if opened:
        cores = ("none running: this command opened the embedded data itself (the URL "
                 "file exists while a core runs)")
    else:
        cores = ", ".join(str(n.get("node")) for n in client.nodes()) or "none alive"
    return {
        "redis_url": redact(client.url),
        "redis_url_from": "SOAF_REDIS_URL" if from_env else str(url_file),
        "state_dir": str(state.resolve()),
        "embedded_data": str((state / "redis").resolve()),
        "prefix": client.keys.prefix,
        "key_id": key_id(keys[0]) if keys else None,
        "secret_from": source if keys else None,
        "cores": cores,
        "redis_py": ["import os, redis",
                     "url = " + ('os.environ["SOAF_REDIS_URL"]' if from_env
                                 else f"open({str(url_file)!r}).read().strip()"),
                     line, "r = redis.Redis.from_url(url)  # submit: see docs/protocol.md"],
    }


@click.command()
@json_option
@with_history
def info(client: Client, as_json: bool) -> None:
    """Show where the cores' Redis and signing key are, and how a script reaches them.

    Prints the Redis URL (password hidden: the file it comes from holds it), the state
    dir and its embedded Redis data, the key prefix, the signing key's id and where the
    key is, the cores alive, and the lines a plain redis-py script needs.
    """
    ctx = click.get_current_context()
    state = ctx.params.get("state_dir") or state_dir_from_env()
    data = describe(client, Path(state), opened=bool(ctx.meta.get(offline.OFFLINE)))
    if as_json:
        print_json(data)
        return
    rows = [("redis", f"{data['redis_url']}  (full URL: {data['redis_url_from']})"),
            ("state dir", f"{data['state_dir']}  (embedded Redis data: {data['embedded_data']})"),
            ("prefix", data["prefix"]),
            ("key id", f"{data['key_id']}  (key: {data['secret_from']})" if data["key_id"]
             else "none: set SOAF_SECRET, or start a core with an embedded Redis here"),
            ("cores", data["cores"])]
    for name, value in rows:
        click.echo(f"{name:<10} {value}")
    click.echo("from redis-py:\n" + "".join(f"    {line}\n" for line in data["redis_py"]), nl=False)
