"""What a new user meets first, through the ``soaf`` command and the Client on a real core:
callback errors that show, progress that reaches 100%, messages that say what to do."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

from soaf import ServiceParamTemplate
from tests.conftest import ROOT, wait_until
from tests.e2e.test_cli import SOAF, gate, soaf, submit

#: A CSV chunker of a new user's own: the program writes chunk files and ends at once
#: (before any periodic check), the handler counts them and may break on purpose.
CHUNKER = '''
from soaf import ServiceProgramTemplate


class Chunker(ServiceProgramTemplate):
    name = "chunker"

    def build(self):
        pass

    def command(self):
        n = int(self.template.args.get("n", 4))
        return ["sh", "-c", f"for i in $(seq {n}); do echo row > chunk$i.csv; done; "
                            "echo 'chunker: bad row 7' >&2; exit ${CODE:-0}"]


class StrictChunker(Chunker):
    name = "strict-chunker"


class QuietChunker(Chunker):
    name = "quiet-chunker"
'''
CHUNK_HANDLER = '''
from soaf import WatcherHandler


class ChunkHandler(WatcherHandler):
    service = "chunker"

    def before_watch_callback(self, service):
        service.progress = 0.1

    def file_change_callback(self, service, files):
        chunks = [f for f in files if f.startswith("chunk")]
        service.set(seen=len(chunks))
        if service.template.args.get("break"):
            {}["column"]                              # a KeyError, as in a real slip
        service.progress = len(chunks) / int(service.template.args.get("n", 4)) * 0.8

    def after_watch_callback(self, service, files):
        if service.template.args.get("hang_after"):
            import time
            time.sleep(60)
        if "final" in service.template.args:
            service.progress = service.template.args["final"]


class StrictHandler(ChunkHandler):
    service = "strict-chunker"
    fail_on_callback_error = True


class QuietHandler(WatcherHandler):
    """Sets progress only before the program starts."""

    service = "quiet-chunker"

    def before_watch_callback(self, service):
        service.progress = 0.2
'''


@pytest.fixture
def chunker(plugin_dir: Path) -> Path:
    (plugin_dir / "services" / "chunker.py").write_text(CHUNKER)
    (plugin_dir / "handlers" / "chunker.py").write_text(CHUNK_HANDLER)
    return plugin_dir


def test_callback_errors_show_in_wait_status_ls_and_record(chunker, start_core, core_env, client):
    start_core()
    sid = submit(core_env, "-s", "chunker", "-a", "break=true", "--watch-interval", "0.05")
    out = soaf(core_env, "wait", sid)
    assert out.returncode == 0, out.stderr  # the program succeeded: so does the service
    assert re.search(rf"^{sid} chunker warning: \d+ callback errors?, the last: "
                     r"file_change_callback raised KeyError: 'column'$", out.stdout, re.M), out.stdout
    assert out.stderr.strip() == "1 succeeded (1 with callback errors: soaf status ID -v)"
    status = soaf(core_env, "status", sid).stdout
    assert re.search(r"^warnings +\d+ callback errors?, the last: file_change_callback raised "
                     r"KeyError: 'column'$", status, re.M), status
    assert "callback traceback" not in status
    verbose = soaf(core_env, "status", sid, "-v").stdout
    assert re.search(r"^callback traceback +Traceback", verbose, re.M), verbose
    assert '{}["column"]' in verbose
    row = next(line for line in soaf(core_env, "ls").stdout.splitlines() if line.startswith(sid))
    assert "succeeded" in row and "warning: " in row and "KeyError: 'column'" in row
    record = client.status(sid)
    assert record.ok and record.callback_errors >= 1
    assert record.warnings[0].endswith("the last: file_change_callback raised KeyError: 'column'")


def test_fail_on_callback_error_fails_the_service(chunker, start_core, client):
    start_core()
    record = client.wait(client.submit(ServiceParamTemplate(
        "strict-chunker", args={"break": True}, watch_interval=0.05)), timeout=60)
    assert record.state == "failed" and record.get("failure") == "callback", record.error
    assert record.exit_code == 0
    assert "(the handler sets fail_on_callback_error), the last: file_change_callback " \
           "raised KeyError: 'column'" in record.error
    clean = client.wait(client.submit(ServiceParamTemplate("strict-chunker")), timeout=60)
    assert clean.ok and clean.warnings == []


def test_last_file_check_and_full_progress(chunker, start_core, client):
    start_core()
    # A long interval: only the check after the program's end can see all the chunks.
    sid = client.submit(ServiceParamTemplate("chunker", args={"n": 6}, watch_interval=30))
    record = client.wait(sid, timeout=60)
    assert record.ok and record.fields["seen"] == 6
    assert record.progress == 1.0  # the handler's 80% became 100% on success
    assert client.wait(client.submit(ServiceParamTemplate("quiet-chunker")),
                       timeout=60).progress == 1.0
    # A handler that sets progress in after_watch_callback has the last word.
    kept = client.wait(client.submit(ServiceParamTemplate("chunker", args={"final": 0.5})),
                       timeout=60)
    assert kept.ok and kept.progress == 0.5
    # A failed service keeps the progress it had.
    failed = client.wait(client.submit(ServiceParamTemplate("chunker", args={"n": 5},
                                                            env={"CODE": "3"})), timeout=60)
    assert failed.state == "failed" and failed.progress == pytest.approx(0.8)
    assert json.loads(json.dumps(failed.to_dict()))["fields"]["seen"] == 5


def test_messages_say_what_to_do_next(chunker, start_core, core_env, client, prefix):
    start_core()
    # A program that fails: its error names the command that shows its whole stderr.
    sid = submit(core_env, "-s", "chunker", "-e", "CODE=3")
    out = soaf(core_env, "wait", sid)
    assert out.returncode == 1
    hint = f"see soaf logs {sid} --stderr"
    assert f"failed: exited with code 3 ({hint}); last lines of stderr:" in out.stdout
    logs = soaf(core_env, *hint.removeprefix("see soaf ").split())
    assert logs.returncode == 0 and logs.stdout == "chunker: bad row 7\n"
    # A client whose secret is not the core's: the rejection says which keys differ.
    from soaf import Client
    from soaf.protocol.codec import key_id
    from tests.conftest import SECRET

    with Client(client.url, secret="another-secret-of-32-characters!", prefix=prefix) as c:
        record = c.wait(c.submit(ServiceParamTemplate("chunker")), timeout=60)
    assert record.state == "rejected"
    assert record.error == (
        f"payload signed with key id {key_id('another-secret-of-32-characters!')}, which this "
        "core does not know: the client's SOAF_SECRET differs from the core's (the core "
        f"accepts key id {key_id(SECRET)})")


def test_submit_checks_local_inputs(chunker, start_core, core_env, tmp_path):
    start_core()
    missing = tmp_path / "typo.csv"
    out = soaf(core_env, "submit", "-s", "chunker", "-i", str(missing))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"Error: input typo.csv: {missing} does not exist here. Check the "
                          "path, or pass --no-check if it exists only where the core runs\n")
    assert soaf(core_env, "ls", "--json").stdout.strip() == "[]"  # nothing was submitted
    template = tmp_path / "job.json"
    template.write_text(json.dumps({"service": "chunker", "input_files": ["rows.csv"]}))
    out = soaf(core_env, "submit", str(template))
    assert out.returncode == 1 and f"{tmp_path / 'rows.csv'} does not exist here" in out.stderr
    (tmp_path / "rows.csv").write_text("a,b\n")
    sid = submit(core_env, str(template), "--wait")
    assert soaf(core_env, "status", sid, "--json").returncode == 0
    # --no-check submits anyway; the core then says what it misses.
    sid = submit(core_env, "-s", "chunker", "-i", str(missing), "--no-check")
    out = soaf(core_env, "wait", sid)
    assert out.returncode == 1 and str(missing) in out.stdout


#: Variables soaf sets for the programs it runs, not settings.
PROGRAM_VARIABLES = {"SOAF_RUN", "SOAF_SERVICE_ID", "SOAF_WORK_DIR", "SOAF_ATTEMPT", "SOAF_MODULES"}


def test_every_setting_has_a_flag_that_names_its_variable(chunker, start_core, client):
    sources = "\n".join(p.read_text() for p in (ROOT / "soaf").rglob("*.py"))
    variables = set(re.findall(r"SOAF_[A-Z_]*[A-Z]", sources)) - PROGRAM_VARIABLES
    dashboard = {v for v in variables if v.startswith("SOAF_DASHBOARD_")}  # its own command
    assert dashboard == {"SOAF_DASHBOARD_HOST", "SOAF_DASHBOARD_PORT", "SOAF_DASHBOARD_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "soaf.cli.main", "dashboard", "--help"],
                         capture_output=True, text=True, env={"COLUMNS": "200"}, cwd=ROOT,
                         check=True)
    assert dashboard - set(re.findall(r"SOAF_[A-Z_]*[A-Z]", out.stdout)) == set()
    variables -= dashboard
    assert {"SOAF_KILL_GRACE", "SOAF_CALLBACK_TIMEOUT", "SOAF_LOG_LINES"} <= variables
    out = subprocess.run([sys.executable, str(ROOT / "start_core.py"), "--help"],
                         capture_output=True, text=True, env={"COLUMNS": "200"}, check=True)
    named = set(re.findall(r"SOAF_[A-Z_]*[A-Z]", out.stdout))
    assert variables - named == set()
    # A flag does what its variable does (and wins over it).
    start_core(args=["--callback-timeout", "1"], SOAF_CALLBACK_TIMEOUT="300")
    record = client.wait(client.submit(ServiceParamTemplate("chunker", args={"hang_after": 1})),
                         timeout=60)
    assert record.state == "failed" and record.get("failure") == "callback"
    assert "after_watch_callback did not return within 1 s" in record.error


def test_nodes_shows_a_draining_core(start_core, core_env, client):
    core = start_core()
    sid, work_dir = gate(core_env, client, 1)
    row = next(line for line in soaf(core_env, "nodes").stdout.splitlines()
               if line.startswith("core-a"))
    assert row.split()[-1] == "accepting"
    core.signal(signal.SIGTERM)  # drains: it finishes the gate service first
    wait_until(lambda: client.nodes() and client.nodes()[0].get("draining"), 20,
               message="a draining heartbeat")
    table = soaf(core_env, "nodes").stdout.splitlines()
    assert table[0].split()[-1] == "STATE"
    assert next(line for line in table if line.startswith("core-a")).split()[-1] == "draining"
    (work_dir / "go1").touch()
    assert client.wait(sid, timeout=60).ok
    assert core.proc.wait(30) == 0


def _wait_in_terminal(env: dict[str, str], sid: str, rows: int, cols: int, work: Path) -> str:
    """``soaf wait ID`` on a pseudo-terminal of ``rows`` x ``cols`` (0 x 0: size unknown, as
    under ``script``); lets the gate service through and returns what the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in env.items() if k not in ("NO_COLOR", "COLUMNS", "LINES", "TERM")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([str(SOAF), "wait", sid], env=env, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""
    (work / "go1").touch()
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        assert ready, f"soaf wait is silent: {seen!r}"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other side closed: it ended
            break
        if not chunk:
            break
        seen += chunk
        if b"running" in seen and not (work / "go2").exists():
            (work / "go2").touch()
    assert proc.wait(30) == 0
    os.close(master)
    return seen.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.parametrize("rows, cols", [(0, 0), (24, 40)])
def test_wait_prints_lines_on_a_narrow_or_unknown_terminal(start_core, core_env, client, rows,
                                                           cols):
    start_core()
    sid, work = gate(core_env, client, 2)
    text = _wait_in_terminal(core_env, sid, rows, cols, work)
    assert "━" not in text and "\x1b[?25l" not in text  # no bar, no cursor games
    assert f"{sid} gate running" in text
    assert f"{sid} gate progress 100%" in text and f"{sid} gate succeeded" in text
    assert "1 succeeded" in text


def test_wait_bar_keeps_its_width_beside_a_long_message(start_core, core_env, client,
                                                        plugin_dir):
    handler = plugin_dir / "handlers" / "gate.py"
    handler.write_text(handler.read_text() + textwrap.dedent('''
        def _long_message(self, service):
            service.message = "merging " + "very-long-part-name " * 20
        GateHandler.before_watch_callback = _long_message
        '''))
    start_core()
    sid, work = gate(core_env, client, 2)
    text = _wait_in_terminal(core_env, sid, 30, 80, work)
    assert "━" * 20 in text  # the whole bar, on an 80-column terminal
    assert "merging ver…" in text and "very-long-part-name " * 2 not in text  # cut to fit


def test_wait_bar_shows_callback_errors(start_core, core_env, client, plugin_dir):
    handler = plugin_dir / "handlers" / "gate.py"
    handler.write_text(handler.read_text() + textwrap.dedent('''
        def _broken(self, service):
            raise KeyError("column")
        GateHandler.before_watch_callback = _broken
        '''))
    start_core()
    sid, work = gate(core_env, client, 2)
    text = _wait_in_terminal(core_env, sid, 30, 160, work)
    assert "━" * 20 in text  # a live bar, and beside it:
    assert "warning: 1 callback error, the last: before_watch_callback raised KeyError" in text
    assert "1 succeeded (1 with callback errors: soaf status ID -v)" in text
