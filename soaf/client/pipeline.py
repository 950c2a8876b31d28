"""Pipelines: chain services from the client, one step's output files feeding the next.

Plain Python does the sequencing (``if``, ``while``, functions); a ``Pipeline`` adds
what plain calls lack: steps that start by themselves once the steps they need have
succeeded, outputs handed on as inputs, failures that stop only what depends on them,
and one ``cancel()`` for everything still running::

    with Pipeline(client) as p:
        a = p.run(ServiceParamTemplate("tokenize", input_files=["/data/a.txt"],
                                       output_files=["words.txt"]))
        b = p.run(lambda a: ServiceParamTemplate(
            "count", input_files={"words.txt": a.output("words.txt")}), after=[a])
        print(b.wait().fields)

Where outputs live (a handler's ``outputs`` field, an object store given as ``store``, a
URL under ``url_base``, a path in the step's work dir) is told in docs/pipelines.md and
soaf.client.locations. A pipeline with a ``name`` records its steps in Redis so that a
later run of its script re-attaches to them (client/ledger.py).
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from soaf.client.ledger import Ledger
from soaf.client.locations import check_store, locate, store_target, uploaded
from soaf.client.references import refer
from soaf.client.sync import Client
from soaf.errors import PipelineError, RedisUnavailable, SoafError, StepFailed, WaitTimeout
from soaf.protocol.state import ServiceRecord
from soaf.protocol.template import ServiceParamTemplate, check_relative

log = logging.getLogger(__name__)

#: Seconds a step keeps waiting for its service while Redis is unreachable.
REDIS_GRACE = 30.0

TemplateFactory = Callable[..., ServiceParamTemplate]

#: Client-side states of a step, until its service's final record replaces them.
WAITING, SUBMITTED, SKIPPED, ERROR = "waiting", "submitted", "skipped", "error"


class Step:
    """One service run of a pipeline; made by ``Pipeline.run``."""

    def __init__(self, pipeline: Pipeline, template: ServiceParamTemplate | TemplateFactory,
                 after: tuple[Step, ...], name: str | None) -> None:
        self.pipeline = pipeline
        self.after = after
        self.template: ServiceParamTemplate | None = None
        self._factory: TemplateFactory | None = None
        if isinstance(template, ServiceParamTemplate):
            self.template = template
        else:
            self._factory = template
        self._name = name
        self.service_id: str | None = None
        self.attached = False  # the service was submitted by an earlier run of the pipeline
        self.record: ServiceRecord | None = None
        self.error: str | None = None  # why a step that never finished running ended
        self.cause: Step | None = None
        self._state = WAITING
        self._done = threading.Event()
        self._observed = False

    # -- what a caller reads ------------------------------------------------------------

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        return self.template.service if self.template is not None else "step"

    @property
    def state(self) -> str:
        """``waiting`` (for the steps it needs), ``submitted``, ``skipped`` (a step it
        needs failed, or the pipeline was cancelled), ``error`` (its template could not
        be built or submitted), or the final state of its service."""
        return self.record.state if self.record is not None else self._state

    @property
    def ok(self) -> bool:
        return self.record is not None and self.record.ok

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> ServiceRecord:
        """The final record once the step succeeded; StepFailed if it did not or could
        not run, WaitTimeout if it is not done within ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise WaitTimeout(f"{self.label} is still {self.state} after {timeout:g} s")
        self._observed = True
        if not self.ok:
            raise self.failure()
        assert self.record is not None
        return self.record

    def output(self, name: str) -> str:
        """Where the output file ``name`` of this (succeeded) step is: a path or a URL."""
        record = self.wait()
        recorded = record.fields.get("outputs")
        if isinstance(recorded, dict) and name in recorded:
            return str(recorded[name])
        check_relative("output", name)
        return self.pipeline._locate(self, record, name)

    @property
    def outputs(self) -> dict[str, str]:
        """Every output of this (succeeded) step: the template's ``output_files`` (globs
        expanded) and whatever the handler recorded in ``outputs``; name -> location."""
        record = self.wait()
        assert self.template is not None
        recorded = record.fields.get("outputs")
        recorded = recorded if isinstance(recorded, dict) else {}
        out: dict[str, str] = {}
        for pattern in self.template.output_files:
            if glob.has_magic(pattern):
                names = [n for n in recorded if fnmatch.fnmatch(n, pattern)]
                for found in names or self._glob(record, pattern):
                    out[found] = self.output(found)
            else:
                out[pattern] = self.output(pattern)
        for name, where in recorded.items():
            out.setdefault(name, str(where))
        return out

    @property
    def label(self) -> str:
        what = self.template.service if self.template is not None else "not built yet"
        ident = f", {self.service_id}" if self.service_id else ""
        return f"step {self.name!r} ({what}{ident})"

    def failure(self) -> StepFailed:
        """The StepFailed that describes why this step did not succeed."""
        cause = self.cause or self
        self._observed = cause._observed = True
        if self.cause is not None:
            text = f"{self.label} {self.state}: {self.error}"
        else:
            detail = self.error or (self.record.error if self.record else None) or "no detail"
            text = f"{self.label} {self.state}: {detail}"
        return StepFailed(text, step=self, cause=cause, record=self.record)

    def _glob(self, record: ServiceRecord, pattern: str) -> list[str]:
        if self.pipeline.store:
            return uploaded(record, pattern)
        work_dir = Path(str(record.get("work_dir") or ""))
        if not record.get("work_dir") or not work_dir.is_dir():
            raise PipelineError(
                f"cannot expand {pattern!r} of {self.label}: its work dir is on node "
                f"{record.node}, not visible here; name outputs exactly or record them "
                "from the handler (service.set(outputs={...}))"
            )
        return sorted(str(p.relative_to(work_dir)) for p in work_dir.glob(pattern) if p.is_file())

    def __repr__(self) -> str:
        return f"<Step {self.name} {self.state} {self.service_id or ''}>".replace(" >", ">")

    # -- driving (the pipeline's side) ------------------------------------------------------

    def _settle(self, *, record: ServiceRecord | None = None, state: str | None = None,
                error: str | None = None, cause: Step | None = None) -> None:
        with self.pipeline._cond:
            self.record = record
            if state is not None:
                self._state = state
            self.error, self.cause = error, cause
            self._done.set()
            self.pipeline._cond.notify_all()
        if not self.ok:
            log.info("%s ended %s: %s", self.label, self.state,
                     error or (record.error if record else ""))

    def _build(self) -> ServiceParamTemplate:
        if self.template is None:
            assert self._factory is not None
            template = self._factory(*self.after)
            if not isinstance(template, ServiceParamTemplate):
                raise PipelineError(
                    f"the template function of step {self.name!r} returned "
                    f"{type(template).__name__}, not a ServiceParamTemplate")
            self.template = template
        refer(self.template, [(d.service_id or "", str(d.record.get("work_dir") or ""))
                              for d in self.after if d.record])
        self.template.validate()
        return self.template

    def _drive(self) -> None:
        """The step's thread: wait for what it needs, submit, wait for the service."""
        if self.done():
            return
        try:
            if self.service_id is None:
                blocker = self.pipeline._blocker(self.after)
                if blocker == "cancelled":
                    self._settle(state=SKIPPED, error="the pipeline was cancelled")
                    return
                if isinstance(blocker, Step):
                    cause = blocker.cause or blocker
                    self._settle(state=SKIPPED, cause=cause,
                                 error=f"{cause.label} {cause.state}: "
                                       f"{cause.error or (cause.record.error if cause.record else '')}")
                    return
                self._build()
                if not self.pipeline._submit(self):
                    return
            self._settle(record=self._wait_final())
        except Exception as e:
            log.debug("%s could not run", self.label, exc_info=True)
            self._settle(state=ERROR, error=f"{type(e).__name__}: {e}")

    def _wait_final(self) -> ServiceRecord:
        assert self.service_id is not None
        outage: float | None = None
        while True:
            try:
                return self.pipeline.client.wait(self.service_id)
            except RedisUnavailable:
                outage = outage or time.monotonic()
                if time.monotonic() - outage > REDIS_GRACE:
                    raise
                time.sleep(1.0)


