"""A handler beside a progress probe: both have their say."""

from soaf import WatcherHandler


class ProbeLogHandler(WatcherHandler):
    service = "probe-log"

    def file_change_callback(self, service, files):
        service.set(chunks_seen=sum(1 for f in files if f.startswith("out/")))
