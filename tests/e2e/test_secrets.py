"""Secrets on a real core: no start without one on a shared Redis (unless --insecure, which
warns loudly), key rotation across restarts, and the secret never appearing in logs,
state records, dead letters, --help, error messages or a program's environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

import soaf
from soaf import ServiceParamTemplate
from soaf.config import INSECURE_SECRET
from soaf.protocol.codec import key_id
from soaf.protocol.keys import Keys
from tests.conftest import ROOT, wait_until

NEW = "rotation-new-key-0123456789abcdefgh"
OLD = "rotation-old-key-0123456789abcdefgh"


def exited(core, timeout: float = 30) -> int:
    wait_until(lambda: core.proc.poll() is not None, timeout, message="the core to exit")
    return core.proc.returncode


def good(client: soaf.Client) -> str:
    return client.submit(ServiceParamTemplate("steps", args={"n": 1, "delay": 0.01}))


def everything_under(r: redis.Redis, prefix: str) -> bytes:
    """Every key, field and value soaf wrote under ``prefix``, as one blob to grep."""
    out = []
    for key in r.scan_iter(match=f"{prefix}:*"):
        kind = r.type(key)
        out.append(key)
        if kind == b"hash":
            for k, v in r.hgetall(key).items():
                out += [k, v]
        elif kind == b"stream":
            for _, data in r.xrange(key):
                for k, v in data.items():
                    out += [k, v]
        elif kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"zset":
            out += list(r.zrange(key, 0, -1))
    return b"\n".join(out)


def test_core_on_a_shared_redis_refuses_to_start_without_a_secret(start_core) -> None:
    core = start_core(wait_ready=False, SOAF_SECRET="")
    assert exited(core) == 1
    assert "Error: no secret configured for a shared Redis: set SOAF_SECRET or " \
           "SOAF_SECRET_FILE (or pass --insecure" in core.log()
    assert "ready" not in core.log()


def test_unreadable_or_double_secret_configuration_fails_clearly(start_core, tmp_path) -> None:
    core = start_core(wait_ready=False, SOAF_SECRET="", SOAF_SECRET_FILE=str(tmp_path / "nope"))
    assert exited(core) == 1
    assert f"cannot read secret file {tmp_path / 'nope'}: No such file or directory" in core.log()
    keys = tmp_path / "keys"
    keys.write_text(NEW + "\n")
    core = start_core(wait_ready=False, SOAF_SECRET=OLD, SOAF_SECRET_FILE=str(keys))
    assert exited(core) == 1
    assert "set SOAF_SECRET or a secret file" in core.log()
    assert OLD not in core.log() and NEW not in core.log()


def test_insecure_core_warns_loudly_and_accepts_the_well_known_key(
        start_core, redis_server, prefix, monkeypatch) -> None:
    core = start_core(args=["--insecure"], SOAF_SECRET="")
    log = core.log()
    assert "!" * 72 in log
    assert "INSECURE CORE: no secret is set" in log
    assert "can run any code on this core" in log
    assert f"accepting payloads signed with key id {key_id(INSECURE_SECRET)}" in log
    for name in ("SOAF_SECRET", "SOAF_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOAF_INSECURE", "1")  # a client opts in the same way
    monkeypatch.setenv("SOAF_STATE_DIR", "/nonexistent-soaf-state")
    client = soaf.Client(redis_server.url, prefix=prefix)
    assert client.wait(good(client), timeout=60).state == "succeeded"
    client.close()


def test_key_rotation_sign_new_accept_both_retire_old(start_core, redis_server, prefix,
                                                     tmp_path) -> None:
    old = soaf.Client(redis_server.url, secret=OLD, prefix=prefix)
    new = soaf.Client(redis_server.url, secret=NEW, prefix=prefix)

    core = start_core(SOAF_SECRET=OLD)  # 1. everybody on OLD
    assert old.wait(good(old), timeout=60).state == "succeeded"
    assert core.stop() == 0
    queued_old = good(old)  # waits in the stream while no core runs

    core = start_core(SOAF_SECRET=f"{NEW},{OLD}")  # 2. cores accept both; clients move to NEW
    assert f"accepting payloads signed with key ids {key_id(NEW)}, {key_id(OLD)}" in core.log()
    assert old.wait(queued_old, timeout=60).state == "succeeded"
    assert new.wait(good(new), timeout=60).state == "succeeded"
    assert old.wait(good(old), timeout=60).state == "succeeded"  # a straggler still works
    assert core.stop() == 0
    late_old = good(old)

    keys = tmp_path / "keys"  # 3. OLD retired: cores list NEW only (here from a key file)
    keys.write_text(NEW + "\n")
    keys.chmod(0o600)
    core = start_core(SOAF_SECRET="", SOAF_SECRET_FILE=str(keys))
    record = old.wait(late_old, timeout=60)
    assert record.state == "rejected"
    assert record.error == (f"payload signed with key id {key_id(OLD)}, which this core does "
                            "not know: the client's SOAF_SECRET differs from the core's "
                            f"(the core accepts key id {key_id(NEW)})")
    assert new.wait(good(new), timeout=60).state == "succeeded"
    record = old.wait(good(old), timeout=60)
    assert record.state == "rejected" and key_id(OLD) in record.error
    assert core.alive()
    old.close()
    new.close()


def test_secret_never_appears_anywhere(start_core, client, redis_server, prefix, core_env,
                                       tmp_path) -> None:
    core = start_core(SOAF_SECRET=f"{NEW},{OLD}")  # -v: debug logging
    new = soaf.Client(redis_server.url, secret=NEW, prefix=prefix)
    stranger = soaf.Client(redis_server.url, secret="not-the-key-0123456789abcdef", prefix=prefix)
    ok = new.wait(good(new), timeout=60)
    assert ok.state == "succeeded"
    dump = new.wait(new.submit(ServiceParamTemplate("envdump")), timeout=60)
    assert dump.state == "succeeded"
    refused = stranger.wait(good(stranger), timeout=60)
    assert refused.state == "rejected"
    r = redis_server.client()
    r.xadd(Keys(prefix).submit, {"payload": b"soaf1:" + key_id(NEW).encode() + b":" + b"0" * 64
                                 + b":forged", "id": "forged-1"})
    assert new.wait("forged-1", timeout=60).state == "rejected"
    r.xadd(Keys(prefix).submit, {"payload": b"\x00garbage"})
    wait_until(lambda: r.xlen(Keys(prefix).deadletter) >= 1, 30, message="a dead letter")
    new.close()
    stranger.close()

    env_file = Path(dump.get("work_dir")) / "env.txt"
    program_env = env_file.read_text()
    assert "SOAF_SERVICE_ID=" in program_env  # the program did get soaf's own variables
    env = {**core_env, "SOAF_SECRET": f"{NEW},{OLD}"}
    helps = [subprocess.run([sys.executable, str(ROOT / "start_core.py"), "--help"], env=env,
                            capture_output=True, text=True, timeout=60, cwd=str(ROOT)),
             subprocess.run([sys.executable, "-m", "soaf.cli", "--help"], env=env,
                            capture_output=True, text=True, timeout=60, cwd=str(ROOT))]
    assert "--secret-file" in helps[0].stdout and "--max-payload" in helps[0].stdout
    assert core.stop() == 0
    texts = {
        "core log": core.log(),
        "state in Redis": everything_under(r, prefix).decode(errors="replace"),
        "program environment": program_env,
        **{f"help {i}": h.stdout + h.stderr for i, h in enumerate(helps)},
    }
    assert "refused entry" in texts["core log"] and "ready" in texts["core log"]
    for where, text in texts.items():
        for secret in (NEW, OLD):
            assert secret not in text, f"a secret appears in the {where}"
    assert os.environ.get("SOAF_SECRET") not in (NEW, OLD)
