"""The note a journaled plugin call leaves on disk: the call under way inside the block,
none after it (also when it raises), and the same lines as the changes' JSON."""

from __future__ import annotations

import json

import pytest

from soaf.run.journal import JOURNALED_CALLS, RunJournal, load, needs_note


def test_noting_marks_the_call_under_way_and_its_return(tmp_path):
    journal = RunJournal(tmp_path, "n", "svc", 1, tmp_path)
    journal.step("running", save=True)
    journal.data.died_in = ["after_watch_callback"]
    with journal.noting("after_watch_callback"):
        found = load(journal.path)
        assert found is not None and found.in_call == "after_watch_callback"
    found = load(journal.path)
    assert found is not None and found.in_call is None and found.died_in == []
    with pytest.raises(RuntimeError), journal.noting("file_change_callback"):
        raise RuntimeError("a callback that raises")
    found = load(journal.path)
    assert found is not None and found.in_call is None
    journal.remove()


def test_the_lines_of_a_call_are_the_json_of_its_changes(tmp_path):
    journal = RunJournal(tmp_path, "n", "svc", 1, tmp_path)
    journal.step("running", save=True)
    size = journal.path.stat().st_size
    expected = []
    for name in (*JOURNALED_CALLS, "some_other_call"):
        journal.calling(name)
        journal.calling(name, returned=True)
        expected += [{"in_call": name}, {"in_call": None}]
    journal.data.died_in = ["file_change_callback"]
    journal.calling("file_change_callback", returned=True)
    expected.append({"in_call": None, "died_in": []})
    lines = journal.path.read_bytes()[size:].decode().splitlines()
    assert lines == [json.dumps(change) for change in expected]
    journal.remove()


def test_only_calls_into_plugin_code_are_noted():
    from soaf.plugin.handler import DefaultHandler, WatcherHandler

    class Mine(DefaultHandler):
        def file_change_callback(self, service, files):  # plugin code: may kill a core
            return super().file_change_callback(service, files)

    for handler in (WatcherHandler(), DefaultHandler()):  # soaf's own: cannot
        assert not any(needs_note(name, handler) for name in JOURNALED_CALLS)
    assert needs_note("file_change_callback", Mine())
    assert not needs_note("after_watch_callback", Mine())  # (kept from DefaultHandler)
    assert needs_note("file_change_callback", None)  # not known yet: noted
    assert not needs_note("build", Mine())  # not a journaled call
