"""Services for the recovery tests."""

import sys

from soaf import ServiceProgramTemplate


class Hold(ServiceProgramTemplate):
    """Runs programs/hold.py; args: seconds, logdir, code, until (a path)."""

    name = "hold"
    program = "programs/hold.py"

    def command(self):
        a = self.template.args
        return [sys.executable, "hold.py", str(a.get("seconds", 2)), a["logdir"],
                self.template.service_id, str(a.get("code", 0)), a.get("until", "")]


class ExitAfter(Hold):
    """hold.py, whose handler kills the core in after_watch_callback."""

    name = "exit_after"


class ExitChange(Hold):
    """hold.py, whose handler kills the core in file_change_callback."""

    name = "exit_change"
