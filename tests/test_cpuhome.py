"""The core's CPU home (soaf.core.cpuhome) and the affinity it rests on
(soaf.process.affinity). Each test runs in a process of its own: pinning the test
runner's threads would slow every test after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from soaf.config import ConfigError, Settings

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs a machine with two CPUs or more")


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@needs_two
def test_threads_share_one_cpu_and_what_they_start_under_spread_gets_all():
    found = run("""
        import json, os, subprocess, sys, threading
        from soaf.process import affinity
        before = sorted(os.sched_getaffinity(0))
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # an old one
        affinity.home_threads(frozenset({before[-1]}))
        later = []
        t = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
        t.start(); t.join()
        olds = {tuple(sorted(os.sched_getaffinity(int(tid))))
                for tid in os.listdir("/proc/self/task")}
        show = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
        with affinity.spread():
            affinity.home_threads(frozenset({before[-1]}))  # another look leaves it spread
            spread = subprocess.run(show, capture_output=True, text=True).stdout
        pinned = subprocess.run(show, capture_output=True, text=True).stdout
        print(json.dumps({"before": before, "olds": [list(o) for o in olds], "later": later[0],
                          "spread": spread, "pinned": pinned,
                          "programs": sorted(affinity.program_cpus()),
                          "after": sorted(os.sched_getaffinity(0))}))
    """)
    home = [CPUS[-1]]
    assert found["olds"] == [home] and found["later"] == home and found["after"] == home
    assert found["spread"].strip() == str(CPUS) and found["programs"] == CPUS
    assert found["pinned"].strip() == str(home)


@needs_two
def test_auto_moves_off_a_cpu_other_work_crowds_but_not_for_its_own_work():
    found = run("""
        import json, os, subprocess, sys, threading, time
        from soaf.core.cpuhome import CpuHome
        home = CpuHome("auto", interval=0.2)
        first = home.start()
        # The core's own work on its CPU is no reason to move.
        def spin(end=time.monotonic() + 1.5):
            while time.monotonic() < end:
                pass
        busy = threading.Thread(target=spin)
        busy.start(); busy.join()
        stayed = home.cpu
        # Another process that keeps it busy is.
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # inherits the CPU
        deadline = time.monotonic() + 20
        while home.cpu == first and time.monotonic() < deadline:
            time.sleep(0.1)
        hog.kill(); hog.wait()
        home.stop()
        print(json.dumps({"first": first, "stayed": stayed, "moved": home.cpu,
                          "now": sorted(os.sched_getaffinity(0))}))
    """)
    assert found["stayed"] == found["first"]
    assert found["moved"] != found["first"] and found["now"] == [found["moved"]]


@needs_two
def test_a_cpu_number_is_kept_and_off_pins_nothing():
    found = run(f"""
        import json, os
        from soaf.core.cpuhome import CpuHome
        fixed = CpuHome("{CPUS[0]}").start()
        fixed_now = sorted(os.sched_getaffinity(0))
        print(json.dumps({{"fixed": fixed, "fixed_now": fixed_now}}))
    """)
    assert found == {"fixed": CPUS[0], "fixed_now": [CPUS[0]]}
    found = run("""
        import json, os
        from soaf.core.cpuhome import CpuHome
        missing = CpuHome("4096").start()  # not a CPU this process may use: logged, no pin
        off = CpuHome("off").start()
        print(json.dumps({"off": off, "missing": missing, "now": sorted(os.sched_getaffinity(0))}))
    """)
    assert found == {"off": None, "missing": None, "now": CPUS}


def test_the_setting_is_auto_off_or_a_cpu_number(monkeypatch, tmp_path):
    monkeypatch.setenv("SOAF_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("SOAF_INSECURE", "1")
    assert Settings.load().core_cpu == "auto"
    assert Settings.load(core_cpu="3").core_cpu == "3"
    monkeypatch.setenv("SOAF_CORE_CPU", "OFF")
    assert Settings.load().core_cpu == "off"
    with pytest.raises(ConfigError, match="auto, off or a CPU number"):
        Settings.load(core_cpu="fast")
