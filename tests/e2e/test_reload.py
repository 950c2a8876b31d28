"""Hot reload with a real core process and real edits of the files in its plugin dir."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from soaf import ServiceParamTemplate
from tests.conftest import wait_until

NODE = "core-a"

#: A service that runs until a file named ``release`` appears in its work dir.
SERVICE = """\
from soaf import ServiceProgramTemplate


class Versioned(ServiceProgramTemplate):
    name = "versioned"

    def command(self):
        return ["sh", "-c", "while [ ! -f release ]; do sleep 0.05; done"]
"""

#: Its handler writes MARK (the version's mark) from every callback.
HANDLER = """\
from soaf import WatcherHandler

MARK = {mark!r}


class VersionedHandler(WatcherHandler):
    service = "versioned"

    def before_watch_callback(self, service):
        service.set(before=MARK, ticks=0)

    def file_change_callback(self, service, files):
        service.set(change=MARK, released="release" in files,
                    ticks=service.fields["ticks"] + 1)

    def after_watch_callback(self, service, files):
        service.set(after=MARK)
"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def info(client) -> dict[str, Any]:
    return client.plugins().get(NODE, {})


def new_version(client, old: str | None, timeout: float = 20) -> dict[str, Any]:
    """Wait until the node serves a version other than ``old``; its report."""
    return wait_until(lambda: (i := info(client)).get("version") not in (None, old) and i,
                      timeout, message=f"a version other than {old}")


def number(version: str) -> int:
    return int(version.split("-")[0])


def start_versioned(client, **args: Any) -> str:
    sid = client.submit(ServiceParamTemplate("versioned", args=args, watch_interval=0.05))
    wait_until(lambda: client.status(sid).fields.get("before"), 30,
               message="the service to be watched")
    return sid


def release(client, sid: str) -> Any:
    """Let a 'versioned' service end; its final record."""
    work_dir = Path(client.status(sid).get("work_dir"))
    (work_dir / "release").touch()
    return client.wait(sid, timeout=30)


@pytest.fixture
def versioned(plugin_dir: Path) -> Path:
    write(plugin_dir, "services/versioned.py", SERVICE)
    write(plugin_dir, "handlers/versioned.py", HANDLER.format(mark="v1"))
    return plugin_dir


def test_running_service_keeps_its_version_and_the_next_one_gets_the_new(
        start_core, client, versioned):
    start_core()
    v1 = new_version(client, None)["version"]
    first = start_versioned(client)
    write(versioned, "handlers/versioned.py", HANDLER.format(mark="v2"))
    v2 = new_version(client, v1)["version"]
    second = start_versioned(client)
    a, b = release(client, first), release(client, second)
    assert (a.state, b.state) == ("succeeded", "succeeded")
    # The first one saw the release file, after the reload, with its own (old) handler.
    assert a.fields["released"] is True
    assert (a.fields["before"], a.fields["change"], a.fields["after"]) == ("v1", "v1", "v1")
    assert (b.fields["before"], b.fields["change"], b.fields["after"]) == ("v2", "v2", "v2")
    assert (a.plugin_version, b.plugin_version) == (v1, v2)
    assert number(v2) > number(v1)


