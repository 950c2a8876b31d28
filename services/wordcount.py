"""The wordcount service: runs examples/programs/wordcount.py on the template's inputs."""

from soaf import ServiceProgramTemplate


class WordCount(ServiceProgramTemplate):
    name = "wordcount"
    program = "examples/programs/wordcount.py"  # copied into the work dir by build()
    timeout = 600

    def command(self) -> list[str]:
        delay = str(self.template.args.get("delay", 1.0))
        return ["./wordcount.py", "--delay", delay, *self.template.input_names()]
