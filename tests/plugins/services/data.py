"""A test service for data staging: runs ``args['script']`` with sh in the work dir."""

from soaf import ServiceProgramTemplate


class Shell(ServiceProgramTemplate):
    """args: script (a sh script; default ``true``)."""

    name = "shell"

    def command(self):
        return ["sh", "-c", self.template.args.get("script", "true")]