BROKEN = {
    # kind: (file, content, line of the error, words in the error)
    "syntax error": ("handlers/versioned.py", "MARK = 'v2'\n\nclass Broken(:\n    pass\n", 3,
                     "SyntaxError"),
    "import error": ("services/extra.py", "import os\nimport no_such_module_for_soaf\n", 2,
                     "ModuleNotFoundError"),
    "exception at import": ("services/extra.py", "x = 1\nraise ValueError('bad config')\n", 2,
                            "bad config"),
    "two plugins claim one name": (  # found after services/versioned.py, so named
        "services/zz_again.py",
        "from soaf import ServiceProgramTemplate\n\n\nclass Again(ServiceProgramTemplate):\n"
        "    name = 'versioned'\n", 4, "claimed twice"),
    "sys.exit at import": ("services/extra.py", "import sys\n\nsys.exit(2)\n", 3, "sys.exit(2)"),
    "hangs at import": ("services/extra.py", "import threading\n\nthreading.Event().wait()\n", 3,
                        "did not finish within 2 s"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_edit_keeps_the_last_good_version_until_fixed(start_core, client, versioned, kind):
    core = start_core(SOAF_RELOAD_TIMEOUT="2")
    v1 = new_version(client, None)["version"]
    rel, text, line, words = BROKEN[kind]
    bad = write(versioned, rel, text)
    report = wait_until(lambda: (i := info(client)).get("error") and i, 30,
                        message="the load error in Redis")
    assert core.alive()
    assert words in report["error"] and f"{bad}:{line}" in report["error"], report["error"]
    assert (report["error_file"], report["error_line"]) == (str(bad), line)
    assert report["version"] == v1 and isinstance(report["error_at"], float)
    # Still serving, with the last good version.
    old = release(client, start_versioned(client))
    assert (old.state, old.fields["after"], old.plugin_version) == ("succeeded", "v1", v1)
    # The next good save clears the error and makes a new version.
    if rel == "handlers/versioned.py":
        write(versioned, rel, HANDLER.format(mark="v2"))
    else:
        write(versioned, rel, "FIXED = True\n")
        write(versioned, "handlers/versioned.py", HANDLER.format(mark="v2"))
    fixed = wait_until(lambda: (i := info(client)).get("version") != v1 and not i["error"] and i,
                       30, message="the fixed version")
    assert fixed["error_file"] is None and fixed["error_at"] is None
    new = release(client, start_versioned(client))
    assert (new.fields["after"], new.plugin_version) == ("v2", fixed["version"])
    assert "plugin load failed" in core.log()


def test_hung_import_stalls_neither_running_services_nor_the_intake(
        start_core, client, versioned, tmp_path):
    start_core(SOAF_RELOAD_TIMEOUT="8")
    v1 = new_version(client, None)["version"]
    running = start_versioned(client)
    started = tmp_path / "import-started"
    write(versioned, "services/extra.py", f"""\
        import pathlib, threading
        pathlib.Path({str(started)!r}).touch()
        threading.Event().wait()
        """)
    wait_until(started.exists, 30, message="the hanging import to start")
    ticks = client.status(running).fields["ticks"]
    # While the import hangs: callbacks go on, and a new submission runs (old version).
    wait_until(lambda: client.status(running).fields["ticks"] >= ticks + 5, 30,
               message="callbacks during the hung import")
    quick = client.wait(client.submit(ServiceParamTemplate("true")), timeout=30)
    assert quick.state == "succeeded" and quick.plugin_version == v1
    assert info(client)["error"] is None, "the import was given up on too early to test"
    wait_until(lambda: info(client).get("error"), 30, message="the time limit")
    assert release(client, running).state == "succeeded"


def test_new_service_added_while_running(start_core, client, plugin_dir):
    start_core()
    v1 = new_version(client, None)["version"]
    write(plugin_dir, "services/fresh.py", """\
        from soaf import ServiceProgramTemplate

        class Fresh(ServiceProgramTemplate):
            name = "fresh"

            def command(self):
                return ["sh", "-c", "echo fresh > out.txt"]
        """)
    report = new_version(client, v1)
    assert "fresh" in report["services"]
    record = client.wait(client.submit(ServiceParamTemplate("fresh")), timeout=30)
    assert record.state == "succeeded" and record.plugin_version == report["version"]


def test_deleted_service_waits_queued_and_a_running_one_finishes(start_core, client, versioned):
    """What a core reads follows its plugins: the queue of a deleted service is no longer
    read (its work waits, never refused), and read again once the service is back."""
    start_core()
    v1 = new_version(client, None)["version"]
    running = start_versioned(client)
    (versioned / "services" / "versioned.py").unlink()
    (versioned / "handlers" / "versioned.py").unlink()
    report = new_version(client, v1)
    assert "versioned" not in report["services"] and "steps" in report["services"]
    waiting = client.submit(ServiceParamTemplate("versioned", args={"n": 1}, watch_interval=0.05))
    steps = client.submit(ServiceParamTemplate("steps", args={"n": 1}))
    assert client.wait(steps, timeout=30).state == "succeeded"
    assert client.status(waiting).state == "queued"  # not taken, not refused
    done = release(client, running)
    assert (done.state, done.fields["after"], done.plugin_version) == ("succeeded", "v1", v1)
    write(versioned, "services/versioned.py", SERVICE)
    write(versioned, "handlers/versioned.py", HANDLER.format(mark="v3"))
    v3 = new_version(client, report["version"])["version"]
    wait_until(lambda: client.status(waiting).fields.get("before"), 30,
               message="the service added back to take its queued work")
    back = release(client, waiting)
    assert (back.state, back.fields["after"], back.plugin_version) == ("succeeded", "v3", v3)


def test_changed_helper_module_is_seen_by_the_services_that_import_it(
        start_core, client, versioned):
    write(versioned, "services/helpers/__init__.py", "")
    write(versioned, "services/helpers/words.py", "WORD = 'hello'\n")
    write(versioned, "handlers/versioned.py", HANDLER.format(mark="v1") + textwrap.dedent("""
        from services.helpers.words import WORD


        def _after(self, service, files):
            from services.helpers import words  # imported lazily, when called
            service.set(after="v1", word=WORD, lazy_word=words.WORD)


        VersionedHandler.after_watch_callback = _after
        """))
    start_core()
    v1 = new_version(client, None)["version"]
    first = start_versioned(client)
    write(versioned, "services/helpers/words.py", "WORD = 'bonjour'\n")
    v2 = new_version(client, v1)["version"]
    second = start_versioned(client)
    a, b = release(client, first), release(client, second)
    assert b.fields["word"] == "bonjour" and b.plugin_version == v2
    # The running one keeps the helper it was built with; a lazy import inside a
    # callback after the reload finds the new generation's module.
    assert a.fields["word"] == "hello" and a.plugin_version == v1
    assert a.fields["lazy_word"] == "bonjour"


def test_burst_of_saves_is_one_version(start_core, client, versioned):
    core = start_core(SOAF_RELOAD_DEBOUNCE="1.0")
    v1 = new_version(client, None)["version"]
    pause = threading.Event()
    for i in range(10):
        write(versioned, "handlers/versioned.py", HANDLER.format(mark=f"burst{i}"))
        pause.wait(0.02)
    v2 = new_version(client, v1)["version"]
    with pytest.raises(AssertionError):
        wait_until(lambda: info(client)["version"] != v2, 3, message="a second version")
    assert number(v2) == number(v1) + 1
    assert core.log().count("plugins version") == 2
    assert release(client, start_versioned(client)).fields["after"] == "burst9"


def test_the_poll_catches_a_change_without_file_events(start_core, client, versioned):
    core = start_core(SOAF_RELOAD_WATCH="0", SOAF_RELOAD_POLL="0.3")
    assert "file events off" in core.log()
    v1 = new_version(client, None)["version"]
    write(versioned, "handlers/versioned.py", HANDLER.format(mark="polled"))
    v2 = new_version(client, v1)["version"]
    record = release(client, start_versioned(client))
    assert (record.fields["after"], record.plugin_version) == ("polled", v2)


def test_explicit_reload_through_the_client(start_core, client, versioned):
    # Neither file events nor the poll: only the explicit request can load the edit.
    core = start_core(SOAF_RELOAD_WATCH="0", SOAF_RELOAD_POLL="0")
    v1 = new_version(client, None)["version"]
    write(versioned, "handlers/versioned.py", HANDLER.format(mark="asked"))
    client.reload(node="some-other-node")
    client.reload()
    v2 = new_version(client, v1)["version"]
    assert number(v2) == number(v1) + 1 and "plugins version" in core.log()
    assert release(client, start_versioned(client)).fields["after"] == "asked"
    # A reload with nothing changed is a new version of the same content.
    client.reload(node=NODE)
    v3 = new_version(client, v2)["version"]
    assert number(v3) == number(v2) + 1 and v3.split("-")[1] == v2.split("-")[1]


def test_an_explicit_reload_reports_errors_the_same_way(start_core, client, versioned):
    start_core(SOAF_RELOAD_WATCH="0", SOAF_RELOAD_POLL="0")
    v1 = new_version(client, None)["version"]
    bad = write(versioned, "services/extra.py", "raise RuntimeError('asked and broken')\n")
    client.reload()
    report = wait_until(lambda: (i := info(client)).get("error") and i, 30,
                        message="the load error")
    assert "asked and broken" in report["error"] and report["error_file"] == str(bad)
    assert report["version"] == v1


def test_version_numbers_keep_rising_across_restarts(start_core, client):
    core = start_core()
    v1 = new_version(client, None)["version"]
    assert core.stop() == 0
    client.redis.hdel(client.keys.plugins, NODE)
    start_core()
    v2 = new_version(client, None)["version"]
    assert number(v2) == number(v1) + 1 and v2.split("-")[1] == v1.split("-")[1]

