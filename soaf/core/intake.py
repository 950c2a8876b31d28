"""Turn one submit-stream entry into a validated template, or a precise refusal.

Nothing in an entry is trusted until its signature checks out: a payload that fails
the size or signature check is never unpickled. The refusal says whether the
submitter can be told (a readable service id) or the entry goes to the dead letters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from soaf.data.workdir import work_dir_for
from soaf.errors import DecodeError, SoafError, ValidationError
from soaf.plugin.loader import Registry
from soaf.protocol.codec import describe_exception, loads
from soaf.protocol.keys import ID_FIELD, PAYLOAD_FIELD
from soaf.protocol.template import ServiceParamTemplate, validate_template

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass
class Refusal(Exception):
    """Why an entry is refused; ``service_id`` is set when the submitter can be told."""

    reason: str
    service_id: str | None = None
    service: str | None = None
    trusted: bool = False  # the id comes from a verified payload

    def __str__(self) -> str:
        return self.reason


def clear_id(fields: dict[bytes, bytes]) -> str | None:
    """The service id named in clear in the entry, if it looks like one."""
    raw = fields.get(ID_FIELD.encode())
    if raw is None:
        return None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    return text if _ID.match(text) else None


def _readable_field(template: ServiceParamTemplate, name: str) -> str | None:
    """A field read from the instance dict (no property or __getattr__ runs), if it is a
    well-formed name; else None."""
    try:
        value = vars(template).get(name)
    except TypeError:  # no instance dict (a subclass with __slots__)
        return None
    return value if type(value) is str and _ID.match(value) else None


def _readable_id(template: ServiceParamTemplate) -> str | None:
    return _readable_field(template, "service_id")


def decode_entry(
    fields: dict[bytes, bytes],
    *,
    secrets: Sequence[str],
    max_payload: int,
    registry: Registry | None,
    work_root: Path | None = None,
) -> ServiceParamTemplate:
    """The entry's template, checked through and through, or a Refusal."""
    payload = fields.get(PAYLOAD_FIELD.encode())
    if payload is None:
        names = ", ".join(sorted(k.decode(errors="replace") for k in fields)) or "none"
        raise Refusal(f"entry has no {PAYLOAD_FIELD!r} field (fields: {names})", clear_id(fields))
    try:
        template = loads(payload, secrets, max_size=max_payload)
    except DecodeError as e:
        raise Refusal(str(e), clear_id(fields)) from e
    except Exception as e:  # a signed pickle may still raise anything while loading
        raise Refusal(f"payload does not unpickle: {describe_exception(e)}", clear_id(fields)) from e
    if not isinstance(template, ServiceParamTemplate):
        raise Refusal(
            f"payload is a {type(template).__name__}, not a ServiceParamTemplate", clear_id(fields)
        )
    # The verified payload's id; the clear one only if the payload's is unusable.
    service_id = _readable_id(template) or clear_id(fields)
    service = _readable_field(template, "service")
    try:
        validate_template(template)
        if registry is None:
            raise SoafError("no plugins are loaded on this core (see the plugin load error)")
        registry.program(template.service)
        if work_root is not None and template.work_path is not None:
            work_dir_for(work_root, template)  # a symlink under the work root may lead out
    except (ValidationError, SoafError) as e:
        raise Refusal(str(e), service_id, service, trusted=True) from e
    except Exception as e:  # validate() of a user subclass may raise anything
        raise Refusal(f"template validation raised {describe_exception(e)}", service_id,
                      service, trusted=True) from e
    return template

