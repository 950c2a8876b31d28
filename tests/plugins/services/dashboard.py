"""A service for the dashboard tests: steps.sh, whose handler shows what the template says."""

from soaf import ServiceProgramTemplate


class Show(ServiceProgramTemplate):
    """Runs programs/steps.sh; args: n, delay, message, label."""

    name = "show"
    program = "programs/steps.sh"

    def command(self):
        a = self.template.args
        return ["./steps.sh", str(a.get("n", 3)), str(a.get("delay", 0.1))]
