"""A finished service leaves nothing for the cyclic garbage collector: the core frees each
run by reference counting the moment it is over, so a busy core is not stalled by the
collector's full passes over thousands of dead runs."""

from __future__ import annotations

from soaf import ServiceParamTemplate
from soaf.core.heap import YOUNG_THRESHOLD


def test_finished_runs_are_freed_without_the_cycle_collector(start_core, client):
    start_core()

    def run(**args):
        record = client.wait(client.submit(ServiceParamTemplate("heap", args=args)), timeout=30)
        assert record.ok, record.error
        return record

    run()  # (the core's first write loads its script: a one-off, not the runs' business)
    run(do="arm")
    ids = [client.submit(ServiceParamTemplate("heap")) for _ in range(20)]
    assert all(r.ok for r in client.wait_all(ids, timeout=60))
    record = run(do="count")
    assert record.fields["garbage"] == 0, record.fields["kinds"]
    # What the start created is out of the collector's sight; young collections are rarer.
    assert record.fields["frozen"] > 10_000 and record.fields["threshold"][0] == YOUNG_THRESHOLD
