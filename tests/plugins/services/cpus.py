"""A service that prints the CPUs it may run on (tests/e2e/test_core_cpu.py)."""

from soaf import ServiceProgramTemplate


class Cpus(ServiceProgramTemplate):
    """Prints its ``Cpus_allowed_list`` line: which CPUs a program of the core gets."""

    name = "cpus"

    def command(self):
        return ["grep", "Cpus_allowed_list", "/proc/self/status"]
