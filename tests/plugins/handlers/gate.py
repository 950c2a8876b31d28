"""Progress of the gate service: the share of its steps done."""

from soaf import WatcherHandler


class GateHandler(WatcherHandler):
    service = "gate"

    def file_change_callback(self, service, files):
        done = sum(1 for f in files if f.startswith("step"))
        service.progress = done / max(1, int(service.template.args.get("n", 3)))

    def after_watch_callback(self, service, files):
        self.file_change_callback(service, files)  # the last step may come just before the end
