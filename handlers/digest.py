"""Follows a digest run: progress is the share of inputs already described."""

import json

from soaf import WatcherHandler


class DigestHandler(WatcherHandler):
    service = "digest"

    def before_watch_callback(self, service):
        service.message = f"describing {len(service.inputs)} staged inputs"

    def file_change_callback(self, service, files):
        done = [f for f in files if f.startswith("reports/")]
        service.progress = len(done) / (len(service.template.input_names()) or 1)

    def after_watch_callback(self, service, files):
        # soaf checks, checksums and uploads the outputs after this callback returns;
        # here the handler only lifts the summary into the record for quick reading.
        summary = service.work_dir / "summary.json"
        if summary.exists():
            service.set(summary=json.loads(summary.read_text()))
            service.message = "done"
