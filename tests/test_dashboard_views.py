"""How the dashboard shows values: durations, progress, time left, events; escaping on."""

from __future__ import annotations

from soaf.dashboard import views


def test_durations_progress_and_time_left():
    assert views.duration(4.25) == "4.2 s" and views.duration(75) == "1 min 15 s"
    assert views.duration(7300) == "2 h 1 min" and views.duration("x") == ""
    assert [views.percent(p) for p in (0.5, 1.7, -1, None, "a", float("nan"))] == [50, 100, 0, 0, 0, 0]
    row = {"state": "running", "progress": 0.25, "running_at": 100.0}
    assert views.eta(row, now=130.0) == "~1 min 30 s left"
    assert views.eta({**row, "state": "succeeded"}, now=130.0) == ""
    assert views.eta({**row, "progress": 0}, now=130.0) == ""
    assert views.ago(100.0, now=112.0) == "12 s ago" and views.since(None) == ""
    assert views.size(1536) == "1.5 KiB" and views.size(12) == "12 B" and views.size(None) == ""


def test_an_event_in_one_line_without_what_the_timeline_shows_otherwise():
    event = {"seq": 4, "ts": 1.0, "attempt": 1, "state": "running", "running_at": 1.0,
             "journal": {"steps": []}, "progress": 0.426, "f:label": "x", "pid": 7,
             "event_id": "1-0"}
    assert views.event_text(event) == "label=x pid=7 progress=42%"


def test_every_template_escapes_and_odd_list_fields_are_dropped():
    env = views.environment()
    assert env.from_string("{{ v }}").render(v="<img src=x>") == "&lt;img src=x&gt;"
    assert views.records("x") == [] and views.records([1, {"a": 2}])[0]["missing"] is None
    assert views.load({"running": 3, "max_services": 4}) == 75
    assert views.load({"running": "many", "max_services": 0}) == 0
