"""The history of an embedded core after it stopped: the read commands open its data
themselves (and stop what they started), a core that starts meanwhile waits, and a
plain Client is told what to do."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from soaf import Client
from soaf.errors import ConfigError
from tests.conftest import wait_until
from tests.e2e.test_cli import SOAF, soaf, submit


@pytest.fixture
def embedded_env(core_env, short_tmp, prefix):
    """A core's environment without SOAF_REDIS_URL: it runs its own Redis in a short state dir."""
    state = short_tmp / f"st-{prefix}"
    return {**core_env, "SOAF_REDIS_URL": "", "SOAF_STATE_DIR": str(state)}


def redis_servers_on(state: Path) -> list[int]:
    """Pids of redis-server processes whose data dir is ``state``/redis."""
    out = subprocess.run(["pgrep", "-f", "redis-server"], capture_output=True, text=True)
    pids = []
    for pid in map(int, out.stdout.split()):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(state / "redis"):
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_read_commands_open_the_history_of_a_stopped_core(start_core, embedded_env):
    state = Path(embedded_env["SOAF_STATE_DIR"])
    core = start_core(**embedded_env)
    done = submit(embedded_env, "-s", "steps", "-a", "n=2", "-a", "delay=0.01")
    assert soaf(embedded_env, "wait", done).returncode == 0
    failed = submit(embedded_env, "-s", "shell", "-a", "script=echo broken >&2; exit 3")
    assert soaf(embedded_env, "wait", failed).returncode == 1
    assert core.stop() == 0
    assert redis_servers_on(state) == [] and not (state / "redis.url").exists()

    listed = soaf(embedded_env, "ls")
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^{done} +steps +succeeded", listed.stdout, re.M), listed.stdout
    assert re.search(rf"^{failed} +shell +failed", listed.stdout, re.M)
    status = json.loads(soaf(embedded_env, "status", done, "--json").stdout)
    assert status["state"] == "succeeded" and status["node"] == "core-a"
    logs = soaf(embedded_env, "logs", failed, "--stderr")
    assert logs.returncode == 0 and logs.stdout == "broken\n"
    waited = soaf(embedded_env, "wait", done, failed)
    assert waited.returncode == 1 and waited.stderr.strip() == "1 failed, 1 succeeded"
    # each command stopped the redis-server it started, and left no address behind
    assert redis_servers_on(state) == [] and not (state / "redis.url").exists()

    # A plain Client says what to do instead.
    env = {k: v for k, v in embedded_env.items() if k.startswith("SOAF_")}
    with pytest.raises(ConfigError) as info:
        Client(state_dir=state, prefix=env["SOAF_PREFIX"])
    assert str(info.value) == (
        f"no core is running on the embedded Redis in {state} (its data is in {state}/redis): "
        "start one (python start_core.py); the soaf read commands (soaf ls, soaf status ID, "
        "soaf logs ID) open its history without a core")


def test_waiting_for_a_service_that_is_not_final_needs_a_core(start_core, embedded_env):
    core = start_core(**embedded_env)
    sid = submit(embedded_env, "-s", "gate", "-a", "n=1")
    wait_until(lambda: "running" in soaf(embedded_env, "status", sid).stdout, 60,
               message="gate running")
    core.signal(9)  # killed: the service stays `running`; its redis-server outlives it
    core.proc.wait(10)
    out = soaf(embedded_env, "wait", sid, timeout=30)
    assert out.returncode == 1
    assert out.stderr == (f"Error: {sid} waits for services that are not final, but no core is "
                          "running (this command opened the embedded Redis's data itself): "
                          "start a core (python start_core.py) to finish it\n")
    assert soaf(embedded_env, "ls").returncode == 0
    # the server the killed core left running is re-used, never stopped by a reader
    servers = redis_servers_on(Path(embedded_env["SOAF_STATE_DIR"]))
    assert len(servers) == 1
    status = json.loads(soaf(embedded_env, "status", sid, "--json").stdout)
    leader = status.get("shim_pid") or status["pid"]  # its group's leader
    os.killpg(os.getpgid(leader), 9)  # what a machine crash would have done to them all
    os.kill(servers[0], 9)


