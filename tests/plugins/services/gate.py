"""A test service whose progress the test drives: it advances one step per go<I> file."""

from soaf import ServiceProgramTemplate


class Gate(ServiceProgramTemplate):
    """Runs programs/gate.sh; args: n (steps). Create go1, go2 ... in its work dir."""

    name = "gate"
    program = "programs/gate.sh"

    def command(self):
        return ["./gate.sh", str(self.template.args.get("n", 3))]
