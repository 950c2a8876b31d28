"""The gate of the core: turn submit-stream entries into validated templates, or refuse them.

Nothing in an entry is trusted until its signature checks out: a payload that fails
the size or signature check is never unpickled. The refusal says whether the
submitter can be told (a readable service id) or the entry goes to the dead letters.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from soaf.data.workdir import work_dir_for
from soaf.errors import DecodeError, SoafError, ValidationError
from soaf.plugin.loader import Registry
from soaf.protocol.codec import describe_exception, loads
from soaf.protocol.keys import GROUP, ID_FIELD, PAYLOAD_FIELD, REQUEUE_FIELD, Keys
from soaf.protocol.replies import Entry, Pending, pending, stream_batch
from soaf.protocol.signed import signed_at
from soaf.protocol.state import Change, State
from soaf.protocol.template import ServiceParamTemplate, validate_template

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


#: Seconds the record of an entry refused before its signature was checked lives: its
#: id was read in clear, so anyone could have chosen it.
UNTRUSTED_TTL = 3600.0


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


def signed_time(template: ServiceParamTemplate) -> float | None:
    """The time the payload was signed (``signed_at`` from the instance dict, so no
    property runs), or None when it has none or it is not a finite number."""
    try:
        value = vars(template).get("signed_at")
    except TypeError:  # no instance dict
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(value) else None


def added_at(entry_id: str) -> float | None:
    """When Redis added a stream entry (the milliseconds of its id), in Unix seconds."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) / 1000 if ms.isdigit() and seq.isdigit() else None


def added_late(entry_id: str, fields: dict[bytes, bytes], template: ServiceParamTemplate, *,
               secrets: Sequence[str], max_delay: float) -> str | None:
    """Why an entry was added too long after its payload was signed, else None.

    Client.submit (and a plain XADD right after ``soaf.dumps``) adds the entry within
    moments of signing, and Redis, not the writer, stamps the entry id with the time, so
    a captured payload pushed again later is found here whatever its record says. An
    entry a core put back (``requeue``, signed by the core) counts from that time."""
    added = added_at(entry_id)
    if max_delay <= 0 or added is None:
        return None
    requeued = signed_at(fields.get(REQUEUE_FIELD.encode()), "requeue", template.service_id,
                         secrets)
    since = requeued if requeued is not None else signed_time(template)
    if since is None or added - since <= max_delay:
        return None  # an older client's payload has no time: the claim judges it
    return (f"entry added {added - since:.0f} s after its payload was signed (max submit delay "
            f"{max_delay:g} s): refused as a replay of a captured payload; submit it again "
            "(if the submitting host's clock is that far behind Redis's, fix the clock or "
            "raise SOAF_MAX_SUBMIT_DELAY)")


#: Dead letters kept (approximate).
DEADLETTER_MAXLEN = 10_000



def own_pending(client: redis.Redis, stream: str, consumer: str) -> list[Pending]:
    """Every entry delivered to ``consumer`` and not acknowledged yet (fields None for one
    no longer in the stream): what a core had when it stopped or lost its connection."""
    found: list[Pending] = []
    start = "0"
    while True:
        batch = pending(stream_batch(client.xreadgroup(GROUP, consumer, {stream: start},
                                                       count=100)))
        if not batch:
            return found
        found.extend(batch)
        start = batch[-1][0]


class Gate:
    """Decodes batches of entries for the core: the good ones are returned, each refusal
    is recorded where its submitter sees it (the service's record, when its id can be
    trusted) or dead-lettered, and its entry acknowledged."""

    def __init__(self, client: redis.Redis, keys: Keys, *, secrets: Sequence[str],
                 max_payload: int, work_root: Path, node: str, put: Callable[[Change], None],
                 registry: Callable[[], Registry | None], max_submit_delay: float = 0) -> None:
        self.client = client
        self.keys = keys
        self.secrets = secrets
        self.max_payload = max_payload
        self.work_root = work_root
        self.node = node
        self.put = put
        self.registry = registry
        self.max_submit_delay = max_submit_delay

    def decode(self, entries: list[Entry]) -> tuple[list[tuple[str, ServiceParamTemplate]],
                                                      Registry | None]:
        """The entries that decode, with the plugin generation they were checked against."""
        registry = self.registry()
        accepted: list[tuple[str, ServiceParamTemplate]] = []
        for entry_id, fields in entries:
            try:
                template = decode_entry(fields, secrets=self.secrets, max_payload=self.max_payload,
                                        registry=registry, work_root=self.work_root)
                late = added_late(entry_id, fields, template, secrets=self.secrets,
                                  max_delay=self.max_submit_delay)
                if late is not None:
                    raise Refusal(late, template.service_id, _readable_field(template, "service"),
                                  trusted=True)
            except Refusal as refusal:
                self.refuse(entry_id, fields, refusal)
                continue
            accepted.append((entry_id, template))
        return accepted, registry

    def refuse(self, entry_id: str, fields: dict[bytes, bytes], refusal: Refusal) -> None:
        log.warning("refused entry %s: %s", entry_id, refusal.reason)
        if refusal.service_id is not None:
            now = time.time()
            values: dict[str, Any] = {
                "state": State.REJECTED.value, "error": refusal.reason, "rejected_at": now,
                "finished_at": now, "service_id": refusal.service_id, "node": self.node,
            }
            if refusal.service:
                values["service"] = refusal.service
            # Attempt 0, seq 2: applies only over a fresh 'queued' record (or none), so a
            # refusal never overwrites a service that is already running elsewhere.
            self.put(Change(refusal.service_id, 0, 2, values, ack=entry_id,
                            ttl=None if refusal.trusted else UNTRUSTED_TTL))
            if refusal.trusted:
                return
        payload = fields.get(PAYLOAD_FIELD.encode(), b"")
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.keys.deadletter, {
            "entry": entry_id,
            "reason": refusal.reason,
            "id": fields.get(ID_FIELD.encode(), b"")[:200],
            "size": len(payload),
            "preview": payload[:64].hex(),
            "node": self.node,
            "ts": time.time(),
        }, maxlen=DEADLETTER_MAXLEN, approximate=True)
        pipe.xack(self.keys.submit, GROUP, entry_id)
        pipe.xdel(self.keys.submit, entry_id)
        pipe.execute()
