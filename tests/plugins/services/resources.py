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

