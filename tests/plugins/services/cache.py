"""Test services for the result cache: a checksum of the inputs, written to sum.txt."""

from soaf import ServiceProgramTemplate


class Checksum(ServiceProgramTemplate):
    """sha256 of every input into sum.txt; args: salt (printed into it too)."""

    name = "checksum"

    def command(self):
        salt = str(self.template.args.get("salt", ""))
        names = " ".join(self.template.input_names())
        return ["sh", "-c", f'cat {names} | sha256sum > sum.txt; echo "{salt}" >> sum.txt']


class CacheableChecksum(Checksum):
    """The same, with every template answered from the cache when it can be."""

    name = "checksum-cacheable"
    cacheable = True
