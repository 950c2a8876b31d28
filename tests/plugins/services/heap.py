"""A trivial service whose handler looks at the core's heap (tests/e2e/test_core_memory.py)."""

from soaf import ServiceProgramTemplate


class Heap(ServiceProgramTemplate):
    """Runs ``true``; its handler arms or reads a garbage count (args: do)."""

    name = "heap"

    def command(self):
        return ["true"]
