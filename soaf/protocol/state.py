"""State records and events of services: the record, its fields, and the changes to it.

A service's record is a Redis hash whose values are JSON texts (``"running"``, ``0.5``,
``null`` ...); custom fields set by a handler are stored as ``f:<name>``. Every change
also appends an event (the changed fields plus ``seq`` and ``ts``) to the service's
event stream; each write of a service's changes publishes a short note on the notify
channel (the last seq, and the newest state among them).

Each change carries the attempt number and a per-service sequence number. The record
script applies a change only if it is newer than what is stored, so replaying a batch
after a lost connection writes nothing twice, and a core that lost ownership of a
service (an older attempt) cannot overwrite the newer attempt's record.
"""

from __future__ import annotations

import json
import json.scanner
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, cast

from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.queues import split_ref


class State(str, Enum):
    """The lifecycle of a service; ``succeeded`` ... ``rejected`` are final."""

    QUEUED = "queued"
    BUILDING = "building"
    PREPARING = "preparing"
    RUNNING = "running"
    RETRYING = "retrying"  # an attempt failed; the next one starts after a backoff
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset(
    {State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT, State.REJECTED}
)
FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)
#: Events kept per service (approximate; older ones are trimmed).
EVENTS_MAXLEN = 1000

FIELD_PREFIX = "f:"

#: The record field holding a run's journal (soaf.run.journal): what a core needs to take
#: the run over. It is no event's business (followers and the dashboard never show it),
#: and events that each carried it were half journal.
JOURNAL = "journal"


