"""The services of the diamond example: tokenize texts, count words, merge the counts."""

from soaf import ServiceProgramTemplate


class Tokenize(ServiceProgramTemplate):
    """Input ``text.txt``, output ``words.txt`` (one word per line). args: ``delay``."""

    name = "tokenize"
    program = "examples/programs/tokenize.py"
    timeout = 300

    def command(self) -> list[str]:
        delay = str(self.template.args.get("delay", 1.0))
        return ["./tokenize.py", "--delay", delay, "text.txt", "words.txt"]


class Count(ServiceProgramTemplate):
    """Input ``words.txt``, output ``counts.json``. args: ``delay``."""

    name = "count"
    program = "examples/programs/count.py"
    timeout = 300

    def command(self) -> list[str]:
        delay = str(self.template.args.get("delay", 0.5))
        return ["./count.py", "--delay", delay, "words.txt", "counts.json"]


class Merge(ServiceProgramTemplate):
    """Inputs: any number of word-count files; outputs ``merged.json`` and ``top.txt``.

    args: ``delay``, ``top`` (how many words top.txt lists).
    """

    name = "merge"
    program = "examples/programs/merge.py"
    timeout = 300

    def command(self) -> list[str]:
        a = self.template.args
        return ["./merge.py", "--delay", str(a.get("delay", 0.5)), "--top", str(a.get("top", 5)),
                "merged.json", *self.template.input_names()]
