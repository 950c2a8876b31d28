"""Where a pipeline step's outputs are for the steps after it: in an object store, under a
web server over the work roots, or in the step's work dir.

An object store (``Pipeline(client, store="s3://bucket/prefix")``) is the way to hand data
between hosts: each step uploads its outputs to ``<store>/<service_id>/`` (its
``output_target``, unless the template sets one), the core records each file's URL, and
the next step gets those URLs as inputs, which its core stages through fsspec (s3fs for
``s3://``) wherever it runs. ``url_base`` serves the same purpose with a web server of the
user's own on each core's machine; without either, outputs are paths in work dirs, for
cores that share a machine or a file system.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from soaf.errors import PipelineError
from soaf.protocol.state import ServiceRecord
from soaf.protocol.template import ServiceParamTemplate, is_url


def check_store(store: str) -> str:
    """The store URL without a trailing slash; PipelineError unless it is a URL."""
    if not isinstance(store, str) or not is_url(store) or store.startswith("memory:"):
        raise PipelineError(f"store must be the URL of an object store every core can reach, "
                            f"such as s3://bucket/prefix; got {store!r}")
    return store.rstrip("/")


def store_target(store: str) -> str:
    """The ``output_target`` of a step whose pipeline has ``store``."""
    return f"{store}/{{service_id}}/"


def uploaded(record: ServiceRecord, pattern: str) -> list[str]:
    """Names of the collected (and uploaded) outputs that match ``pattern``."""
    return sorted(str(o["name"]) for o in record.outputs
                  if o.get("url") and fnmatch.fnmatch(str(o.get("name")), pattern))


def locate(label: str, template: ServiceParamTemplate, record: ServiceRecord, name: str, *,
           url_base: str | None, store: str | None) -> str:
    """Where the output ``name`` of a succeeded step is (see the module docstring)."""
    if store:
        for output in record.outputs:
            if output.get("name") == name and output.get("url"):
                return str(output["url"])
        raise PipelineError(f"{label} succeeded but uploaded no {name!r} "
                            f"(to {record.get('output_target') or store})")
    if url_base:
        base = url_base.format(node=record.node or "").rstrip("/")
        rel = PurePosixPath(template.work_path or template.service_id) / name
        return f"{base}/{quote(str(rel))}"
    work_dir = Path(str(record.get("work_dir") or ""))
    path = work_dir / name
    if work_dir.is_dir() and not path.exists():
        raise PipelineError(f"{label} succeeded but wrote no {name!r} (in {work_dir})")
    return str(path)
