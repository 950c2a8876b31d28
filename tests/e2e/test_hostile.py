"""Programs and templates that try to hang, burn or trap a core: odd files among the
outputs, links that multiply a glob, cancels in the middle of a transfer."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from soaf import ServiceParamTemplate
from tests.conftest import wait_until
from tests.dataservers import http_files, served  # noqa: F401  (fixtures)


def shell(script: str, **fields) -> ServiceParamTemplate:
    args = {"script": script, **fields.pop("args", {})}
    return ServiceParamTemplate("shell", args=args, **fields)


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.lstat().st_size for p in directory.rglob("*")}


def test_a_fifo_among_the_outputs_is_skipped_and_the_service_ends(start_core, client):
    start_core()
    sid = client.submit(shell("mkdir out && mkfifo out/pipe && echo a > out/a.txt",
                              output_files=["out"], optional_outputs=["*.fifo"]))
    record = client.wait(sid, timeout=30)
    assert record.state == "succeeded", record.error
    assert [o["name"] for o in record.outputs] == ["out/a.txt"]
    assert record.get("outputs_skipped") == ["'out/pipe' is a FIFO, not a regular file; skipped"]


def test_links_to_the_work_dir_do_not_multiply_an_output_glob(start_core, client):
    start_core()
    script = "for i in 0 1 2 3 4 5 6 7 8 9; do ln -s . l$i; done; echo x > out.txt"
    started = time.monotonic()
    sid = client.submit(shell(script, output_files=["out.txt"],
                              optional_outputs=["*/*/*/*/*/*/out.txt"]))
    record = client.wait(sid, timeout=30)
    assert record.state == "succeeded", record.error
    assert [o["name"] for o in record.outputs] == ["out.txt"]
    assert time.monotonic() - started < 15


def test_a_cancel_while_staging_stops_the_download(start_core, client, http_files, served):
    (served / "big.bin").write_bytes(b"z" * 200 * 1024)  # 10 s at the slow route's pace
    start_core()
    sid = client.submit(shell("true", input_files={"in.bin": http_files.url("slow/big.bin")}))
    wait_until(lambda: client.status(sid).state == "preparing", 20, message="preparing")
    time.sleep(0.3)  # some of it has arrived
    client.cancel(sid)
    record = client.wait(sid, timeout=20)
    assert record.state == "cancelled", record.error
    work_dir = Path(record.get("work_dir"))
    at_the_end = snapshot(work_dir)
    assert "in.bin" not in at_the_end
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # nothing is written after the final state
        assert snapshot(work_dir) == at_the_end
        time.sleep(0.2)


# -- what a program leaves running ----------------------------------------------------------


def gone(pid: int) -> bool:
    """No such process, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


def test_a_daemon_is_killed_and_reaped_with_its_service(start_core, client):
    core = start_core()
    sid = client.submit(ServiceParamTemplate("daemon"))
    record = client.wait(sid, timeout=30)
    assert record.state == "succeeded", record.error
    daemon, child = map(int, (Path(record.get("work_dir")) / "daemon.txt").read_text().split())
    try:
        wait_until(lambda: gone(daemon) and gone(child), 10,
                   message="the daemon and its zombie child to be gone")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)  # never leave it behind, even when this fails
    zombies = [p for p in Path("/proc").glob("[0-9]*")
               if (p / "stat").exists() and f" {core.proc.pid} " in (p / "stat").read_text()
               and ") Z " in (p / "stat").read_text()]
    assert zombies == []


def test_a_daemon_of_a_program_adopted_after_a_crash_is_killed_at_its_end(start_core, client):
    """The core that started the program dies (kill -9); its daemon is handed to another
    reaper, not to the restarted core. The restarted core adopts the program, finds the
    run's token in its journal on disk, and ends the daemon with the service."""
    core = start_core()
    sid = client.submit(ServiceParamTemplate("daemon-hold"))
    wait_until(lambda: client.status(sid).get("work_dir") and
               (Path(client.status(sid).get("work_dir")) / "daemon.txt").exists(), 30,
               message="the daemon to start")
    work_dir = Path(client.status(sid).get("work_dir"))
    daemon = int((work_dir / "daemon.txt").read_text())
    try:
        core.kill()
        start_core()
        wait_until(lambda: client.status(sid).get("recovered_as") == "adopt", 30,
                   message="the program re-adopted")
        assert not gone(daemon)
        (work_dir / "release").touch()
        assert client.wait(sid, timeout=30).state == "succeeded"
        wait_until(lambda: gone(daemon), 10, message="the daemon to be gone")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)


# -- plugins that would trap the core ---------------------------------------------------------


LINGERING = '''"""Starts a thread that never ends and is not a daemon."""
import threading
import time

threading.Thread(target=lambda: time.sleep(3600), name="plugin-lingerer", daemon=False).start()
'''


def test_the_core_exits_past_a_plugins_non_daemon_thread(start_core, plugin_dir):
    (plugin_dir / "services" / "lingering.py").write_text(LINGERING)
    core = start_core()
    core.signal(signal.SIGTERM)
    assert core.proc.wait(20) == 0
    assert "plugin-lingerer" in core.log()


NEEDS_FILE = '''"""A service that can only load once a file outside the plugins exists."""
import os

from soaf import ServiceProgramTemplate

with open(os.environ["NEEDS_FILE"]) as f:
    NAME = f.read().strip()


class Needy(ServiceProgramTemplate):
    name = NAME

    def command(self):
        return ["true"]
'''


def test_a_core_without_plugins_takes_no_work_and_retries_the_load(start_core, client,
                                                                    plugin_dir, tmp_path):
    needed = tmp_path / "needed.txt"
    (plugin_dir / "services" / "needy.py").write_text(NEEDS_FILE)
    core = start_core(NEEDS_FILE=str(needed))
    assert "no plugin version loaded" in core.log()
    sid = client.submit(ServiceParamTemplate("true"))
    time.sleep(2)  # a core that took it would have rejected or run it by now
    assert client.status(sid).state == "queued"
    needed.write_text("needy\n")  # not a plugin file: only a retry of the load sees it
    record = client.wait(sid, timeout=30)
    assert record.state == "succeeded", record.error
    assert "no plugins loaded yet; trying again" in core.log()
