"""Follow the loop example's services; put their results on the record, readable anywhere."""

import json

from handlers.progress import ProgressFromOutput


class RefineHandler(ProgressFromOutput):
    service = "refine"

    def after_watch_callback(self, service, files):
        out = service.work_dir / "refined.txt"
        if out.exists():
            service.set(estimate=float(out.read_text()))
            service.progress = 1.0


class EvaluateHandler(ProgressFromOutput):
    service = "evaluate"

    def after_watch_callback(self, service, files):
        out = service.work_dir / "report.json"
        if out.exists():
            report = json.loads(out.read_text())
            service.set(estimate=report["estimate"], error=report["error"])
            service.progress = 1.0
