"""Test services that try to lead soaf out of the work dir, or read the core's secrets."""

import os

from soaf import ServiceProgramTemplate


class LinkInBuild(ServiceProgramTemplate):
    """build() plants a symlink ``data`` -> args['target'] before inputs are staged."""

    name = "link-in-build"

    def build(self):
        os.symlink(self.template.args["target"], self.work_dir / "data")

    def prepare_input_file(self):
        # Deliberately naive: a plugin that trusts the names. soaf checks them again
        # after build(), so this is never reached with a link in place.
        for name, source in self.template.input_sources().items():
            with open(source, "rb") as src, open(self.work_dir / name, "wb") as out:
                out.write(src.read())

    def command(self):
        return ["true"]


class LinkInRun(ServiceProgramTemplate):
    """The program itself makes ``results`` a symlink to args['target']."""

    name = "link-in-run"

    def command(self):
        return ["ln", "-s", self.template.args["target"], "results"]


class EnvDump(ServiceProgramTemplate):
    """Writes the program's environment to env.txt."""

    name = "envdump"

    def command(self):
        return ["sh", "-c", "env > env.txt"]
