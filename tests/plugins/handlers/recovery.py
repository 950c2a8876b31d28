"""Records every call of before_watch_callback and after_watch_callback in a shared log,
so tests can count them across core crashes."""

import os

from soaf import WatcherHandler


def _log(service, what):
    path = os.path.join(service.template.args["logdir"], "callbacks.log")
    with open(path, "a") as f:
        f.write(f"{what} {service.service_id} {service.attempt} {service.node} "
                f"{int(service.recovered)}\n")


class HoldHandler(WatcherHandler):
    service = "hold"

    def before_watch_callback(self, service):
        _log(service, "before")
        service.set(befores=service.fields.get("befores", 0) + 1)

    def file_change_callback(self, service, files):
        service.set(ticks=len([f for f in files if f.startswith("tick")]))

    def after_watch_callback(self, service, files):
        _log(service, "after")
        service.set(final_ticks=len([f for f in files if f.startswith("tick")]))


class ExitAfterHandler(WatcherHandler):
    """Kills the whole core, with no log line, in after_watch_callback."""

    service = "exit_after"

    def after_watch_callback(self, service, files):
        _log(service, "after")
        os._exit(1)


class ExitChangeHandler(WatcherHandler):
    """Kills the whole core, with no log line, in file_change_callback."""

    service = "exit_change"

    def file_change_callback(self, service, files):
        _log(service, "change")
        os._exit(1)
