"""The rules of one service run: its limits and retries, resolved once from the template
and its service.

A template's value wins where it sets one (``None`` means "not set": a template's
``retries=0`` means no retries, whatever the service says); otherwise the service's
class attribute applies. First attempts, retries and a core that recovers a run all ask
``policy_for``, so they can never disagree about a service's limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from soaf.protocol.state import State
from soaf.protocol.template import ServiceParamTemplate

#: Lost attempts allowed when neither the template nor the service says.
DEFAULT_MAX_LOST = 3
#: Outcomes that may be retried (a cancelled service never is).
RETRYABLE = frozenset({State.FAILED.value, State.TIMED_OUT.value})


@dataclass(frozen=True)
class Needs:
    """CPUs and memory (MiB) a run holds on its core while it runs."""

    cpus: float = 0.0
    memory_mb: float = 0.0

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU{'' if self.cpus == 1 else 's'}"] if self.cpus else []
        if self.memory_mb:
            parts.append(f"{self.memory_mb:g} MiB")
        return " and ".join(parts)


@dataclass(frozen=True)
class Policy:
    """Limits and retry rules of one run."""

    timeout: float | None = None
    max_memory_kb: int | None = None
    retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    retry_on: frozenset[str] | None = None
    #: Attempts that may be lost (core died or stopped without draining); they never
    #: count against ``retries``.
    max_lost: int = DEFAULT_MAX_LOST
    #: What a run needs of its core while it runs (None: nothing counted but a slot).
    needs: Needs | None = None

    @property
    def max_attempts(self) -> int:
        """Attempts a program's failures may use: the first one and its retries."""
        return 1 + self.retries

    def retry_delay(self, state: str, failure: str | None, failed: int) -> float | None:
        """Seconds before the next attempt after one that ended ``state`` (with
        ``failure``), when ``failed`` attempts have failed so far; None: no retry."""
        if state not in RETRYABLE:
            return None
        if self.retry_on is not None and failure not in self.retry_on:
            return None
        if failed > self.retries:
            return None
        return float(min(self.retry_backoff * 2 ** (failed - 1), self.retry_backoff_max))


def _pick(template: ServiceParamTemplate, program: Any, name: str, default: Any) -> Any:
    own = getattr(template, name, None)
    if own is not None:
        return own
    value = getattr(program, name, default)
    return default if value is None else value


def needs_for(template: ServiceParamTemplate, program: Any) -> Needs | None:
    """What ``template`` run by ``program`` needs of its core; None when neither declares
    CPUs or memory (the common case, checked with four attribute reads)."""
    cpus = _pick(template, program, "cpus", None)
    memory = _pick(template, program, "memory_mb", None)
    if cpus is None and memory is None:
        return None
    return Needs(cpus=float(cpus or 0.0), memory_mb=float(memory or 0.0))


def policy_for(template: ServiceParamTemplate, program: Any) -> Policy:
    """The policy of ``template`` run by the service class ``program`` (None: no service
    class known, only the template's own values count)."""
    timeout = _pick(template, program, "timeout", None)
    memory = _pick(template, program, "max_memory_mb", None)
    retry_on = getattr(program, "retry_on", None)
    return Policy(
        timeout=float(timeout) if timeout is not None else None,
        max_memory_kb=int(float(memory) * 1024) if memory else None,
        retries=max(0, int(_pick(template, program, "retries", 0))),
        retry_backoff=float(_pick(template, program, "retry_backoff", 1.0)),
        retry_backoff_max=float(getattr(program, "retry_backoff_max", 300.0) or 300.0),
        retry_on=frozenset(retry_on) if retry_on is not None else None,
        max_lost=max(0, int(_pick(template, program, "max_lost", DEFAULT_MAX_LOST))),
        needs=needs_for(template, program),
    )
