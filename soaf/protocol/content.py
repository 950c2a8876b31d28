"""The content of a template: one digest of what it asks for, without its identity.

Two templates with the same digest ask for the same work: the same template class,
service, inputs, outputs, args, env and options. Only ``service_id`` and the time the
template was signed are left out, since they name a request rather than describe it.
A named pipeline matches a step of an earlier run of its script by this digest
(docs/pipelines.md), so a step whose template changed runs again.

Values are reduced to JSON in a canonical form (dict entries sorted, tuples as lists);
anything else counts by its ``repr``. An object whose ``repr`` holds its address (a
plain ``object()``) therefore gives a new digest in each process: such a template
never matches an earlier one and simply runs again, which is the safe side.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Template fields that name a request instead of describing the work.
IDENTITY_FIELDS = frozenset({"service_id", "signed_at"})


def template_digest(template: Any) -> str:
    """The SHA-256 (hex) of the template's class and content fields."""
    cls = type(template)
    fields = {k: v for k, v in vars(template).items() if k not in IDENTITY_FIELDS}
    content = {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": canonical(fields)}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data that compares equal exactly when the content does."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # 0.1 stays 0.1; nan and inf stay distinct and valid JSON
    if isinstance(value, dict):
        items = [[canonical(k), canonical(v)] for k, v in value.items()]
        return {"dict": sorted(items, key=lambda kv: json.dumps(kv[0], sort_keys=True))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"set": sorted(json.dumps(canonical(v), sort_keys=True) for v in value)}
    return {"repr": repr(value)}
