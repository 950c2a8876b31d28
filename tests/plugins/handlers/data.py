"""Handler of the shell test service: its after_watch_callback may still write a file."""

from soaf import WatcherHandler


class ShellHandler(WatcherHandler):
    service = "shell"

    def after_watch_callback(self, service, files):
        name = service.template.args.get("after_write")
        if name:
            (service.work_dir / name).write_text("written by after_watch_callback\n")
        service.set(outputs_seen_by_after=list(service.outputs))
