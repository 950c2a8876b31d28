"""Shows the template's text as the message and a custom field, as a careless handler might."""

from soaf import WatcherHandler


class ShowHandler(WatcherHandler):
    service = "show"

    def before_watch_callback(self, service):
        service.message = service.template.args.get("message", "")
        service.set(label=service.template.args.get("label", ""))

    def file_change_callback(self, service, files):
        steps = [f for f in files if f.startswith("step") and f.endswith(".txt")]
        service.progress = len(steps) / max(1, int(service.template.args.get("n", 3)))

    def after_watch_callback(self, service, files):
        (service.work_dir / "result.txt").write_text(service.template.args.get("message", ""))
