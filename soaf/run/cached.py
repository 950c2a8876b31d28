"""The result cache, as a run sees it: the key of a template, and a hit's final values.

A template with ``cache=True``, or any template of a service with ``cacheable = True``,
gets a cache key before it is built. The key is a SHA-256 over:

* the service name;
* the plugin version's content digest (every module of ``services/`` and ``handlers/``)
  and the SHA-256 of the service's ``program`` file: changed code never matches;
* ``args``, ``env``, the output spec (``output_files``, ``optional_outputs``,
  ``output_target``) and the fields a template subclass adds;
* each input's name in the work dir and its fingerprint (soaf.data.fingerprint).

The core looks the key up after it verified and claimed the submission, so a client
cannot claim a hit it did not earn. The earlier run must have succeeded with that same
key, and each of its outputs must still be where its record says (its work dir on this
host, or its ``output_target``); then the service ends ``succeeded`` at once with
``cached_from`` naming that run and the run's outputs, work dir and custom fields.
Otherwise it runs, and on success it becomes the entry for its key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from soaf.data.fingerprint import exists, fingerprint
from soaf.data.handoff import Lookup, resolve_ref
from soaf.data.staging import Resolver
from soaf.errors import FetchError
from soaf.protocol.content import canonical
from soaf.protocol.state import FIELD_PREFIX, ServiceRecord, State
from soaf.protocol.template import ServiceParamTemplate, output_ref
from soaf.run.ports import Engines, PluginClasses, ResultStore

log = logging.getLogger(__name__)

#: The template fields that decide a result, besides the inputs.
KEY_FIELDS = ("args", "env", "output_files", "optional_outputs", "output_target")
#: Record fields a hit takes over from the run it reuses.
REUSED_FIELDS = ("outputs", "output_target", "work_dir", "host", "inputs", "exit_code")
_BASE_FIELDS = frozenset(f.name for f in dataclass_fields(ServiceParamTemplate))


def answer(template: ServiceParamTemplate, plugin: PluginClasses, engines: Engines,
           resolve: Resolver) -> tuple[str | None, dict[str, Any] | None]:
    """``(cache key, final values of a hit)`` for a fresh run: ``(None, None)`` when its
    results are not cached (or its key cannot be made: it runs), ``(key, None)`` on a miss."""
    store, settings = engines.results, engines.settings
    if store is None or not wanted(template, plugin.program_cls):
        return None, None
    try:
        key = cache_key(template, plugin.program_cls, plugin_digest=plugin.digest,
                        plugin_root=settings.plugins, resolve=resolve,
                        timeout=settings.fetch_timeout)
    except Exception as e:  # a plugin's constructor, an input that is not there ...
        log.warning("service %s: no cache key, so it runs: %s", template.service_id, e)
        return None, None
    record = store.find(template.service, key)
    if record is None or engines.lookup is None:
        return key, None
    return key, hit(record, key, lookup=engines.lookup, work_root=settings.work_root,
                    timeout=settings.fetch_timeout)


def keep(store: ResultStore | None, template: ServiceParamTemplate, key: str,
         state: str) -> None:
    """A cacheable run that succeeded becomes the answer for its key."""
    if store is not None and state == State.SUCCEEDED.value:
        store.remember(template.service, key, template.service_id)


def wanted(template: ServiceParamTemplate, program_cls: Any) -> bool:
    """Whether results of this template are looked up and kept."""
    return getattr(template, "cache", False) is True or getattr(program_cls, "cacheable",
                                                                 False) is True


def cache_key(template: ServiceParamTemplate, program_cls: Any, *, plugin_digest: str,
              plugin_root: Path, resolve: Resolver | None, timeout: float) -> str:
    """The template's cache key; FetchError when an input cannot be fingerprinted."""
    program = program_cls(template, Path(), plugin_root=plugin_root)
    code = {"plugins": plugin_digest,
            "program": fingerprint(str(program.program_path()), resolve=None, timeout=timeout)
            if program.program else None}
    spec = {name: canonical(getattr(template, name, None)) for name in KEY_FIELDS}
    extra = {k: canonical(v) for k, v in vars(template).items() if k not in _BASE_FIELDS}
    inputs = [[name, fingerprint(source, resolve=resolve, timeout=timeout)]
              for name, source in sorted(template.input_sources().items())]
    body = {"service": template.service, "code": code, "spec": spec, "extra": extra,
            "inputs": inputs}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def hit(record: ServiceRecord, key: str, *, lookup: Lookup, work_root: Path,
        timeout: float) -> dict[str, Any] | None:
    """The final values that answer a template from ``record`` (an earlier run with the
    same key), or None when that run cannot answer: not succeeded with this key, or an
    output of it is gone."""
    if record.state != State.SUCCEEDED.value or record.get("cache_key") != key:
        return None
    for entry in record.outputs:
        name = entry.get("name") if isinstance(entry, dict) else None
        uploaded = entry.get("url") if isinstance(entry, dict) else None
        if isinstance(uploaded, str) and exists(uploaded, timeout=timeout):
            continue  # its copy in the output target is there
        try:  # else the file in its work dir, on this host and inside the work root
            where = resolve_ref(output_ref(record.service_id, str(name)), lookup=lookup,
                                work_root=work_root)
        except (FetchError, ValueError) as e:
            log.info("cached run %s cannot answer: %s", record.service_id, e)
            return None
        if not exists(where, timeout=timeout):
            log.info("cached run %s cannot answer: %s is gone", record.service_id, name)
            return None
    values = {k: record.get(k) for k in REUSED_FIELDS if record.get(k) is not None}
    values.update({FIELD_PREFIX + k: v for k, v in record.fields.items()})
    return {**values, "state": State.SUCCEEDED.value, "cached_from": record.service_id,
            "progress": 1.0, "failure": None, "error": None}
