"""References: turning paths into a finished step's work dir into ``soaf://`` references.

A pipeline step names a previous step's output by its path (``Step.output``), which is
what a client can open. Handed on as a path, the next core would copy it. Handed on as a
reference (``soaf.output_ref``), the core reflinks or hard-links it instead
(``soaf.data.cloning``): a 2 GB file costs no copy at each step. Only the text is
rewritten; nothing here touches a file system, so it works on any client machine.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping

from soaf.protocol.template import ServiceParamTemplate, is_url, output_ref


def refer(template: ServiceParamTemplate, producers: Iterable[tuple[str, str]]) -> None:
    """Rewrite ``template.input_files`` entries that are paths inside one of the
    ``(service_id, work_dir)`` of ``producers`` into references to those outputs."""
    dirs = [(sid, posixpath.normpath(wd)) for sid, wd in producers if sid and wd]
    if not dirs:
        return

    def swap(source: str) -> str:
        if not isinstance(source, str) or is_url(source) or not posixpath.isabs(source):
            return source
        path = posixpath.normpath(source)
        for sid, work_dir in dirs:
            if path.startswith(work_dir + "/"):
                return output_ref(sid, path[len(work_dir) + 1:])
        return source

    files = template.input_files
    if isinstance(files, Mapping):
        template.input_files = {name: swap(src) for name, src in files.items()}
    else:  # a reference keeps the path's last component, so each entry keeps its name
        template.input_files = [swap(src) for src in files]
