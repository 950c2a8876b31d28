"""Named pipelines in Redis: which service each step got, so a pipeline outlives its client.

``Pipeline(client, name="nightly-42")`` records, before it submits a step, an entry
under the step's name in the pipeline's hash (``Keys.pipeline``): the service id, the
digest of the step's template (soaf/protocol/content.py), its service and its order.
When the same script runs again (its client was killed, the machine rebooted), each
step looks up its entry first:

* same digest, service queued, running or succeeded: the step **attaches** to that
  service and submits nothing;
* same digest, no record yet (the client died between recording and submitting): the
  recorded id is submitted now, so it runs once;
* anything else (no entry, a changed template, a service that failed, was cancelled,
  timed out or was rejected): a new service is submitted and recorded.

The entry is written with a compare-and-set (RECORD_STEP), so two runs of a script at
once submit a step once. ``soaf pipelines cancel NAME`` marks the run of the pipeline
that is current at that moment as cancelled (``-cancelled`` holds its ``-run`` token):
that run submits no more steps, while a later run of the script starts afresh.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from soaf.errors import DuplicateService, PipelineError
from soaf.protocol.content import template_digest
from soaf.protocol.scripts import RECORD_STEP
from soaf.protocol.state import FINAL_VALUES, State
from soaf.protocol.template import ServiceParamTemplate, new_service_id

if TYPE_CHECKING:
    from soaf.client.sync import Client

log = logging.getLogger(__name__)

#: States after which a re-run submits the step again instead of attaching to it.
RERUN_STATES = frozenset({State.FAILED.value, State.CANCELLED.value, State.TIMED_OUT.value,
                          State.REJECTED.value})
#: Hash fields of a pipeline that are not steps: the current run's token, and the token of
#: a run cancelled from outside. Step names start with a letter or digit, so never collide.
RUN_FIELD, CANCELLED_FIELD = "-run", "-cancelled"
#: Tries of the compare-and-set before giving up on a step another run keeps changing.
CLAIM_TRIES = 5
#: Seconds a pipeline's record is kept after its last step was recorded (30 days: past the
#: default life of the service records it points to, SOAF_RECORD_TTL).
PIPELINE_TTL = 30 * 86400

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_name(kind: str, name: Any) -> str:
    """``name`` when it is a valid pipeline or step name, else PipelineError saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PipelineError(f"{kind} name {name!r} must be 1-128 letters, digits or '_.-', "
                            "starting with a letter or digit")
    return name


class Ledger:
    """The Redis record of one run of a named pipeline; opening it starts a new run."""

    def __init__(self, client: Client, name: str) -> None:
        self.client, self.name = client, check_name("pipeline", name)
        self.key = client.keys.pipeline(name)
        self.run = uuid.uuid4().hex
        self.order: dict[str, int] = {}  # step name -> its place in the pipeline, from 1
        pipe = client.redis.pipeline(transaction=True)
        pipe.hset(self.key, RUN_FIELD, self.run)
        pipe.expire(self.key, PIPELINE_TTL)
        client._call(pipe.execute)

    def step_name(self, name: str | None) -> str:
        """The name of the pipeline's next step: ``name``, or ``step-<n>`` by its order;
        PipelineError for a name already used (steps are matched by name)."""
        name = check_name("step", name or f"step-{len(self.order) + 1}")
        if name in self.order:
            raise PipelineError(f"step name {name!r} is used twice in pipeline {self.name!r}; "
                                "a named pipeline matches its steps by name")
        self.order[name] = len(self.order) + 1
        return name

    def submit(self, step: str, template: ServiceParamTemplate) -> bool:
        """Attach the step to its earlier service or submit it; True when it attached.

        Either way ``template.service_id`` names the step's service afterwards.
        PipelineError when the pipeline was cancelled with ``soaf pipelines cancel``.
        """
        if self._claim(step, self.order.get(step, 0), template):
            log.info("step %r of pipeline %r attached to %s", step, self.name,
                     template.service_id)
            return True
        try:
            self.client.submit(template)
        except DuplicateService:  # a concurrent run of the script submitted it first
            return True
        return False

    def _claim(self, step: str, order: int, template: ServiceParamTemplate) -> bool:
        digest = template_digest(template)
        for _ in range(CLAIM_TRIES):
            raw = self.client._call(self.client.redis.hget, self.key, step)
            entry = _entry(raw)
            if entry is not None and entry.get("digest") == digest:
                state = self._state(entry["id"])
                if state is None or state not in RERUN_STATES:
                    template.service_id = entry["id"]
                    return state is not None  # None: recorded but never submitted
            if self._state(template.service_id) is not None:
                template.service_id = new_service_id()  # an earlier run's id
            new = json.dumps({"id": template.service_id, "digest": digest,
                              "service": template.service, "n": order, "at": time.time()})
            done = self.client._call(
                RECORD_STEP.run, self.client.redis, [self.key, self.client.keys.pipelines],
                [step, raw or b"", new, self.name, time.time(), self.run, PIPELINE_TTL])
            if done == -1:
                raise PipelineError(f"pipeline {self.name!r} was cancelled (soaf pipelines "
                                    f"cancel); step {step!r} is not submitted")
            if done == 1:
                return False
        raise PipelineError(f"step {step!r} of pipeline {self.name!r} keeps being changed by "
                            "another run of it; run the script once at a time")

    def _state(self, service_id: str) -> str | None:
        raw = self.client._call(self.client.redis.hget, self.client.keys.service(service_id),
                                "state")
        return None if raw is None else str(json.loads(raw))


