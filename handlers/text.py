"""Follow the diamond example's services; put a summary of each result on its record."""

import json

from handlers.progress import ProgressFromOutput


class TokenizeHandler(ProgressFromOutput):
    service = "tokenize"

    def after_watch_callback(self, service, files):
        out = service.work_dir / "words.txt"
        if out.exists():
            service.set(words=sum(1 for _ in out.open()))
            service.progress = 1.0


class CountHandler(ProgressFromOutput):
    service = "count"

    def after_watch_callback(self, service, files):
        out = service.work_dir / "counts.json"
        if out.exists():
            service.set(distinct=len(json.loads(out.read_text())))
            service.progress = 1.0


class MergeHandler(ProgressFromOutput):
    service = "merge"

    def after_watch_callback(self, service, files):
        top = service.work_dir / "top.txt"
        if top.exists():
            pairs = (line.split() for line in top.read_text().splitlines())
            service.set(top=[[word, int(count)] for word, count in pairs])
            service.progress = 1.0
