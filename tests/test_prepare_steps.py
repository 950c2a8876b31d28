"""The steps before a program starts: those that keep soaf's base method (no plugin code,
nothing to wait on) are called directly, the others through the guarded ``call``, and
every step still runs, in order, with the same results and errors."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from soaf.config import Settings
from soaf.plugin.handler import DefaultHandler, WatcherHandler
from soaf.plugin.program import ServiceProgramTemplate
from soaf.plugin.service import Service
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.control import Halt
from soaf.run.prepare import PhaseError, Preparation, plain_steps


class TrueProgram(ServiceProgramTemplate):
    name = "true"

    def command(self) -> list[str]:
        return ["true"]


class BuildingProgram(TrueProgram):
    def build(self) -> None:
        (self.work_dir / "built").write_text("yes")


class ProgramFile(ServiceProgramTemplate):
    name = "true"
    program = "run.sh"


class OwnInit(TrueProgram):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


class OwnHandler(WatcherHandler):
    def __init__(self) -> None:
        self.made = True


def prepare(tmp_path: Path, program_cls: type, handler_cls: type = DefaultHandler,
            **template: Any) -> tuple[Preparation, list[str], tuple[Any, Any, Any]]:
    settings = Settings(work_root=tmp_path, plugins=tmp_path)
    tmpl = ServiceParamTemplate("true", **template)
    work_dir = tmp_path / tmpl.service_id
    work_dir.mkdir(parents=True)
    host = SimpleNamespace(
        template=tmpl, engines=SimpleNamespace(settings=settings), halt=Halt(),
        plugin=SimpleNamespace(program_cls=program_cls, handler_cls=handler_cls, version="1"),
        resolve=lambda ref: ref, emit=lambda values, attempt=None: None,
        journal_step=lambda step, **info: {})
    service = Service(tmpl, work_dir, attempt=1, node="n", plugin_version="1",
                      emit=lambda values: None)
    guarded: list[str] = []

    def call(step: str, fn: Any, *args: Any) -> Any:
        guarded.append(step)
        return fn(*args)

    prep = Preparation(host, 1, work_dir, service, call,  # type: ignore[arg-type]
                       on_handler=lambda handler: None)
    return prep, guarded, prep.run()


def test_base_steps_are_called_directly_and_plugin_code_through_the_guard(tmp_path):
    prep, guarded, (argv, env, cwd) = prepare(tmp_path, TrueProgram)
    assert guarded == ["command"]
    assert argv == ["true"] and env["SOAF_SERVICE_ID"] == prep.host.template.service_id
    assert cwd == prep.work_dir and isinstance(prep.handler, DefaultHandler)
    assert prep.program.service is prep.service and prep.program.staging.stop() is False


def test_overridden_steps_and_own_constructors_go_through_the_guard(tmp_path):
    prep, guarded, _ = prepare(tmp_path / "a", BuildingProgram)
    assert guarded == ["build", "command"] and (prep.work_dir / "built").exists()
    prep, guarded, _ = prepare(tmp_path / "b", OwnInit, OwnHandler)
    assert guarded == ["handler", "program", "command"] and prep.handler.made


def test_steps_that_may_wait_go_through_the_guard(tmp_path):
    """Inputs to stage, names to check, a program file to copy in: the guard sees them."""
    _, guarded, _ = prepare(tmp_path / "a", TrueProgram, input_files=["/etc/hostname"])
    assert guarded == ["work dir check", "prepare_input_file", "command"]
    _, guarded, _ = prepare(tmp_path / "b", TrueProgram, output_files=["out.txt"])
    assert guarded == ["work dir check", "prepare_input_file", "command"]
    assert "build" not in plain_steps(ProgramFile, DefaultHandler)
    assert "command" in plain_steps(ProgramFile, DefaultHandler)


def test_a_base_step_that_raises_fails_the_phase_it_is_in(tmp_path):
    class NoCommand(ServiceProgramTemplate):
        name = "true"

    with pytest.raises(PhaseError) as caught:
        prepare(tmp_path, NoCommand)
    assert caught.value.phase == "command"


def test_the_classes_of_a_plugin_reloaded_away_are_not_kept_by_the_steps_cache():
    class Old(ServiceProgramTemplate):
        name = "true"

    class OldHandler(DefaultHandler):
        pass

    assert "command" in plain_steps(Old, OldHandler)
    gone, gone_handler = weakref.ref(Old), weakref.ref(OldHandler)
    del Old, OldHandler
    gc.collect()
    assert gone() is None and gone_handler() is None