def _entry(raw: bytes | None) -> dict[str, Any] | None:
    """A step's entry, or None for none or one that cannot be read (then replaced)."""
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("id"), str) else None


# -- what `soaf pipelines` shows and does ------------------------------------------------------

def list_pipelines(client: Client, *, limit: int = 50) -> list[dict[str, Any]]:
    """The named pipelines, most recently active first, each as ``describe`` gives it."""
    names = client._call(client.redis.zrevrange, client.keys.pipelines, 0, limit - 1)
    found = []
    for raw in names:
        one = describe(client, raw.decode())
        if one is None:  # its record expired (PIPELINE_TTL): forget the name too
            client._call(client.redis.zrem, client.keys.pipelines, raw)
        else:
            found.append(one)
    return found


def describe(client: Client, name: str) -> dict[str, Any] | None:
    """``{name, cancelled, updated_at, steps: [{step, service, service_id, state,
    progress}]}`` in step order (states read now), or None for no such pipeline."""
    data = client._call(client.redis.hgetall, client.keys.pipeline(name))
    if not data:
        return None
    fields = {k.decode(errors="replace"): v for k, v in data.items()}
    run, cancelled = fields.pop(RUN_FIELD, None), fields.pop(CANCELLED_FIELD, None)
    steps = sorted(((step, entry) for step, raw in fields.items()
                    if (entry := _entry(raw)) is not None),
                   key=lambda se: (se[1].get("n", 0), se[0]))
    pipe = client.redis.pipeline(transaction=False)
    for _, entry in steps:
        pipe.hmget(client.keys.service(entry["id"]), ["state", "progress"])
    live = client._call(pipe.execute) if steps else []
    rows = []
    for (step, entry), (state, progress) in zip(steps, live):
        rows.append({"step": step, "service": entry.get("service"), "service_id": entry["id"],
                     "state": json.loads(state) if state else "not submitted",
                     "progress": json.loads(progress) if progress else None})
    return {"name": name, "cancelled": cancelled is not None and cancelled == run,
            "updated_at": max((e.get("at", 0) for _, e in steps), default=None),
            "steps": rows}


def cancel_pipeline(client: Client, name: str) -> list[tuple[str, str]]:
    """Stop the pipeline ``name``: its current run submits no more steps, and every step
    service not final is cancelled. ``(step, what happened)`` for each cancelled one."""
    key = client.keys.pipeline(name)
    run = client._call(client.redis.hget, key, RUN_FIELD)
    found = describe(client, name)
    if found is None or run is None:
        raise PipelineError(f"no pipeline named {name!r}; `soaf pipelines` lists them")
    client._call(client.redis.hset, key, CANCELLED_FIELD, run)
    return [(s["step"], client.cancel(s["service_id"])) for s in found["steps"]
            if s["state"] not in FINAL_VALUES and s["state"] != "not submitted"]
