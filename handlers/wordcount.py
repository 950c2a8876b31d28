"""Follows a wordcount run: progress is the share of inputs already counted."""

from soaf import WatcherHandler


class WordCountHandler(WatcherHandler):
    service = "wordcount"

    def before_watch_callback(self, service):
        service.set(inputs=len(service.template.input_names()))
        service.message = "counting"

    def file_change_callback(self, service, files):
        done = [f for f in files if f.startswith("counts/")]
        total = len(service.template.input_names()) or 1
        service.progress = len(done) / total
        service.set(counted=len(done))

    def after_watch_callback(self, service, files):
        total_file = service.work_dir / "total.txt"
        if total_file.exists():
            service.set(total_words=int(total_file.read_text()))
            service.progress = 1.0
            service.message = "done"
