"""Test services whose progress only a probe measures (programs/probe_gate.sh)."""

from soaf import ServiceProgramTemplate, probes


class _ProbeGate(ServiceProgramTemplate):
    """Runs programs/probe_gate.sh; args: n (steps). Create go1, go2 ... in its work dir."""

    program = "programs/probe_gate.sh"

    def command(self):
        return ["./probe_gate.sh", str(self.template.args["n"])]


class ProbeFiles(_ProbeGate):
    name = "probe-files"
    progress = probes.files("out/chunk_*.json", total=lambda t: t.args["n"])


class ProbeLog(_ProbeGate):
    name = "probe-log"
    progress = probes.log(r"step (\d+) of (\d+)")


class ProbeFile(_ProbeGate):
    name = "probe-file"
    progress = probes.file("progress.txt")


class ProbeBroken(_ProbeGate):
    name = "probe-broken"
    progress = probes.files("out/*.json", total=lambda t: t.args["chunks"])  # no such arg
