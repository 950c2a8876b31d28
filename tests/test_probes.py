"""Progress probes and the ETA, measured on real work dirs in this process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from soaf import PluginError, ServiceParamTemplate, probes
from soaf.cli.render import eta_text
from soaf.plugin.eta import EtaEstimate
from soaf.plugin.handler import DefaultHandler
from soaf.plugin.loader import PluginLoader
from soaf.protocol.state import ServiceRecord
from tests.test_plugins import root, write  # noqa: F401  (root is a fixture)

T = ServiceParamTemplate("s", args={"chunks": 4})


def measure(probe, work: Path) -> float | None:
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    return probe.measure(work, T, files)


def test_files_counts_matches_in_one_directory_over_the_total(tmp_path):
    probe = probes.files("out/chunk_*.json", total=lambda t: t.args["chunks"])
    assert measure(probe, tmp_path) == 0.0
    (tmp_path / "out" / "deep").mkdir(parents=True)
    for name in ("out/chunk_1.json", "out/chunk_2.json", "out/deep/chunk_3.json", "chunk_4.json"):
        (tmp_path / name).write_text("{}")
    assert measure(probe, tmp_path) == 0.5  # * does not cross a directory
    assert measure(probes.files("out/*/*.json", total=2), tmp_path) == 0.5


def test_log_takes_the_last_matching_line(tmp_path):
    probe = probes.log(r"step (\d+) of (\d+)")
    assert measure(probe, tmp_path) is None  # no output yet
    (tmp_path / "stdout.log").write_text("starting\nstep 1 of 8\nstep 3 of 8\nnoise\n")
    assert measure(probe, tmp_path) == 3 / 8
    percent = probes.log(r"(\d+)% done")
    (tmp_path / "stdout.log").write_text("12% done\n40% done\n")
    assert measure(percent, tmp_path) == 0.4
    rows = probes.log(r"wrote (\d+) rows", total=lambda t: 10 * t.args["chunks"])
    (tmp_path / "stdout.log").write_text("wrote 10 rows\n")
    assert measure(rows, tmp_path) == 0.25
    err = probes.log(r"(\d+)/(\d+)", stream="stderr")
    (tmp_path / "stderr.log").write_text("3/4\n")
    assert measure(err, tmp_path) == 0.75


def test_log_reads_only_the_tail_and_skips_punched_holes(tmp_path):
    with open(tmp_path / "stdout.log", "wb") as f:
        f.write(b"\0" * 200_000 + b"step 1 of 2\n" + b"x" * 100_000 + b"\nstep 2 of 4\n")
    assert measure(probes.log(r"step (\d+) of (\d+)"), tmp_path) == 0.5


@pytest.mark.parametrize(("text", "expected"), [
    ("0.25", 0.25), ("40%", 0.4), ("3/4\n", 0.75), (" 1 ", 1.0), ("", None), ("soon", None),
])
def test_file_holds_a_fraction_a_percentage_or_a_count(tmp_path, text, expected):
    (tmp_path / "progress.txt").write_text(text)
    assert measure(probes.file("progress.txt"), tmp_path) == expected


def test_file_with_a_total(tmp_path):
    (tmp_path / "done.txt").write_text("2")
    assert measure(probes.file("done.txt", total=8), tmp_path) == 0.25


def test_file_is_never_read_through_a_fifo_or_outside_the_work_dir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    os.mkfifo(work / "progress.txt")  # opening it for reading would block forever
    assert measure(probes.file("progress.txt"), work) is None
    (tmp_path / "secret").write_text("0.5")
    (work / "p2.txt").symlink_to(tmp_path / "secret")
    assert measure(probes.file("p2.txt"), work) is None
    (work / "p3.txt").symlink_to("/dev/zero")
    assert measure(probes.file("p3.txt"), work) is None


@pytest.mark.parametrize("make", [
    lambda: probes.files("out/*.json", total=None),
    lambda: probes.files("../x", total=3),
    lambda: probes.files("/abs/*.json", total=3),
    lambda: probes.files("a", total=0),
    lambda: probes.log(r"no groups"),
    lambda: probes.log(r"(a)(b)(c)"),
    lambda: probes.log(r"(unclosed"),
    lambda: probes.log(r"(\d+)", stream="stdin"),
    lambda: probes.file("../progress.txt"),
])
def test_bad_probes_are_refused_where_they_are_defined(make):
    with pytest.raises(PluginError):
        make()


def test_a_total_that_is_not_a_positive_number_raises_when_measured(tmp_path):
    with pytest.raises(PluginError, match="not a positive number"):
        measure(probes.files("*.json", total=lambda t: 0), tmp_path)


def test_the_loader_wraps_the_handler_and_refuses_a_progress_that_is_no_probe(root):
    write(root, "services/a.py", """
        from soaf import ServiceProgramTemplate, probes

        class A(ServiceProgramTemplate):
            name = "a"
            progress = probes.file("p.txt")

        class B(ServiceProgramTemplate):
            name = "b"
    """)
    registry = PluginLoader(root).load()
    assert issubclass(registry.handler("a"), DefaultHandler)
    assert registry.handler("a") is not DefaultHandler
    assert registry.handler("b") is DefaultHandler
    write(root, "services/a.py", """
        from soaf import ServiceProgramTemplate

        class A(ServiceProgramTemplate):
            name = "a"
            progress = "p.txt"
    """)
    with pytest.raises(PluginError, match=r"A.progress must be a probe"):
        PluginLoader(root).load()


def test_eta_follows_the_recent_rate():
    now = [1000.0]
    eta = EtaEstimate(window=30, clock=lambda: now[0])
    assert eta.update(0.0) is None  # one sample: no rate yet
    now[0] = 1010.0
    assert eta.update(0.1) == pytest.approx(1100.0)  # 0.01/s, 0.9 to go
    now[0] = 1020.0
    assert eta.update(0.3) == pytest.approx(1020.0 + 0.7 / 0.015)
    for t in range(1030, 1100, 10):  # much faster now: the old samples leave the window
        now[0] = float(t)
        value = eta.update(0.3 + (t - 1020) * 0.005)
    assert value == pytest.approx(now[0] + (1 - 0.65) / 0.005, rel=0.05)
    now[0] = 1200.0
    assert eta.update(0.1) is None  # went back: the rate starts over
    assert eta.update(1.0) == 1200.0


def test_eta_text():
    running = ServiceRecord("x", "running", raw={"state": "running", "eta": 1090.0})
    assert eta_text(running, now=1000.0) == "1m"
    assert eta_text(running, now=1095.0) == "overdue"
    assert eta_text(ServiceRecord("x", "succeeded", raw={"eta": 1090.0}), now=1000.0) == "-"
    assert eta_text(ServiceRecord("x", "running"), now=1000.0) == "-"


def test_a_handler_setting_progress_gets_an_eta_too(tmp_path):
    from soaf.plugin.service import Service

    emitted: list[dict] = []
    service = Service(T, tmp_path, attempt=1, node="n", plugin_version="1", emit=emitted.append)
    service.progress = 0.2
    time.sleep(0.01)  # two samples apart in time make a rate
    before = time.time()
    service.progress = 0.4
    assert emitted[0] == {"progress": 0.2, "eta": None}
    assert emitted[1]["progress"] == 0.4 and emitted[1]["eta"] > before