class Pipeline:
    """Steps run through one ``Client``; use it as a context manager.

    Leaving the ``with`` block normally waits for every step, and raises StepFailed for
    a step that failed and whose failure nobody looked at (``wait``, ``gather`` ...),
    unless the pipeline was cancelled.
    Leaving it through an exception (Ctrl-C included) cancels the running steps.
    """

    def __init__(self, client: Client, *, url_base: str | None = None,
                 store: str | None = None, name: str | None = None) -> None:
        self.client = client
        self.url_base = url_base
        self.store = check_store(store) if store is not None else None
        self.name = name
        self._ledger = Ledger(client, name) if name is not None else None
        self.steps: list[Step] = []
        self.cancelled = False
        self._cond = threading.Condition()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.cancel()
            return
        with self._cond:
            self._cond.wait_for(lambda: all(s.done() for s in self.steps))
        if self.cancelled:
            return  # asked for: the cancelled steps are no surprise
        for step in self.steps:
            if not step.ok and step.cause is None and not step._observed:
                raise step.failure()

    def run(self, template: ServiceParamTemplate | TemplateFactory, *,
            after: Iterable[Step] = (), name: str | None = None) -> Step:
        """Add a step and return it at once.

        ``template`` is a template, or a function that builds one from the finished
        steps in ``after`` (``lambda a, b: ...``), called once they all succeeded.
        A step without ``after`` is validated and submitted right here, so a bad
        template raises at this call; a step whose ``after`` fails is skipped. In a named
        pipeline, an unnamed step is named by its order (``step-3``), and names are unique.
        """
        after = tuple(after)
        for dep in after:
            if not isinstance(dep, Step) or dep.pipeline is not self:
                raise PipelineError(f"after= takes steps of this pipeline, got {dep!r}")
        if self._ledger is not None:
            name = self._ledger.step_name(name)
        step = Step(self, template, after, name)
        if self.cancelled:
            raise PipelineError("the pipeline was cancelled; it runs no new steps")
        with self._cond:
            self.steps.append(step)
        if not after:
            try:
                step._build()
                self._submit(step)
            except BaseException as e:
                step._settle(state=ERROR, error=f"{type(e).__name__}: {e}")
                step._observed = True  # raised right here; nothing left to report
                raise
        threading.Thread(target=step._drive, name=f"soaf-step-{step.name}", daemon=True).start()
        return step

    def gather(self, *steps: Step, timeout: float | None = None) -> list[ServiceRecord]:
        """Wait for ``steps`` (default: all so far); their records in that order.

        Raises StepFailed as soon as one of them fails (the others go on; leave the
        ``with`` block or call ``cancel()`` to stop them), WaitTimeout after ``timeout``.
        """
        chosen = list(steps) or list(self.steps)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not all(s.done() for s in chosen):
                if any(s.done() and not s.ok for s in chosen):
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    waiting = [s.label for s in chosen if not s.done()]
                    raise WaitTimeout(f"not done after {timeout:g} s: {', '.join(waiting)}")
                self._cond.wait(left)
        for step in chosen:
            if step.done() and not step.ok:
                raise step.failure()
        return [s.wait() for s in chosen]

    def cancel(self, *, wait: bool = True, timeout: float | None = 60.0) -> None:
        """Cancel every step not finished: running services are cancelled on their cores,
        steps still waiting are skipped. With ``wait``, return once all have ended."""
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()
            running = [s for s in self.steps if s.service_id and not s.done()]
        for step in running:
            assert step.service_id is not None
            self.client.cancel(step.service_id)
        if wait:
            with self._cond:
                self._cond.wait_for(lambda: all(s.done() for s in self.steps), timeout)

    def report(self) -> str:
        """One line per step: name, service, state, id, and why it did not succeed (the
        last stderr lines of a failed program follow on lines of their own, indented)."""
        lines = []
        for step in list(self.steps):
            service = step.template.service if step.template is not None else "-"
            state = step.state
            why = step.error or (step.record.error if step.record and not step.ok else "") or ""
            if state == SUBMITTED and step.service_id:  # still running: say how far
                try:
                    live = self.client.status(step.service_id)
                except SoafError:
                    live = None
                if live is not None:
                    state = live.state
                    why = f"{live.progress:.0%}" if live.progress is not None else ""
            first, *rest = why.splitlines() or [""]  # an error may end with stderr lines
            lines.append(f"{step.name:<12} {service:<12} {state:<10} "
                         f"{step.service_id or '-':<32} {first}".rstrip())
            lines.extend(f"{'':<12} | {line}" for line in rest)
        return "\n".join(lines)

    # -- the steps' side ----------------------------------------------------------------------

    def _blocker(self, after: tuple[Step, ...]) -> Step | str | None:
        """Wait until all of ``after`` succeeded (None), one did not (that step), or the
        pipeline is cancelled (``"cancelled"``)."""
        with self._cond:
            while True:
                if self.cancelled:
                    return "cancelled"
                for dep in after:
                    if dep.done() and not dep.ok:
                        return dep
                if all(dep.ok for dep in after):
                    return None
                self._cond.wait()

    def _submit(self, step: Step) -> bool:
        """Submit a built step unless the pipeline was cancelled; False if it was."""
        assert step.template is not None
        with self._cond:
            if self.cancelled:
                step._settle(state=SKIPPED, error="the pipeline was cancelled")
                return False
        if self.store and not step.template.output_target:  # into the store, for any host
            step.template.output_target = store_target(self.store)
        if self._ledger is not None:  # it may attach to what an earlier run submitted
            step.attached = self._ledger.submit(step.name, step.template)
        sid = step.template.service_id if self._ledger else self.client.submit(step.template)
        with self._cond:
            step.service_id = sid
            step._state = SUBMITTED
            cancel_now = self.cancelled
        log.info("%s %s", step.label, "attached" if step.attached else "submitted")
        if cancel_now:
            self.client.cancel(sid)
        return True

    def _locate(self, step: Step, record: ServiceRecord, name: str) -> str:
        assert step.template is not None
        return locate(step.label, step.template, record, name, url_base=self.url_base,
                      store=self.store)
