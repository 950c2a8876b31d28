"""The gate of the core: turn queue entries into validated templates, or refuse them.

Nothing in an entry is trusted until its signature checks out: a payload that fails
the size or signature check is never unpickled. The refusal says whether the
submitter can be told (a readable service id) or the entry goes to the dead letters.
After the signature, the routing an entry travelled by (its queue, and the clear
``service`` and ``priority`` fields) must be the payload's own, or it is refused. An
entry of a service this core does not offer (its plugins changed since it read the
queue) is never refused: it goes back to its queue for a core that offers it, as does
every new entry of the old single submit stream (forwarded to its queue).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from soaf.core.replays import added_late, requeue_field
from soaf.core.routing import covers
from soaf.data.workdir import work_dir_for
from soaf.errors import DecodeError, SoafError, ValidationError
from soaf.plugin.loader import Registry
from soaf.protocol.codec import describe_exception, loads
from soaf.protocol.keys import GROUP, ID_FIELD, PAYLOAD_FIELD, PRIORITY_FIELD, SERVICE_FIELD, Keys
from soaf.protocol.queues import finish, member, split_ref
from soaf.protocol.replies import Entry
from soaf.protocol.scripts import REQUEUE
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


class Unoffered(Exception):
    """A verified entry this core does not (or no longer) offer the service of."""

    def __init__(self, template: ServiceParamTemplate) -> None:
        super().__init__(template.service)
        self.template = template


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


def verify_entry(fields: dict[bytes, bytes], *, secrets: Sequence[str],
                 max_payload: int) -> ServiceParamTemplate:
    """The entry's template once its signature, its fields and its clear routing fields
    check out, or a Refusal. Nothing is unpickled before the signature is checked."""
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
    except ValidationError as e:
        raise Refusal(str(e), service_id, service, trusted=True) from e
    except Exception as e:  # validate() of a user subclass may raise anything
        raise Refusal(f"template validation raised {describe_exception(e)}", service_id,
                      service, trusted=True) from e
    for name, value in ((SERVICE_FIELD, template.service), (PRIORITY_FIELD, str(template.priority))):
        clear = fields.get(name.encode())
        if clear is not None and clear != value.encode():
            raise Refusal(f"routing field {name!r} is {clear.decode(errors='replace')[:80]!r} in "
                          f"clear but {value!r} in the signed payload: entry refused",
                          service_id, service, trusted=True)
    return template


def offered(template: ServiceParamTemplate, *, registry: Registry | None,
            work_root: Path | None = None, labels: frozenset[str] | None = None) -> None:
    """Unoffered when this core cannot run ``template``'s service (no such plugin, or
    ``labels`` do not cover it); a Refusal when its work path leads out of the work root."""
    program = registry.programs.get(template.service) if registry is not None else None
    if program is None or (labels is not None and not covers(program, labels)):
        raise Unoffered(template)
    try:
        if work_root is not None and template.work_path is not None:
            work_dir_for(work_root, template)  # a symlink under the work root may lead out
    except (ValidationError, SoafError) as e:
        raise Refusal(str(e), template.service_id, template.service, trusted=True) from e


def decode_entry(
    fields: dict[bytes, bytes],
    *,
    secrets: Sequence[str],
    max_payload: int,
    registry: Registry | None,
    work_root: Path | None = None,
    labels: frozenset[str] | None = None,
) -> ServiceParamTemplate:
    """The entry's template, checked through and through, or a Refusal; Unoffered when
    this core cannot run its service (no such plugin, or ``labels`` do not cover it)."""
    template = verify_entry(fields, secrets=secrets, max_payload=max_payload)
    offered(template, registry=registry, work_root=work_root, labels=labels)
    return template


#: Dead letters kept (approximate).
DEADLETTER_MAXLEN = 10_000



class Gate:
    """Decodes batches of entries for the core: the good ones are returned, each refusal
    is recorded where its submitter sees it (the service's record, when its id can be
    trusted) or dead-lettered, and its entry acknowledged; entries this core does not
    offer go back to their queues."""

    def __init__(self, client: redis.Redis, keys: Keys, *, secrets: Sequence[str],
                 max_payload: int, work_root: Path, node: str, put: Callable[[Change], None],
                 registry: Callable[[], Registry | None],
                 labels: frozenset[str] = frozenset(), max_submit_delay: float = 0) -> None:
        self.client = client
        self.keys = keys
        self.secrets = secrets
        self.max_payload = max_payload
        self.work_root = work_root
        self.node = node
        self.put = put
        self.registry = registry
        self.labels = labels
        self.max_submit_delay = max_submit_delay

    def decode(self, entries: list[Entry], *, fresh: bool = True,
               ) -> tuple[list[tuple[str, ServiceParamTemplate]], Registry | None]:
        """The entries that decode, with the plugin generation they were checked against.
        ``fresh``: newly read entries (the old submit stream's are forwarded to their
        queues); else entries a core held, which are recovered where they are."""
        registry = self.registry()
        accepted: list[tuple[str, ServiceParamTemplate]] = []
        for entry_ref, fields in entries:
            stream, entry_id = split_ref(self.keys, entry_ref)
            try:
                template = verify_entry(fields, secrets=self.secrets, max_payload=self.max_payload)
                late = added_late(entry_id, fields, template, secrets=self.secrets,
                                  max_delay=self.max_submit_delay)
                if late is not None:  # checked before a move, which would make it fresh
                    raise Refusal(late, template.service_id, template.service, trusted=True)
                if fresh and stream == self.keys.submit:
                    self.requeue(entry_ref, fields, template)
                    continue
                offered(template, registry=registry, work_root=self.work_root,
                        labels=self.labels)
                self._check_queue(stream, template)
            except Refusal as refusal:
                self.refuse(entry_ref, fields, refusal)
                continue
            except Unoffered as e:
                self.requeue(entry_ref, fields, e.template)
                continue
            accepted.append((entry_ref, template))
        return accepted, registry

    def _check_queue(self, stream: str, template: ServiceParamTemplate) -> None:
        """An entry must come from its own service's queue (or the old submit stream)."""
        if stream not in (self.keys.submit, self.keys.queue(template.service, template.priority)):
            raise Refusal(f"entry read from {stream!r}, but its signed payload belongs in "
                          f"{self.keys.queue(template.service, template.priority)!r}: entry "
                          "refused", template.service_id, template.service, trusted=True)

    def requeue(self, entry_ref: str, fields: dict[bytes, bytes],
                template: ServiceParamTemplate) -> str:
        """Move an entry to the end of its service's queue, with its routing fields in
        clear; the service's record follows it if it named this entry. Returns the new
        entry's reference."""
        stream, entry_id = split_ref(self.keys, entry_ref)
        queue = self.keys.queue(template.service, template.priority)
        moved = {**{k.decode(errors="replace"): v for k, v in fields.items()},
                 ID_FIELD: template.service_id, SERVICE_FIELD: template.service,
                 PRIORITY_FIELD: str(template.priority),
                 **requeue_field(template.service_id, self.secrets)}
        flat = [x for pair in moved.items() for x in pair]
        new_id = REQUEUE.run(self.client, [queue, self.keys.queues, stream,
                                           self.keys.service(template.service_id),
                                           self.keys.ready, self.keys.new_queues],
                             [GROUP, member(template.service, template.priority), entry_id,
                              entry_ref, *flat])
        log.info("entry %s of %s (service %r) moved to %s", entry_ref, template.service_id,
                 template.service, queue)
        return f"{queue}/{new_id.decode() if isinstance(new_id, bytes) else new_id}"

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
        finish(pipe, self.keys, [entry_id])
        pipe.execute()
