"""Test services that record what soaf did, for end-to-end tests."""

import json
import os

from soaf import ServiceProgramTemplate


class Steps(ServiceProgramTemplate):
    """Runs programs/steps.sh; args: n, delay, code. build/prepare leave traces."""

    name = "steps"
    program = "programs/steps.sh"

    def build(self):
        super().build()
        trace = {
            "step": "build",
            "work_dir": str(self.work_dir),
            "cwd_files": sorted(os.listdir(self.work_dir)),
            "extra": getattr(self.template, "color", None),
            "template_class": type(self.template).__name__,
        }
        (self.work_dir / "build.json").write_text(json.dumps(trace))

    def prepare_input_file(self):
        super().prepare_input_file()
        (self.work_dir / "prepare.json").write_text(json.dumps({"work_dir": str(self.work_dir)}))

    def command(self):
        a = self.template.args
        return ["./steps.sh", str(a.get("n", 3)), str(a.get("delay", 0.1)), str(a.get("code", 0))]


class BadBuild(ServiceProgramTemplate):
    name = "badbuild"

    def build(self):
        raise RuntimeError("build exploded on purpose")

    def command(self):
        return ["true"]


class TrueService(ServiceProgramTemplate):
    name = "true"

    def command(self):
        return ["true"]


class Sleep(ServiceProgramTemplate):
    """Sleeps args['seconds'] (default 30)."""

    name = "sleep"

    def command(self):
        return ["sleep", str(self.template.args.get("seconds", 30))]


class Missing(ServiceProgramTemplate):
    name = "missing"

    def command(self):
        return ["./no-such-program"]
