"""A service whose progress needs no handler: the core counts the chunk files it wrote."""

from soaf import ServiceProgramTemplate, probes


class Chunks(ServiceProgramTemplate):
    """Writes ``args["chunks"]`` files ``out/chunk_*.json``; args: ``chunks``, ``delay``."""

    name = "chunks"
    program = "examples/programs/chunks.py"
    timeout = 600
    progress = probes.files("out/chunk_*.json", total=lambda t: t.args["chunks"])

    def command(self) -> list[str]:
        a = self.template.args
        return ["./chunks.py", "--delay", str(a.get("delay", 0.5)), str(a["chunks"])]