def test_a_core_that_starts_while_a_reader_has_the_data_waits(start_core, embedded_env):
    state = Path(embedded_env["SOAF_STATE_DIR"])
    core = start_core(**embedded_env)
    sid = submit(embedded_env, "-s", "steps", "-a", "n=1", "-a", "delay=0.01")
    assert soaf(embedded_env, "wait", sid).returncode == 0
    assert core.stop() == 0
    # A read command that is slow to finish: `soaf logs -f` of a final service holds
    # nothing for long, so hold the lock the way a reader does, from a child process.
    holder = subprocess.Popen(
        [str(SOAF.parent / "python"), "-c",
         "import sys, time; from pathlib import Path; from soaf.core.embedded import EmbeddedRedis;"
         f"e = EmbeddedRedis(Path({str(state)!r})); assert e.hold(alone=True); e.start();"
         "print('open', flush=True); sys.stdin.readline(); e.stop()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=embedded_env)
    assert holder.stdout.readline() == "open\n"
    late = start_core(wait_ready=False, **embedded_env)
    wait_until(lambda: "waiting for a read command that has the embedded Redis" in late.log(),
               30, message="the core to say why it waits")
    assert f"pid {holder.pid}" in late.log() and "ready" not in late.log()
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(30) == 0
    wait_until(lambda: "ready" in late.log(), 30, message="the core to start once the reader is done")
    assert soaf(embedded_env, "status", sid).returncode == 0
    # the core holds the lock: a reader cannot have it
    with open(state / "core.lock") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_info_says_where_redis_and_the_key_are(start_core, embedded_env):
    state = Path(embedded_env["SOAF_STATE_DIR"])
    env = {**embedded_env, "SOAF_SECRET": ""}  # the embedded core makes its own key
    core = start_core(**env)
    out = soaf(env, "info")
    assert out.returncode == 0, out.stderr
    from soaf.protocol.codec import key_id

    key = (state / "secret").read_text().strip()
    assert re.search(rf"^redis +unix://:\*\*\*@{state}/redis.sock  \(full URL: {state}/redis.url\)$",
                     out.stdout, re.M), out.stdout
    assert re.search(rf"^key id +{key_id(key)}  \(key: {state}/secret\)$", out.stdout, re.M)
    assert re.search(r"^cores +core-a$", out.stdout, re.M)
    assert key not in out.stdout and (state / "redis.password").read_text().strip() not in out.stdout
    # The lines it gives a plain redis-py script work as they are.
    lines = json.loads(soaf(env, "info", "--json").stdout)["redis_py"]
    script = "\n".join([*lines, "from soaf.protocol.codec import key_id",
                        "print(r.ping(), key_id(secret))"])
    run = subprocess.run([str(SOAF.parent / "python"), "-c", script], capture_output=True,
                         text=True, env={"PATH": os.environ["PATH"]}, timeout=30)
    assert run.stdout.split() == ["True", key_id(key)], run.stderr
    assert core.stop() == 0
    stopped = soaf(env, "info")
    assert stopped.returncode == 0, stopped.stderr
    assert re.search(r"^cores +none running: this command opened the embedded data itself "
                     r"\(the URL file exists while a core runs\)$", stopped.stdout, re.M), stopped.stdout


def test_wait_all_with_no_core_has_nothing_to_wait_for(start_core, embedded_env):
    core = start_core(**embedded_env)
    assert soaf(embedded_env, "wait", submit(embedded_env, "-s", "true")).returncode == 0
    assert core.stop() == 0
    out = soaf(embedded_env, "wait", "--all")
    assert out.returncode == 0 and out.stderr == "nothing to wait for\n"
    out = soaf(embedded_env, "wait", "--all", "--follow")
    assert out.returncode == 1 and "Error: --follow waits for services that are not final, " \
                                   "but no core is running" in out.stderr
