"""The spawner with real processes: programs started through it, their exits and exit
files, orphans it reaps, a core or a spawner killed -9, and the shim when it cannot start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from soaf.errors import ProgramError
from soaf.process import shim
from soaf.process.identity import read_stat
from soaf.process.reaper import Reaper
from soaf.process.spawn import Process
from soaf.process.spawner import Spawner
from tests import test_process
from tests.conftest import ROOT, wait_until


@pytest.fixture
def spawning():
    r = Reaper(spawners=Spawner.start)
    assert r.spawner is not None
    yield r
    r.close()


def program(tmp_path: Path, argv: list[str], **kw) -> Process:
    return Process(argv, cwd=tmp_path, env=dict(os.environ), stdout=tmp_path / "out.log",
                   stderr=tmp_path / "err.log", exit_file=tmp_path / "exit", **kw)


@pytest.mark.parametrize("setup, argv, cwd, expected", test_process.START_FAILURES)
def test_start_failures_through_the_spawner_in_plain_words(tmp_path, spawning, setup, argv,
                                                           cwd, expected):
    test_process.test_start_failures_in_plain_words(tmp_path, spawning, setup, argv, cwd, expected)
    assert spawning.spawner is not None and not spawning.spawner.gone  # it serves on


def test_a_spawned_program_leads_its_group_and_its_exit_is_kept(tmp_path, spawning):
    burner = str(ROOT / "tests" / "programs" / "burner.py")
    p = program(tmp_path, ["sh", "-c", 'echo $$ $(ps -o pgid= -o sid= -o ppid= -p $$); '
                           f'cat; exec {sys.executable} {burner} 0.3 30; exit 7'])
    p.start(spawning)
    assert p.spawned and not p.shimmed and p.program_pid == p.pid  # no shim in between
    # the spawner may run above its programs' priority, never they: theirs is the core's
    assert os.getpriority(os.PRIO_PROCESS, p.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    assert p.exited.wait(30) and p.exit is not None
    assert p.exit.exit_code == 0 and p.exit.cpu_time >= 0.25
    assert p.exit.max_rss_kb is not None and p.exit.max_rss_kb >= 30 * 1024  # from rusage
    pid, pgid, sid, ppid = (int(w) for w in (tmp_path / "out.log").read_text().split())
    assert pid == pgid == sid == p.pid  # it leads its own session and group; stdin was empty
    assert spawning.spawner is not None and ppid == spawning.spawner.pid
    code, cpu, rss = shim.read_exit_usage(tmp_path / "exit")  # type: ignore[misc]
    assert code == 0 and cpu == pytest.approx(p.exit.cpu_time, abs=0.02)
    assert rss >= 30 * 1024 and shim.read_exit(tmp_path / "exit") == 0
    failed = program(tmp_path, ["sh", "-c", "exit 7"])
    failed.start(spawning)
    assert failed.exited.wait(30) and failed.exit is not None and failed.exit.exit_code == 7
    killed = program(tmp_path, ["sh", "-c", "kill -TERM $$"])
    killed.start(spawning)
    assert killed.exited.wait(30) and killed.exit is not None
    assert killed.exit.signal == "SIGTERM" and shim.read_exit(tmp_path / "exit") == -15


def test_a_double_forked_orphan_is_the_spawners_to_reap(tmp_path, spawning):
    """A program whose child leaves its session and outlives it: the orphan is handed to
    the spawner (a subreaper), which reaps it when it ends: no zombie is left."""
    p = program(tmp_path, ["sh", "-c", "setsid sh -c 'sleep 1' & echo $! > orphan.pid; sleep 0.3"])
    p.start(spawning)
    assert p.exited.wait(30)
    orphan = int((tmp_path / "orphan.pid").read_text())
    stat = read_stat(orphan)
    assert stat is not None and not stat.exited
    assert spawning.spawner is not None and stat.ppid == spawning.spawner.pid
    wait_until(lambda: read_stat(orphan) is None, 10, message="the orphan reaped")


def test_the_shim_when_the_spawner_cannot_start(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # it exits before it is ready
    reaper = Reaper(spawners=Spawner.start)
    try:
        assert reaper.spawner is None
        p = program(tmp_path, ["sh", "-c", "exit 4"])
        p.start(reaper)
        assert p.shimmed and not p.spawned
        assert p.exited.wait(30) and p.exit is not None and p.exit.exit_code == 4
        assert shim.read_exit(tmp_path / "exit") == 4
    finally:
        reaper.close()


def _as_a_core(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    """A process that plays the core (a subreaper with a reaper and a spawner)."""
    script = textwrap.dedent(f"""
        import json, os, signal, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from soaf.process.reaper import Reaper, become_subreaper
        from soaf.process.spawn import Process
        from soaf.process.spawner import Spawner
        assert become_subreaper()
        reaper = Reaper(spawners=Spawner.start)
        tmp = Path({str(tmp_path)!r})
        def program(argv, name):
            p = Process(argv, cwd=tmp, env=dict(os.environ), stdout=tmp / "o", stderr=tmp / "e",
                        exit_file=tmp / name)
            p.start(reaper)
            return p
    """) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_a_killed_core_leaves_the_exit_and_its_cost_in_the_exit_file(tmp_path):
    core = _as_a_core(tmp_path, """
        p = program([sys.executable, "-c", "b = bytearray(20 << 20)\\n"
                     "for i in range(0, len(b), 4096): b[i] = 1\\n"
                     "import time; time.sleep(1); raise SystemExit(5)"], "exit")
        print(json.dumps([p.pid, reaper.spawner.pid]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert core.stdout is not None
    pid, spawner = json.loads(core.stdout.readline())
    assert core.wait(30) == -signal.SIGKILL
    assert read_stat(pid) is not None  # the program runs on, without its core
    wait_until(lambda: shim.read_exit(tmp_path / "exit") is not None, 30,
               message="the exit file written")
    code, cpu, rss = shim.read_exit_usage(tmp_path / "exit")  # type: ignore[misc]
    assert code == 5 and cpu is not None and cpu > 0 and rss is not None and rss >= 20 * 1024
    # its last child gone, the spawner ends too (reaped by whoever inherited it)
    wait_until(lambda: (s := read_stat(spawner)) is None or s.exited, 30,
               message="the spawner ended")


def test_a_killed_spawner_loses_no_exit(tmp_path):
    """kill -9 of the spawner while programs run: the core reaps them itself (they are
    its children now), records their exits, and a new spawner takes the next ones."""
    core = _as_a_core(tmp_path, """
        slow = [program(["sh", "-c", f"sleep 1; exit {i}"], f"exit{i}") for i in (3, 4)]
        old = reaper.spawner
        os.kill(old.pid, signal.SIGKILL)
        for p in slow:
            assert p.exited.wait(30)
        deadline = time.monotonic() + 30
        while (reaper.spawner is None or reaper.spawner is old) and time.monotonic() < deadline:
            time.sleep(0.05)
        after = program(["sh", "-c", "exit 6"], "exit6")
        assert after.exited.wait(30)
        print(json.dumps([[p.exit.exit_code for p in slow], after.exit.exit_code, after.spawned,
                          reaper.spawner.pid != old.pid]), flush=True)
        reaper.close()
    """)
    out, _ = core.communicate(timeout=120)
    assert core.returncode == 0
    assert json.loads(out) == [[3, 4], 6, True, True]
    assert shim.read_exit(tmp_path / "exit6") == 6


def test_exits_a_killed_spawner_had_not_reaped_are_the_cores(tmp_path):
    """Programs that ended while their spawner was frozen, then killed: their zombies are
    handed to the core (a subreaper), which reaps them and records how they ended."""
    core = _as_a_core(tmp_path, """
        old = reaper.spawner
        quick = [program(["sh", "-c", f"sleep 0.3; exit {i}"], f"exit{i}") for i in (8, 9)]
        os.kill(old.pid, signal.SIGSTOP)  # frozen: it can neither reap nor report
        time.sleep(1)  # they have ended: zombies of the frozen spawner
        assert not any(p.exited.is_set() for p in quick)
        os.kill(old.pid, signal.SIGKILL)
        for p in quick:
            assert p.exited.wait(30)
        print(json.dumps([p.exit.exit_code for p in quick]), flush=True)
        reaper.close()
    """)
    out, _ = core.communicate(timeout=120)
    assert core.returncode == 0
    assert json.loads(out) == [8, 9]


def test_an_exit_the_dead_spawner_reaped_is_read_from_its_file(tmp_path):
    """The spawner reaped a program and wrote its exit file, but died before it sent the
    exit: the core, which can no longer reap it, reads the file."""
    done = subprocess.Popen(["true"])
    done.wait()  # (the Popen kept: dropped, its __del__ may reap it first)
    pid = done.pid  # a pid that is nobody's child any more
    (tmp_path / "exit").write_text("3\n3 0.25 4096\n")
    reaper = Reaper()
    got: list[tuple[int, int, object]] = []
    try:
        reaper.watch_spawned(pid, lambda *a: got.append(a), tmp_path / "exit",
                             spawner=object())  # type: ignore[arg-type]  # a dead one
        wait_until(lambda: got, 10, message="the exit reported")
    finally:
        reaper.close()
    (_pid, status, usage), = got
    assert os.waitstatus_to_exitcode(status) == 3
    assert usage.ru_utime == 0.25 and usage.ru_maxrss == 4096  # type: ignore[attr-defined]


def test_an_exit_written_by_the_spawner_reads_as_the_shims_did(tmp_path):
    (tmp_path / "e").write_text("pid 123\n")
    assert shim.read_exit(tmp_path / "e") is None and shim.running_pid(tmp_path / "e") == 123
    (tmp_path / "e").write_text("143\n-15 0.5 2048\n")
    assert shim.read_exit(tmp_path / "e") == -15
    assert shim.read_exit_usage(tmp_path / "e") == (-15, 0.5, 2048)
    (tmp_path / "e").write_text("143\n")  # the shim's: a signal, no usage
    assert shim.read_exit_usage(tmp_path / "e") == (-15, None, None)
    (tmp_path / "e").write_text(f"pid 123 spawner {os.getpid()}\n")
    assert shim.read_exit(tmp_path / "e") is None and shim.running_pid(tmp_path / "e") == 123


def test_no_wait_for_an_exit_file_whose_spawner_is_dead(tmp_path):
    """After a crash took the spawner too, a restarted core does not wait for each of its
    programs' exit files; while the spawner lives, it does (it writes them a moment late)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "e").write_text(f"pid 123 spawner {gone.pid}\n")
    started = time.monotonic()
    assert shim.wait_exit(tmp_path / "e", 60) is None
    assert time.monotonic() - started < 30  # not the whole minute
    (tmp_path / "e").write_text(f"pid 123 spawner {os.getpid()}\n")
    (tmp_path / "e.new").write_text("3\n3 0.1 100\n")
    # (renamed in whole, as the spawner does: a truncated file would read as no status)
    writer = threading.Timer(0.3, os.rename, [tmp_path / "e.new", tmp_path / "e"])
    writer.start()
    assert shim.wait_exit(tmp_path / "e", 60) == (3, 0.1, 100)  # waited for it


def test_a_program_with_a_cgroup_enters_it_before_it_is_executed(tmp_path, spawning):
    """(A plain directory stands for the cgroup: the child writes 0 to its cgroup.procs.)"""
    group = tmp_path / "group"
    group.mkdir()
    p = program(tmp_path, ["sh", "-c", "echo $$; exit 6"], cgroup=group)
    p.start(spawning)
    assert p.spawned and p.exited.wait(30) and p.exit is not None and p.exit.exit_code == 6
    assert (group / "cgroup.procs").read_text() == "0"
    assert int((tmp_path / "out.log").read_text()) == p.pid
    assert shim.read_exit(tmp_path / "exit") == 6
    missing = program(tmp_path, ["no-such-program-xyz"], cgroup=group)
    with pytest.raises(ProgramError, match="executable not found: no-such-program-xyz"):
        missing.start(spawning)
    nowhere = Process(["true"], cwd=tmp_path / "gone", env=dict(os.environ),
                      stdout=tmp_path / "o", stderr=tmp_path / "e", cgroup=group)
    with pytest.raises(ProgramError, match=r"working directory .* does not exist"):
        nowhere.start(spawning)


def test_environments_go_whole_then_as_what_differs():
    from soaf.process.spawner import put_environment
    from soaf.process.spawnserver import environment

    base = {f"V{i}": str(i) for i in range(20)}
    first: dict = {}
    sent = put_environment(first, base, None)
    assert first["env"] == base and "env_set" not in first and sent == base
    second: dict = {}
    env = {**base, "RUN": "token", "V3": "changed"}
    del env["V4"]
    assert put_environment(second, env, sent) is sent  # the base stays the whole one
    assert second == {"env_set": {"RUN": "token", "V3": "changed"}, "env_unset": ["V4"]}
    assert environment(json.loads(json.dumps(second)), base) == env
    other = {"ONLY": "this"}  # little in common: whole again, and the new base
    third: dict = {}
    assert put_environment(third, other, sent) == other and third["env"] == other
    with pytest.raises(ValueError):
        environment({"env_set": {}, "env_unset": []}, None)


def test_each_program_gets_its_own_environment_through_the_spawner(tmp_path, spawning):
    """Requests after the first carry only what differs from the last whole environment:
    each program still starts with exactly its own (set, changed and removed names)."""
    base = {k: v for k, v in os.environ.items() if k not in ("A", "B")}
    envs = [{**base, "A": "1"}, {**base, "A": "2", "B": "x"}, dict(base),
            {k: v for k, v in base.items() if k != "HOME"}, {"PATH": base.get("PATH", "")}]
    for i, env in enumerate(envs):
        out = tmp_path / f"env{i}"
        p = Process([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                    cwd=tmp_path, env=env, stdout=out, stderr=tmp_path / "err.log",
                    exit_file=tmp_path / f"exit{i}")
        p.start(spawning)
        assert p.exited.wait(30) and p.exit is not None and p.exit.exit_code == 0
        got = json.loads(out.read_text())
        got.pop("LC_CTYPE", None)  # Python may set it for itself (PEP 538)
        assert got == {k: v for k, v in env.items() if k != "LC_CTYPE"}, i


def test_a_reader_takes_messages_however_they_arrive():
    """Several messages in one recv, one split across many, and the end of the stream."""
    import socket as socket_

    from soaf.process.spawner import Reader
    from soaf.process.spawnserver import send

    mine, theirs = socket_.socketpair()
    reader = Reader(mine)
    for i in range(3):
        send(theirs, {"n": i})
    assert [reader.receive() for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert not reader.ready()
    data = json.dumps({"big": "x" * 100_000}).encode()
    whole = len(data).to_bytes(4, "big") + data

    def dribble():
        for start in range(0, len(whole), 7000):
            theirs.sendall(whole[start:start + 7000])
            time.sleep(0.001)

    sender = threading.Thread(target=dribble)
    sender.start()
    assert reader.receive() == {"big": "x" * 100_000}
    sender.join()
    send(theirs, {"last": True})
    theirs.close()
    assert reader.receive() == {"last": True} and reader.receive() is None
    mine.close()


def test_the_exits_of_one_look_go_to_the_core_in_one_send(tmp_path):
    """Programs that ended by the time the spawner looks are reported together: one send
    (one wake-up of the core's reaper), each exit a message of its own. (In a child
    process: the spawner's reaping takes any child of the process it runs in.)"""
    from soaf.process.spawnserver import Server

    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            class Sends:
                def __init__(self):
                    self.calls = []

                def sendall(self, data):
                    self.calls.append(data)

            import socket as socket_
            requests, _peer = socket_.socketpair()
            server = Server(requests, Sends())  # type: ignore[arg-type]
            pids = []
            for i in range(4):
                reply = server.spawn({"argv": ["true"], "cwd": str(tmp_path), "env": dict(os.environ),
                                      "stdout": str(tmp_path / "out"), "stderr": str(tmp_path / "err"),
                                      "exit_file": str(tmp_path / f"exit{i}")})
                pids.append(reply["pid"])
            for pid in pids:  # all ended (not reaped yet)
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            server.reap()
            calls = server.events.calls
            data = calls[0] if calls else b""
            got = []
            while data:
                n = int.from_bytes(data[:4], "big")
                got.append(json.loads(data[4:4 + n])["pid"])
                data = data[4 + n:]
            os.write(w, json.dumps({"calls": len(calls), "pids": pids, "got": got}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = json.loads(f.read())
    os.waitpid(child, 0)
    assert result["calls"] == 1 and sorted(result["got"]) == sorted(result["pids"])
    assert all((tmp_path / f"exit{i}").read_text().startswith("0\n") for i in range(4))


def test_requests_that_arrive_together_are_read_at_once_and_each_answered(tmp_path):
    """Requests the core's threads sent while the spawner was busy come in with one read;
    each is answered in its order, and a request split across reads waits for its rest."""
    from soaf.process.spawnserver import Server, frame

    class Peer:
        def __init__(self, chunks):
            self.chunks, self.sent = list(chunks), []

        def recv(self, size):
            return self.chunks.pop(0) if self.chunks else b""

        def sendall(self, data):
            self.sent.append(data)

    def request(i):
        return frame({"argv": ["sleep", "5"], "cwd": str(tmp_path), "env": dict(os.environ),
                      "stdout": str(tmp_path / "out"), "stderr": str(tmp_path / "err"),
                      "exit_file": str(tmp_path / f"exit{i}")})

    third = request(2)
    peer = Peer([request(0) + request(1) + third[:10], third[10:], b"{not json"])
    server = Server(peer, None)  # type: ignore[arg-type]
    pending = bytearray()
    pids = []
    try:
        assert server._answer(pending) and len(peer.sent) == 2 and pending
        assert server._answer(pending) and len(peer.sent) == 3 and not pending
        pids = [json.loads(data[4:])["pid"] for data in peer.sent]
        assert [int((tmp_path / f"exit{i}").read_text().split()[1]) for i in range(3)] == pids
        assert server._answer(pending)  # not whole yet (its length is garbage: it waits)
        assert not server._answer(pending)  # the core closed its end
        garbage = Server(Peer([b"\0\0\0\x05{not}"]), None)  # type: ignore[arg-type]
        garbage.requests.close = lambda: garbage.requests.chunks.append("closed")
        assert not garbage._answer(bytearray()) and garbage.requests.chunks == ["closed"]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_program_not_yet_journaled_is_found_by_the_token_its_spawner_noted(tmp_path,
                                                                             spawning):
    """A core that dies between the spawn and the journal leaves no token on disk: the
    spawner notes the run's token beside the pid, so a restarted core still finds the
    program (and only if that pid's environment holds the token: never a recycled pid)."""
    from soaf.process.census import RUN_VAR
    from soaf.process.lineage import new_token

    token = new_token("svc", 1)
    p = Process(["sleep", "30"], cwd=tmp_path, env={**os.environ, RUN_VAR: token},
                stdout=tmp_path / "out.log", stderr=tmp_path / "err.log",
                exit_file=tmp_path / "exit")
    p.start(spawning)
    try:
        assert shim.running_token(tmp_path / "exit") == token
        assert [i.pid for i in shim.find_program(str(tmp_path / "exit"), None)] == [p.pid]
        other = tmp_path / "other.exit"  # the same pid noted with another run's token
        other.write_text(f"pid {p.pid} spawner {os.getpid()} token {new_token('svc', 2)}\n")
        assert shim.find_program(str(other), None) == []
        assert shim.running_pid(other) == p.pid  # (the line still reads as running)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        assert p.exited.wait(30)
