"""The result cache end to end: templates answered from earlier runs by content."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from soaf import ServiceParamTemplate
from soaf.protocol.signed import sign_control
from tests.conftest import wait_until
from tests.dataservers import http_files, served  # noqa: F401  (fixtures)
from tests.e2e.test_cli import soaf
from tests.e2e.test_pipeline import example_core, run_example  # noqa: F401  (a fixture)


def checksum(path: Path | str, *, cache: bool = True, service: str = "checksum",
             **kwargs) -> ServiceParamTemplate:
    return ServiceParamTemplate(service, input_files={"in.txt": str(path)},
                                output_files=["sum.txt"], cache=cache, **kwargs)


def ran(record) -> bool:
    """It ran its program (it was not answered from the cache)."""
    return record.get("running_at") is not None and record.get("cached_from") is None


def test_the_same_content_is_answered_from_the_cache(start_core, client, core_env, tmp_path):
    start_core()
    data = tmp_path / "a.txt"
    data.write_text("hello\n")
    first = client.wait(client.submit(checksum(data)), timeout=60)
    assert first.ok and ran(first) and len(first.get("cache_key")) == 64

    again = client.wait(client.submit(checksum(data)), timeout=60)
    assert again.ok and not ran(again) and again.get("cached_from") == first.service_id
    assert again.get("cache_key") == first.get("cache_key")
    assert again.outputs == first.outputs and again.get("work_dir") == first.get("work_dir")
    assert again.get("pid") is None and again.progress == 1.0
    events = list(client.events(again.service_id, follow=False))
    assert [e.get("state") for e in events] == ["queued", "building", None, "succeeded"]
    assert "cache_key" in events[2] and "cache_key" not in events[1]  # building came first
    shown = soaf(core_env, "status", again.service_id).stdout
    assert re.search(rf"^cached from +{first.service_id}$", shown, re.M), shown

    copy = tmp_path / "copy.txt"  # another path, the same bytes: the same content
    shutil.copy(data, copy)
    assert client.wait(client.submit(checksum(copy)), timeout=60).get("cached_from")
    for different in (checksum(data, args={"salt": "x"}), checksum(data, env={"X": "1"}),
                      checksum(data, cache=False),
                      checksum(data, optional_outputs=["*.log"])):
        record = client.wait(client.submit(different), timeout=60)
        assert record.ok and ran(record), different
    assert client.wait(client.submit(checksum(data, cache=False)), timeout=60).get(
        "cache_key") is None
    data.write_text("changed\n")
    changed = client.wait(client.submit(checksum(data)), timeout=60)
    assert ran(changed) and changed.get("cache_key") != first.get("cache_key")


def test_a_cacheable_service_needs_no_flag(start_core, client, tmp_path):
    start_core()
    data = tmp_path / "a.txt"
    data.write_text("hello\n")
    first = client.wait(client.submit(checksum(data, cache=False, service="checksum-cacheable")),
                        timeout=60)
    again = client.wait(client.submit(checksum(data, cache=False, service="checksum-cacheable")),
                        timeout=60)
    assert ran(first) and again.get("cached_from") == first.service_id


def test_gone_outputs_make_it_run_and_an_output_target_keeps_them(start_core, client,
                                                                   tmp_path):
    start_core()
    data = tmp_path / "a.txt"
    data.write_text("hello\n")
    first = client.wait(client.submit(checksum(data)), timeout=60)
    shutil.rmtree(first.get("work_dir"))  # retention removed it
    second = client.wait(client.submit(checksum(data)), timeout=60)
    assert second.ok and ran(second)  # nothing to answer with: it ran, and is the entry now
    assert client.wait(client.submit(checksum(data)), timeout=60).get(
        "cached_from") == second.service_id

    target = tmp_path / "results" / "{service_id}"
    uploaded = client.wait(client.submit(checksum(data, output_target=str(target))), timeout=60)
    assert ran(uploaded)
    shutil.rmtree(uploaded.get("work_dir"))
    hit = client.wait(client.submit(checksum(data, output_target=str(target))), timeout=60)
    assert hit.get("cached_from") == uploaded.service_id  # its copy in the target answers
    assert hit.outputs[0]["url"] == uploaded.outputs[0]["url"]
    assert Path(hit.outputs[0]["url"]).read_text().startswith("5891b5b522d5df086d0ff0b110fbd9d2")
    shutil.rmtree(tmp_path / "results" / uploaded.service_id)  # the target's copy is gone too
    third = client.wait(client.submit(checksum(data, output_target=str(target))), timeout=60)
    assert ran(third)
    client.redis.delete(client.keys.service(third.service_id))  # its record expired
    assert ran(client.wait(client.submit(checksum(data, output_target=str(target))), timeout=60))


def test_a_plugin_change_invalidates_the_cache(start_core, client, core_env, tmp_path):
    start_core()
    data = tmp_path / "a.txt"
    data.write_text("hello\n")
    first = client.wait(client.submit(checksum(data)), timeout=60)
    before = next(iter(client.plugins().values()))["version"]
    plugin = Path(core_env["SOAF_PLUGINS"]) / "handlers" / "unrelated.py"
    plugin.write_text("# any module of handlers/ counts\n")
    wait_until(lambda: next(iter(client.plugins().values()))["version"] != before, 30,
               message="the plugins reloaded")
    again = client.wait(client.submit(checksum(data)), timeout=60)
    assert ran(again) and again.get("cache_key") != first.get("cache_key")


def test_cache_ls_and_clear(start_core, client, core_env, tmp_path):
    start_core()
    data = tmp_path / "a.txt"
    data.write_text("hello\n")
    first = client.wait(client.submit(checksum(data)), timeout=60)
    listed = json.loads(soaf(core_env, "cache", "ls", "--json").stdout)
    assert [(e["service"], e["service_id"], e["state"]) for e in listed] == [
        ("checksum", first.service_id, "succeeded")]
    assert re.search(rf"^checksum +[0-9a-f]{{16}} +{first.service_id} +succeeded",
                     soaf(core_env, "cache").stdout, re.M)
    out = soaf(core_env, "cache", "clear", "checksum")
    assert out.returncode == 0 and out.stdout.strip() == "cleared 1 entry of checksum"
    assert ran(client.wait(client.submit(checksum(data)), timeout=60))  # forgotten: it runs
    assert soaf(core_env, "cache", "clear").stdout.strip() == "cleared 1 entry"
    assert "empty" in soaf(core_env, "cache").stderr


def test_an_entry_not_signed_by_a_core_is_ignored(start_core, client, tmp_path):
    start_core()
    data, other = tmp_path / "a.txt", tmp_path / "b.txt"
    data.write_text("hello\n")
    other.write_text("something else\n")
    first = client.wait(client.submit(checksum(data)), timeout=60)
    decoy = client.wait(client.submit(checksum(other)), timeout=60)
    key = first.get("cache_key")
    # Someone who can write to Redis points the key at another run (whose record they
    # make claim that key), unsigned or signed with a key the core does not hold: the
    # core runs the service instead.
    client.redis.hset(client.keys.service(decoy.service_id), "cache_key", json.dumps(key))
    for sig in ("", sign_control("cache", f"checksum/{key}/{decoy.service_id}", "wrong-key-" * 3)):
        client.redis.hset(client.keys.cache("checksum"), key,
                          json.dumps({"id": decoy.service_id, "at": time.time(), "sig": sig}))
        record = client.wait(client.submit(checksum(data)), timeout=60)
        assert ran(record) and record.get("cached_from") is None


def test_a_url_input_is_matched_by_its_version(start_core, client, http_files, served):
    start_core()
    url = http_files.url("a.txt")
    first = client.wait(client.submit(checksum(url)), timeout=60)
    assert first.ok and ran(first)
    assert client.wait(client.submit(checksum(url)), timeout=60).get(
        "cached_from") == first.service_id
    (served / "a.txt").write_text("a new version\n")
    later = time.time() + 10
    os.utime(served / "a.txt", (later, later))  # Last-Modified moves on
    changed = client.wait(client.submit(checksum(url)), timeout=60)
    assert changed.ok and ran(changed)


def test_the_cache_example(example_core, core_env, client):
    out = run_example("cache_client.py", core_env, "--delay", "0.2")
    assert out.returncode == 0, out.stdout + out.stderr
    first, second = re.findall(r"^(first|second): (\w+) succeeded in ([\d.]+) s, (.+); "
                               r"(\d+) words$", out.stdout, re.M)
    assert first[3] == "ran" and second[3] == f"answered from the cache by {first[1]}"
    assert first[4] == second[4] != "None"
    assert client.status(second[1]).get("cached_from") == first[1]
