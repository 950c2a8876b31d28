"""The services of the loop example: refine an estimate of a square root, evaluate it."""

from soaf import ServiceProgramTemplate


class Refine(ServiceProgramTemplate):
    """One Newton step: input ``estimate.txt``, output ``refined.txt``.

    args: ``target`` (default 2), ``delay`` seconds the program pretends to work.
    """

    name = "refine"
    program = "examples/programs/refine.py"
    timeout = 300

    def command(self) -> list[str]:
        a = self.template.args
        return ["./refine.py", "--target", str(a.get("target", 2.0)),
                "--delay", str(a.get("delay", 0.5)), "estimate.txt", "refined.txt"]


class Evaluate(ServiceProgramTemplate):
    """The error of an estimate: input ``estimate.txt``, output ``report.json``."""

    name = "evaluate"
    program = "examples/programs/evaluate.py"
    timeout = 300

    def command(self) -> list[str]:
        a = self.template.args
        return ["./evaluate.py", "--target", str(a.get("target", 2.0)),
                "--delay", str(a.get("delay", 0.3)), "estimate.txt", "report.json"]
