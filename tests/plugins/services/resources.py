"""Services for the resource tests (with ``shell`` from data.py)."""

import sys
from pathlib import Path

from soaf import ServiceProgramTemplate

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"


class Alloc(ServiceProgramTemplate):
    """tests/programs/alloc.py with args['argv'] (MB, HOLD, RATE)."""

    name = "alloc"

    def command(self):
        argv = [str(a) for a in self.template.args.get("argv", [])]
        return [sys.executable, str(PROGRAMS / "alloc.py"), *argv]



class Crunch(ServiceProgramTemplate):
    """Holds 2 CPUs of its core while it sleeps args['seconds'] (default 1)."""

    name = "crunch"
    cpus = 2

    def command(self):
        return ["sleep", str(self.template.args.get("seconds", 1))]


class Throttled(ServiceProgramTemplate):
    """At most 2 run at once across the fleet; each sleeps args['seconds'] (default 1)."""

    name = "throttled"
    max_concurrent = 2

    def command(self):
        return ["sleep", str(self.template.args.get("seconds", 1))]
