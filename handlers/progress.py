"""A base for handlers of programs that print ``progress k/n`` lines on their output."""

import re

from soaf import WatcherHandler

_PROGRESS = re.compile(rb"progress (\d+)/(\d+)")
#: Bytes read from the end of stdout.log to find the latest progress line.
_TAIL = 4096


class ProgressFromOutput(WatcherHandler):
    """Sets ``service.progress`` from the last ``progress k/n`` line of stdout.log.

    It sets no ``service`` name, so it watches nothing itself; subclasses do.
    """

    def file_change_callback(self, service, files):
        path = service.work_dir / "stdout.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - _TAIL))
                found = _PROGRESS.findall(f.read())
        except FileNotFoundError:
            return
        if found:
            done, total = found[-1]
            service.progress = int(done) / max(1, int(total))
