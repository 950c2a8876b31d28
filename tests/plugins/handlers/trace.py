"""The steps handler records the order of its callbacks and what they saw."""

import json

from soaf import WatcherHandler


class StepsHandler(WatcherHandler):
    service = "steps"

    def before_watch_callback(self, service):
        service.set(order=["before"], extra_before=getattr(service.template, "color", None),
                    work_dir_before=str(service.work_dir))

    def file_change_callback(self, service, files):
        order = service.fields["order"]
        if order[-1] != "change":
            service.set(order=[*order, "change"])
        steps = [f for f in files if f.startswith("step") and f.endswith(".txt")]
        service.progress = len(steps) / max(1, int(service.template.args.get("n", 3)))
        service.set(last_files=files)

    def after_watch_callback(self, service, files):
        steps = [f for f in files if f.startswith("step") and f.endswith(".txt")]
        service.progress = len(steps) / max(1, int(service.template.args.get("n", 3)))
        build = json.loads((service.work_dir / "build.json").read_text())
        prepare = json.loads((service.work_dir / "prepare.json").read_text())
        service.set(
            order=[*service.fields["order"], "after"],
            final_files=files,
            build_trace=build,
            prepare_work_dir=prepare["work_dir"],
            extra_after=getattr(service.template, "color", None),
            work_dir_after=str(service.work_dir),
        )
