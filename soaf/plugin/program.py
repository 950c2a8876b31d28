"""ServiceProgramTemplate: the developer's description of how one black box is run.

Subclass it in the ``services/`` package, set ``name`` (the service name templates ask
for) and usually ``program`` and ``command()``. The core calls ``build()`` then
``prepare_input_file()`` in the service's work dir, then runs ``command()`` there, and
after a successful run (and after the handler's ``after_watch_callback``) calls
``collect_output_files()``.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from soaf.data.outputs import collect_outputs, expand_target, upload_outputs
from soaf.data.staging import StageContext, redact, stage_inputs
from soaf.errors import PluginError, ProgramError
from soaf.plugin.probes import Probe
from soaf.protocol.template import ServiceParamTemplate

if TYPE_CHECKING:
    from soaf.plugin.service import Service


class ServiceProgramTemplate:
    """How to prepare and start one service's program.

    Class attributes a subclass may set:
        name: the service name (required, unique among loaded plugins).
        program: path of the executable the default ``build()`` copies into the work dir;
            relative paths are looked up from the plugin root, then the plugin's module.
        timeout: default seconds a run may take (a template's ``timeout`` wins); then the
            program's group gets SIGTERM, SIGKILL after the core's grace period.
        success_codes: exit codes that count as success.
        max_memory_mb: default resident memory (MiB) the program and its children may use
            (a template's ``max_memory_mb`` wins); above it the group is killed and the
            failure is classified ``memory``. None: no limit.
        retries: default further attempts after a failed or timed-out one (a template's
            ``retries`` wins). Cancelled services are never retried.
        retry_backoff: seconds before the first retry (a template's ``retry_backoff`` wins);
            doubled for each further one, up to ``retry_backoff_max``.
        max_lost: attempts that may be lost because their core died (or stopped without
            draining) before the service fails with failure ``lost`` (a template's
            ``max_lost`` wins). Lost attempts are re-run outside ``retries``.
        retry_on: failure kinds that are retried (see ``soaf.run.outcome.FAILURES``); None: all.
        cpus: CPUs a run needs (a template's ``cpus`` wins); a core starts it only while
            they are free on it (see README, Supervision). None: it counts only against
            the core's service slots.
        memory_mb: memory (MiB) a run needs (a template's ``memory_mb`` wins), counted
            against the core's capacity like ``cpus``. Not a limit (``max_memory_mb`` is).
        max_concurrent: how many runs of this service may go at once across all cores
            (None: no cap); one over it waits, ``queued`` with a ``waiting_for`` note.
        cacheable: True: every template of this service is answered from the result
            cache when an earlier run matches (as a template's ``cache=True`` asks).
        progress: a probe (``soaf.probes.files``, ``.log``, ``.file``) that the core
            measures to set the progress, handler or not (see soaf/plugin/probes.py).
        requires: labels a core must have to take this service (e.g. ``{"gpu"}``): only
            cores started with all of them (``--labels``, ``SOAF_LABELS``) read its queue.
        work_dir_policy: ``"fresh"``: a retry runs in a new, empty work dir (the failed
            attempt's dir is kept beside it as ``<dir>.attempt<N>``); ``"reuse"``: a retry
            runs in the same dir, over what the failed attempt left. A template's shared
            ``work_path`` is always reused, never moved.
    """

    name: ClassVar[str] = ""
    program: ClassVar[str | None] = None
    timeout: ClassVar[float | None] = None
    success_codes: ClassVar[tuple[int, ...]] = (0,)
    max_memory_mb: ClassVar[float | None] = None
    retries: ClassVar[int] = 0
    max_lost: ClassVar[int] = 3
    retry_backoff: ClassVar[float] = 1.0
    retry_backoff_max: ClassVar[float] = 300.0
    retry_on: ClassVar[frozenset[str] | None] = None
    work_dir_policy: ClassVar[str] = "fresh"
    cpus: ClassVar[float | None] = None
    memory_mb: ClassVar[float | None] = None
    max_concurrent: ClassVar[int | None] = None
    progress: ClassVar[Probe | None] = None
    cacheable: ClassVar[bool] = False
    requires: ClassVar[frozenset[str] | set[str]] = frozenset()

    def __init__(
        self, template: ServiceParamTemplate, work_dir: Path, *, plugin_root: Path,
        attempt: int = 1,
    ) -> None:
        self.template = template
        self.work_dir = work_dir
        self.plugin_root = plugin_root
        self.attempt = attempt
        #: The live record of this run (set by the core before ``build()``; None when a
        #: program is used on its own). The default data steps record on it.
        self.service: Service | None = None
        #: Fetch timeout and the resolver of ``soaf://`` references, set by the core.
        self.staging = StageContext()

    # -- the steps the core calls, in order -------------------------------------------

    def build(self) -> None:
        """Pre-work in the (already created) work dir; by default copy ``program`` in."""
        if self.program:
            source = self.program_path()
            target = self.work_dir / source.name
            shutil.copy2(source, target)
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def prepare_input_file(self) -> None:
        """Stage ``template.input_files`` into the work dir and record them (``inputs``).

        Local paths are copied (or linked, see ``input_mode``), URLs downloaded through a
        temporary name, ``soaf://`` references to other services' outputs linked or
        fetched. A source that cannot be staged raises ``FetchError``: the service fails
        in ``preparing`` and its program never starts.
        """
        staged = stage_inputs(self.template, self.work_dir, self.staging)
        if staged and self.service is not None:  # no inputs, no event
            self.service.record_inputs([s.to_record() for s in staged])

    def collect_output_files(self) -> None:
        """Check, checksum and ship the outputs after a successful run.

        Runs after ``after_watch_callback`` (which may still write or rename files), so it
        sees the work dir as the developer left it. Every ``output_files`` pattern must
        match (else ``MissingOutputError``: the service fails with the list);
        ``optional_outputs`` are taken when present. Only regular files count; what was
        skipped (a FIFO, a link under a wildcard) is noted in ``outputs_skipped``. The
        files, sizes and sha256 go to the record (``outputs``); with ``output_target``
        they are copied there first. A cancel stops the transfer between two chunks.
        """
        template = self.template
        required = list(template.output_files)
        optional = list(getattr(template, "optional_outputs", ()) or ())
        target = getattr(template, "output_target", None)
        if not required and not optional:
            return
        stop, notes = self.staging.stop, list[str]()
        try:
            outputs = collect_outputs(self.work_dir, required, optional, stop=stop, notes=notes)
        finally:
            if notes and self.service is not None:
                self.service.record_skipped_outputs(notes)
        shown = None
        if target:
            resolved = expand_target(target, template)
            upload_outputs(self.work_dir, outputs, resolved, timeout=self.staging.timeout,
                           stop=stop)
            shown = redact(resolved)
        if self.service is not None:
            self.service.record_outputs([o.to_record() for o in outputs], target=shown)

    def command(self) -> list[str]:
        """The argv of the program, run with the work dir as its working directory."""
        if self.program:
            return ["./" + Path(self.program).name]
        raise PluginError(f"service {self.name!r} sets no program and does not override command()")

    def working_dir(self) -> Path:
        """Where the program runs; by default its work dir."""
        return self.work_dir

    def environment(self) -> dict[str, str]:
        """The program's environment: the core's, the template's ``env``, and soaf's ids."""
        env = base_environment().copy()
        env.update(self.template.env)
        env["SOAF_SERVICE_ID"] = self.template.service_id
        env["SOAF_WORK_DIR"] = str(self.work_dir)
        env["SOAF_ATTEMPT"] = str(self.attempt)
        return env

    # -- helpers ------------------------------------------------------------------------

    def program_path(self) -> Path:
        """Where ``program`` is on this machine; ProgramError when it is nowhere."""
        assert self.program
        candidate = Path(self.program).expanduser()
        if candidate.is_absolute():
            options = [candidate]
        else:
            module_file = getattr(type(self), "_soaf_module_file", None)
            options = [self.plugin_root / candidate]
            if module_file:
                options.append(Path(module_file).parent / candidate)
        for option in options:
            if option.is_file():
                return option
        raise ProgramError(
            f"program {self.program!r} of service {self.name!r} not found "
            f"(looked in {', '.join(str(o) for o in options)})"
        )


@functools.lru_cache(maxsize=1)
def base_environment() -> dict[str, str]:
    """The core's environment without its SOAF_* settings (never leak the secret to a
    black box); read once, since copying os.environ costs more than starting a program."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}

