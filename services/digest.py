"""The digest service: describes text files fetched from anywhere (see docs/data.md).

It only says how to run the black box; soaf's defaults fetch the template's
``input_files`` (paths or URLs) into the work dir before, and check, checksum and copy
its ``output_files`` to ``output_target`` after.
"""

from soaf import ServiceProgramTemplate


class Digest(ServiceProgramTemplate):
    name = "digest"
    program = "examples/programs/digest.py"  # copied into the work dir by build()
    timeout = 600

    def command(self) -> list[str]:
        delay = str(self.template.args.get("delay", 0.5))
        return ["./digest.py", "--delay", delay, *self.template.input_names()]
