"""Collecting outputs (present, missing, optional, globs), checksums, and uploads."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import fsspec
import pytest

from soaf import MissingOutputError, ServiceParamTemplate, UploadError
from soaf.data.handoff import resolve_ref
from soaf.data.matching import Matcher
from soaf.data.outputs import collect_outputs, expand_target, upload_outputs
from soaf.errors import OutputLimitError, TransferStopped
from soaf.plugin.program import ServiceProgramTemplate
from soaf.plugin.service import Service
from tests.dataservers import FTP_PASSWORD, ftp_files, served  # noqa: F401  (fixtures)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "svc"
    (path / "out" / "deep").mkdir(parents=True)
    (path / "result.txt").write_text("42\n")
    (path / "out" / "a.csv").write_text("a,b\n1,2\n")
    (path / "out" / "b.csv").write_text("c\n")
    (path / "out" / "deep" / "c.dat").write_bytes(b"\x00" * 10)
    (path / "scratch.tmp").write_text("junk")
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_present_outputs_with_globs_and_directories(work):
    outputs = collect_outputs(work, ["result.txt", "out/*.csv"])
    assert [o.to_record() for o in outputs] == [
        {"name": "out/a.csv", "size": 8, "sha256": sha(b"a,b\n1,2\n")},
        {"name": "out/b.csv", "size": 2, "sha256": sha(b"c\n")},
        {"name": "result.txt", "size": 3, "sha256": sha(b"42\n")},
    ]
    names = [o.name for o in collect_outputs(work, ["out"])]  # a directory: all below it
    assert names == ["out/a.csv", "out/b.csv", "out/deep/c.dat"]
    assert [o.name for o in collect_outputs(work, ["**/*.dat"])] == ["out/deep/c.dat"]


def test_missing_outputs_are_listed(work):
    with pytest.raises(MissingOutputError) as info:
        collect_outputs(work, ["result.txt", "summary.json", "plots/*.png"])
    assert info.value.missing == ["summary.json", "plots/*.png"]
    assert "summary.json, plots/*.png" in str(info.value)


def test_optional_outputs(work):
    outputs = collect_outputs(work, ["result.txt"], ["debug.log", "*.tmp"])
    assert [o.name for o in outputs] == ["result.txt", "scratch.tmp"]
    assert collect_outputs(work, [], ["nothing*"]) == []


def test_a_symlink_out_of_the_work_dir_is_not_collected(work, tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_text("not yours")
    (work / "leak.txt").symlink_to(secret)
    with pytest.raises(MissingOutputError):
        collect_outputs(work, ["leak.txt"])


def test_a_fifo_is_skipped_with_a_note_not_read(work):
    os.mkfifo(work / "out" / "pipe")  # opening it for reading would block forever
    notes: list[str] = []
    names = [o.name for o in collect_outputs(work, ["out"], ["*.fifo", "out/pipe"], notes=notes)]
    assert names == ["out/a.csv", "out/b.csv", "out/deep/c.dat"]
    assert notes == ["'out/pipe' is a FIFO, not a regular file; skipped"] * 2
    with pytest.raises(MissingOutputError):
        collect_outputs(work, ["out/pipe"])


def test_wildcards_never_follow_links(work):
    for i in range(10):  # ten links to the work dir itself: 10**6 paths if followed
        (work / f"l{i}").symlink_to(".")
    (work / "out.txt").write_text("x")
    started = time.monotonic()
    notes: list[str] = []
    assert collect_outputs(work, ["out.txt"], ["*/*/*/*/*/*/out.txt", "**/out.txt"],
                           notes=notes)[0].name == "out.txt"
    assert time.monotonic() - started < 5
    assert [o.name for o in collect_outputs(work, [], ["**/out.txt", "*/out.txt"])] == ["out.txt"]
    assert "'l0' is a symbolic link, matched by a wildcard; skipped" not in notes  # dirs: silent
    (work / "out" / "link.csv").symlink_to(work / "out" / "a.csv")
    notes.clear()
    assert "out/link.csv" not in [o.name for o in collect_outputs(work, ["out/*"], notes=notes)]
    assert "'out/link.csv' is a symbolic link, matched by a wildcard; skipped" in notes
    # a literal name may go through a link that stays inside
    assert [o.name for o in collect_outputs(work, ["l3/result.txt"])] == ["l3/result.txt"]


def test_matching_is_bounded_in_files_and_entries(work):
    for i in range(30):
        (work / "out" / f"f{i}.txt").write_text("x")
    matcher = Matcher(work, max_files=10)
    with pytest.raises(OutputLimitError, match="more than 10 files"):
        matcher.match("out/*.txt")
    with pytest.raises(OutputLimitError, match="more than 5 entries"):
        Matcher(work, max_entries=5).match("**/*.dat")
    with pytest.raises(OutputLimitError, match="took more than 0 s"):
        Matcher(work, time_limit=0).match("**/*")


def test_a_stop_request_ends_collection_and_upload_between_chunks(work, tmp_path):
    (work / "big.bin").write_bytes(b"\x01" * (3 << 20))
    with pytest.raises(TransferStopped):
        collect_outputs(work, ["out"], stop=lambda: True)
    outputs = collect_outputs(work, ["big.bin", "result.txt"])
    chunks = iter(range(100))
    target = tmp_path / "target"
    with pytest.raises(TransferStopped):
        upload_outputs(work, outputs, str(target), stop=lambda: next(chunks) >= 2)
    assert [p for p in target.rglob("*") if p.is_file()] == []  # nothing, not even a .part


def test_upload_to_a_directory_target(work, tmp_path):
    outputs = collect_outputs(work, ["result.txt", "out"])
    target = tmp_path / "results" / "run-1"
    upload_outputs(work, outputs, str(target))
    assert (target / "result.txt").read_text() == "42\n"
    assert (target / "out" / "deep" / "c.dat").read_bytes() == b"\x00" * 10
    assert sorted(p.name for p in target.rglob("*.part")) == []
    assert outputs[0].url == f"{target}/out/a.csv"
    for o in outputs:
        assert sha((target / o.name).read_bytes()) == o.sha256
    (work / "result.txt").write_text("43\n")  # a second upload replaces the file
    upload_outputs(work, collect_outputs(work, ["result.txt"]), f"file://{target}")
    assert (target / "result.txt").read_text() == "43\n"


def test_upload_to_memory_and_ftp(work, ftp_files, served):
    outputs = collect_outputs(work, ["result.txt", "out/*.csv"])
    upload_outputs(work, outputs, "memory://upload-test/run")
    fs = fsspec.filesystem("memory")
    assert fs.cat("/upload-test/run/out/a.csv") == b"a,b\n1,2\n"
    assert fs.find("/upload-test/run") == [
        "/upload-test/run/out/a.csv", "/upload-test/run/out/b.csv", "/upload-test/run/result.txt"]

    upload_outputs(work, outputs, ftp_files.url("uploads/run", user=True))
    assert (served / "uploads" / "run" / "out" / "b.csv").read_text() == "c\n"
    assert [p.name for p in served.rglob("*.part")] == []
    assert FTP_PASSWORD not in outputs[0].url


@pytest.mark.parametrize("target", ["ftp", "memory"])
def test_a_stop_request_ends_an_upload_inside_a_file(work, ftp_files, served, target):
    """A cancel during the upload of one large file over fsspec stops it between chunks
    and leaves nothing on the target, not even a partial file."""
    (work / "big.bin").write_bytes(b"\x01" * (5 << 20))
    outputs = collect_outputs(work, ["big.bin"])
    chunks = iter(range(100))
    url = (ftp_files.url("uploads/stopped", user=True) if target == "ftp"
           else "memory://stopped-upload/run")
    with pytest.raises(TransferStopped):
        upload_outputs(work, outputs, url, stop=lambda: next(chunks) >= 2)
    assert next(chunks) == 3  # stopped after the second chunk of the only file
    if target == "ftp":
        assert [p for p in served.rglob("*") if p.is_file() and "stopped" in str(p)] == []
    else:
        assert fsspec.filesystem("memory").find("/stopped-upload") == []


def test_upload_failure_is_an_upload_error(work, tmp_path, ftp_files):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    outputs = collect_outputs(work, ["result.txt"])
    with pytest.raises(UploadError, match="afile"):
        upload_outputs(work, outputs, str(blocker / "sub"))
    with pytest.raises(UploadError):  # anonymous FTP may not write
        upload_outputs(work, outputs, ftp_files.url("uploads/anon"))


def test_target_placeholders():
    t = ServiceParamTemplate("conv", service_id="abc")
    assert expand_target("/r/{service}/{service_id}", t) == "/r/conv/abc"


def test_collect_output_files_records_and_uploads(work, tmp_path):
    seen: list[dict] = []
    t = ServiceParamTemplate("conv", service_id="abc", output_files=["result.txt"],
                             optional_outputs=["none.txt"],
                             output_target=str(tmp_path / "t" / "{service_id}"))
    program = ServiceProgramTemplate(t, work, plugin_root=work)
    program.service = Service(t, work, attempt=1, node="n", plugin_version="1", emit=seen.append)
    program.collect_output_files()
    target = tmp_path / "t" / "abc"
    assert (target / "result.txt").read_text() == "42\n"
    assert seen == [{"outputs": [{"name": "result.txt", "size": 3, "sha256": sha(b"42\n"),
                                  "url": f"{target}/result.txt"}],
                     "output_target": str(target)}]
    assert program.service.outputs[0]["name"] == "result.txt"


# -- resolving references to other services' outputs --------------------------------------


def producer(work_root: Path, **fields) -> dict:
    work_dir = work_root / "prod"
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "big.bin").write_bytes(b"x" * 100)
    record = {"state": "succeeded", "host": os.uname().nodename, "work_dir": str(work_dir),
              "outputs": [{"name": "big.bin", "size": 100, "sha256": "..."}]}
    record.update(fields)
    return record


def test_reference_on_the_same_host_is_the_local_path(tmp_path):
    root = tmp_path / "root"
    record = producer(root)
    found = resolve_ref("soaf://prod/big.bin", lookup={"prod": record}.get, work_root=root)
    assert found == (root / "prod" / "big.bin").resolve()


def test_reference_elsewhere_uses_the_uploaded_copy(tmp_path):
    root = tmp_path / "root"
    record = producer(root, host="elsewhere", output_target="ftp://h/res",
                      outputs=[{"name": "big.bin", "url": "ftp://h/res/big.bin"},
                               {"name": "d/one.txt", "url": "ftp://h/res/d/one.txt"}])
    # A work root shared at the same path would show the file here: use it then.
    assert resolve_ref("soaf://prod/big.bin", lookup={"prod": record}.get,
                       work_root=root) == (root / "prod" / "big.bin").resolve()
    (root / "prod" / "big.bin").unlink()  # not shared: the producer's dir is not here
    lookup = {"prod": record}.get
    assert resolve_ref("soaf://prod/big.bin", lookup=lookup, work_root=root) == \
        "ftp://h/res/big.bin"
    assert resolve_ref("soaf://prod/d", lookup=lookup, work_root=root) == "ftp://h/res/d"
    # Same host, but the producer's work dir is not under this core's work root.
    assert resolve_ref("soaf://prod/big.bin", lookup={"prod": {**record, "host": os.uname().nodename}}.get,
                       work_root=tmp_path / "other-root") == "ftp://h/res/big.bin"


def test_reference_that_cannot_be_resolved(tmp_path):
    from soaf import FetchError

    root = tmp_path / "root"
    far = producer(root, host="far")
    (root / "prod" / "big.bin").unlink()  # another host, its work dir not shared here
    with pytest.raises(FetchError, match="not uploaded: give the producing template an output_target"):
        resolve_ref("soaf://prod/big.bin", lookup={"prod": far}.get, work_root=root)
    with pytest.raises(FetchError, match="is running, not succeeded"):
        resolve_ref("soaf://prod/big.bin", lookup={"prod": producer(root, state="running")}.get,
                    work_root=root)
    with pytest.raises(FetchError, match="no service with id 'ghost'"):
        resolve_ref("soaf://ghost/x", lookup={}.get, work_root=root)
