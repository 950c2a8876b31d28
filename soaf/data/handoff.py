"""Same-host handoff: resolving ``soaf://<service_id>/<name>`` inputs on a core.

A pipeline passes one service's output to the next by reference (``soaf.output_ref``)
instead of by path, because only the core that runs the next step knows where it runs.
On the producer's host (or where the work root is shared at the same path), and inside
this core's work root, the reference resolves to the file in the producer's work dir,
which staging reflinks or hard-links in (``soaf.data.cloning``): large files are never
copied twice. Anywhere else it resolves to the copy the producer uploaded to
its ``output_target`` (so multi-host pipelines set one); failing both, the consumer
fails in ``preparing`` saying which.

The producer's record must say ``succeeded``; its ``host``, ``work_dir``, ``outputs``
and ``output_target`` fields (written by the core that ran it) are what is consulted.
Records travel through Redis, which is not trusted for local effects: whatever they name,
a reference resolves to a local path only inside this core's work root (after resolving
links); remote URLs are passed on as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from soaf.config import host_name
from soaf.data.workdir import confine
from soaf.errors import FetchError, ValidationError
from soaf.protocol.state import State
from soaf.protocol.template import parse_ref

#: Reads a service's record fields (decoded values), or None when there is no record.
Lookup = Callable[[str], "dict[str, Any] | None"]


def resolve_ref(ref: str, *, lookup: Lookup, work_root: Path,
                host: str | None = None) -> Path | str:
    """A local path (same host, inside ``work_root``) or a URL for ``ref``."""
    service_id, name = parse_ref(ref)
    host = host or host_name()
    try:
        record = lookup(service_id)
    except Exception as e:
        raise FetchError(ref, f"cannot read the record of service {service_id}: {e}") from e
    if not record:
        raise FetchError(ref, f"no service with id {service_id!r}")
    state = record.get("state")
    if state != State.SUCCEEDED.value:
        raise FetchError(ref, f"service {service_id} is {state}, not succeeded")
    local = _local(record, name, work_root=work_root)
    if local is not None:
        return local
    url = _uploaded(record, name)
    if url is not None:
        return _checked(ref, url, work_root=work_root)
    where = record.get("host") or "an unknown host"
    raise FetchError(
        ref,
        f"output {name!r} is not on this host ({host}; the producer ran on {where}) and was "
        "not uploaded: give the producing template an output_target",
    )


def _local(record: dict[str, Any], name: str, *, work_root: Path) -> Path | None:
    """The output in the producer's work dir, when this core sees it: on the producer's
    host, or on another one that mounts the same work root at the same path (a shared
    file system; the file is there). Either way only inside this core's work root."""
    work_dir = record.get("work_dir")
    if not isinstance(work_dir, str):
        return None
    root = work_root.resolve()
    producer = Path(work_dir)
    try:
        resolved = producer.resolve()
        if root not in resolved.parents:
            return None  # another core's work root: not ours to link from
        path = confine(resolved, name, field="input_files")
    except (OSError, ValidationError):
        return None
    return path if path.exists() else None


def _checked(ref: str, url: str, *, work_root: Path) -> Path | str:
    """A remote URL as it is; a local path (or ``file:``) only inside the work root.

    A record is written through Redis, which others can write to: a path in it is no
    proof that a core put a file there, so it may not lead anywhere outside the files
    this core looks after (``/etc/shadow``, a user's home)."""
    parsed = urlsplit(url)
    if parsed.scheme and parsed.scheme != "file" and len(parsed.scheme) > 1:
        return url  # s3://, https:// ...: fetched like any remote input
    local = parsed.path if parsed.scheme == "file" else url
    root = Path(os.path.realpath(work_root))
    real = Path(os.path.realpath(local))
    if root != real and root not in real.parents:
        raise FetchError(ref, f"the producer's record points to the local path {local}, "
                              f"outside the work root {root}: refused")
    return real


def _uploaded(record: dict[str, Any], name: str) -> str | None:
    outputs = record.get("outputs") or []
    target = record.get("output_target")
    for entry in outputs:
        if isinstance(entry, dict) and entry.get("name") == name and entry.get("url"):
            return str(entry["url"])
    if isinstance(target, str) and target:
        prefix = name.rstrip("/") + "/"
        if any(isinstance(e, dict) and str(e.get("name", "")).startswith(prefix) for e in outputs):
            return f"{target.rstrip('/')}/{name.rstrip('/')}"
    return None