@dataclass
class Change:
    """One change of a service's record, as queued for the state writer."""

    service_id: str
    attempt: int
    seq: int
    values: dict[str, Any]
    ts: float = field(default_factory=time.time)
    ack: str | None = None  # stream entry to acknowledge once this change is written
    #: Seconds a record made final by this change lives (at most the record TTL); None:
    #: the record TTL. Refusals of entries whose signature was never checked use
    #: ``UNTRUSTED_TTL``: anyone can write those ids.
    ttl: float | None = None
    #: Called from the writer thread once the change is in Redis, with True if it was
    #: applied (or had been, by an earlier try) and False if a newer attempt fenced it out.
    on_written: Callable[[bool], None] | None = field(default=None, repr=False)
    #: False when the service's log stream cannot exist (no line was ever written to it):
    #: a change that finishes its entry then leaves it out of the keys that age with the
    #: record (one EXPIRE less for a service that printed nothing).
    logs: bool = True

    def flat(self, *, journal: bool = True) -> list[Any]:
        """This change's part of RECORD_LUA's ARGV (each value JSON-encoded once). The
        ``journal`` goes to the record only, never into the event, and only with
        ``journal``: a later change written in the same call carries a newer one."""
        pairs: list[str] = []
        parts = [f'{{"seq": {self.seq}, "attempt": {self.attempt}, "ts": {self.ts!r}']
        for key, value in self.values.items():
            if key == JOURNAL:
                if journal:
                    pairs += (key, as_json(value))
                continue
            encoded = as_json(value)
            pairs += (key, encoded)
            parts += (_KEYS.get(key) or _key(key), encoded)
        parts.append("}")
        state = self.values.get("state") or ""
        return [self.seq, "".join(parts), state, len(pairs) // 2, *pairs]


#: ``", " + "key": `` of the record fields seen so far: the same few dozen names come in
#: every service's changes (bounded, as plugins may invent field names).
_KEYS: dict[str, str] = {}


def _key(key: str) -> str:
    text = f", {_quote(key)}: "
    if len(_KEYS) < 4096:
        _KEYS[key] = text
    return text


_CHECKED = json.JSONEncoder(default=str).encode
#: The C encoder json.dumps builds anew on every call for a dict or a list, built once.
#: Without the bookkeeping that finds a value containing itself (``markers`` None): such a
#: value runs out of recursion, and the checking encoder then says what is wrong.
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_ONCE = None if _C_ENCODER is None else _C_ENCODER(
    None, str, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)


def encode_json(value: Any) -> str:
    """``json.dumps(value, default=str)``, the same text, without building an encoder:
    the core encodes the values of every change and its journals (a few dozen a run)."""
    if _ONCE is None:
        return _CHECKED(value)
    try:
        return "".join(_ONCE(value, 0))
    except RecursionError:
        return _CHECKED(value)


_DECODER = json.JSONDecoder()
_scan = json.scanner.make_scanner(cast(Any, _DECODER))  # (typeshed wants its own type)


def _decode(text: str) -> Any:
    """``json.loads(text)`` for a value the writer stored, read straight by the decoder's
    C scanner: a record has dozens of fields, and the decoder's own entry (whitespace
    skipped by regular expression before and after) cost a client's ``wait`` more than
    Redis did. Anything else, such as whitespace around a value or text after it, goes
    to the full decoder, which accepts or refuses it as json.loads does (ValueError)."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return _DECODER.decode(text)
    return value if end == len(text) else _DECODER.decode(text)


def as_json(value: Any) -> str:
    """``json.dumps(value, default=str)``, the same text, with the common plain values
    (text, integer, finite number, None) spelled directly: the core encodes every value
    of every change, and json.dumps builds an encoder per call."""
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if value is None:
        return "null"
    return encode_json(value)


def record_call(keys: Keys, changes: list[Change], *, record_ttl: float = 0,
                finish: bool = True) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV for RECORD_LUA writing ``changes`` (one service, one attempt, in
    order). With ``finish`` the entries the changes acknowledge are finished in the same
    call, their records aging for ``record_ttl`` seconds (0: kept)."""
    keys_, args = _record_head(keys, changes, record_ttl, finish)
    # The record keeps one journal, and the script applies a call's changes in order (all
    # of them from the first it applies on): the last journal of the call is the one kept.
    last = max((i for i, change in enumerate(changes) if JOURNAL in change.values), default=-1)
    for i, change in enumerate(changes):
        args += change.flat(journal=i == last)
    return keys_, args


def finish_call(keys: Keys, changes: list[Change], result: int, *, record_ttl: float = 0
                ) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV for FINISH_LUA: the entries ``changes`` acknowledge, after their
    record call returned ``result``."""
    keys_, args = _record_head(keys, changes, record_ttl, True)
    return keys_, [*args, result]


def _record_head(keys: Keys, changes: list[Change], record_ttl: float, finish: bool
                 ) -> tuple[list[str], list[Any]]:
    first = changes[0]
    sid = first.service_id
    acks = [change for change in changes if change.ack] if finish else []
    since = first.ts - record_ttl if record_ttl > 0 else ""
    own_ttl = acks[-1].ttl if acks and acks[-1].ttl is not None else ""
    args: list[Any] = [sid, first.attempt, keys.notify, EVENTS_MAXLEN, first.ts, since, GROUP,
                       record_ttl, own_ttl, len(acks)]
    aging = keys.aging(sid)  # record and events first
    record = [*aging[:2], keys.services]
    if acks:
        record += [keys.cancels, *(aging[2:] if any(c.logs for c in acks) else aging[3:])]
    for change in acks:
        stream, entry_id = split_ref(keys, change.ack or "")
        record.append(stream)
        args.append(entry_id)
    return record, args


@dataclass
class ServiceRecord:
    """A service's state record as read from Redis."""

    service_id: str
    state: str
    service: str | None = None
    attempt: int = 0
    seq: int = 0
    node: str | None = None
    exit_code: int | None = None
    progress: float | None = None
    error: str | None = None
    traceback: str | None = None
    message: str | None = None
    plugin_version: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_VALUES

    @property
    def ok(self) -> bool:
        return self.state == State.SUCCEEDED.value

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """What was staged into the work dir: name, source, size, files, mode."""
        return list(self.raw.get("inputs") or [])

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The collected outputs: name, size, sha256 and, when uploaded, url."""
        return list(self.raw.get("outputs") or [])

    @property
    def callback_errors(self) -> int:
        """How many times the handler's callbacks raised (or overstayed) in this attempt."""
        n = as_count(self.raw.get("callback_errors"))
        return n or (1 if self.raw.get("callback_error") else 0)

    @property
    def warnings(self) -> list[str]:
        """What went wrong without failing the service, one line each: callback errors
        (count and the last one), output dropped by the log cap, missing outputs, an
        exit status no core saw. Empty for a clean run."""
        out = []
        if self.callback_errors:
            n = self.callback_errors
            out.append(f"{n} callback error{'s' if n > 1 else ''}, the last: "
                       f"{self.raw.get('callback_error')}")
        for stream in ("stdout", "stderr"):
            dropped = self.raw.get(f"{stream}_dropped_bytes")
            if dropped:
                out.append(f"{stream}: {dropped} bytes dropped (log cap)")
        if self.raw.get("missing_outputs"):
            out.append(f"missing outputs: {', '.join(map(str, self.raw['missing_outputs']))}")
        if self.raw.get("exit_status_known") is False:
            out.append("the program ended while no core watched it; exit status unknown")
        return out

    @property
    def eta(self) -> float | None:
        """When the service is expected to be done (Unix time), from the recent rate of
        its progress; None when not known or when it is final."""
        value = self.raw.get("eta")
        if self.final or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    def get(self, name: str, default: Any = None) -> Any:
        """Any stored field, e.g. ``record.get('running_at')``."""
        return self.raw.get(name, default)

    @classmethod
    def from_hash(cls, service_id: str, data: dict[bytes, bytes]) -> ServiceRecord:
        raw: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        names, texts = _NAMES, _TEXTS
        for k, v in data.items():
            name = names.get(k)
            if name is None:
                key = k.decode(errors="replace")
                custom_field = key.startswith(FIELD_PREFIX)
                name = (key[len(FIELD_PREFIX):] if custom_field else key, custom_field)
                if len(names) < _KEPT:
                    names[k] = name
            value = texts.get(v, _MISSING)
            if value is _MISSING:
                try:  # UTF-8 as written (json.loads would first guess the encoding)
                    value = _decode(v.decode())
                except ValueError:  # not JSON (or not UTF-8): the text as it is
                    value = v.decode(errors="replace")
                if len(v) <= _SHORT and _shared(value):
                    if len(texts) >= _KEPT:
                        texts.clear()
                    texts[v] = value
            if name[1]:
                custom[name[0]] = value
            else:
                raw[name[0]] = value
        state = raw.get("state")
        service = raw.get("service")
        return cls(
            service_id=service_id,
            state=state if isinstance(state, str) and state else "unknown",
            service=service if isinstance(service, str) else None,
            attempt=as_count(raw.get("attempt")),
            seq=as_count(raw.get("seq")),
            node=raw.get("node"),
            exit_code=raw.get("exit_code"),
            progress=raw.get("progress"),
            error=raw.get("error"),
            traceback=raw.get("traceback"),
            message=raw.get("message"),
            plugin_version=raw.get("plugin_version"),
            fields=custom,
            raw=raw,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.raw, "service_id": self.service_id, "fields": self.fields}


#: What records' field names and short values read as, kept: a client that waits for
#: thousands of services reads the same names and many of the same values (states, nodes,
#: null, small numbers) in each, and reading them cost it more than Redis did. Only values
#: nobody can change are kept (text, booleans, None, small integers), at most ``_KEPT`` of
#: each (then the values start afresh: most are one service's own, such as its id).
_NAMES: dict[bytes, tuple[str, bool]] = {}
_TEXTS: dict[bytes, Any] = {}
_KEPT = 4096
_SHORT = 32
_MISSING = object()


def _shared(value: Any) -> bool:
    kind = type(value)
    return value is None or kind is str or kind is bool or (kind is int and -1024 < value < 1024)


def as_count(value: Any) -> int:
    """A record's attempt or seq as a number; 0 for anything else (Redis is not trusted:
    the scripts that write the record end a service whose numbers were tampered with)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, (str, bytes)) and value.isdigit() and len(value) <= 15:
        return int(value)
    return 0


def decode_events(data: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """The events in one entry of a service's event stream, in order.

    An entry's ``data`` is one event (a JSON object) or, when the core wrote several
    changes of a service in one go, a JSON array of them: one stream entry, and one Redis
    command, per write instead of per event. Anything else (Redis is not trusted) is no
    event."""
    try:
        body = json.loads(data[b"data"])
    except (KeyError, ValueError):
        return []
    events = body if isinstance(body, list) else [body]
    return [event for event in events if isinstance(event, dict)]
