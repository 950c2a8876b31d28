"""Staging inputs into a work dir from local paths, HTTP, FTP and fsspec's memory fs."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

import soaf
from soaf import FetchError, ServiceParamTemplate, ValidationError
from soaf.data.staging import StageContext, redact, stage, stage_inputs
from soaf.plugin.program import ServiceProgramTemplate
from soaf.plugin.service import Service
from tests.dataservers import (  # noqa: F401  (fixtures)
    FTP_PASSWORD,
    closed_port,
    ftp_files,
    http_files,
    served,
)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "svc"
    path.mkdir(parents=True)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".part"))


# -- local --------------------------------------------------------------------------------


def test_local_file_and_directory_are_copied_never_moved(served, work):
    t = ServiceParamTemplate("x", input_files={"in/a.txt": str(served / "a.txt"),
                                               "tree": str(served / "tree")})
    staged = stage_inputs(t, work)
    assert (served / "a.txt").exists() and (served / "tree" / "sub" / "y.txt").exists()
    assert (work / "in" / "a.txt").read_text() == "alpha beta gamma\n"
    assert (work / "tree" / "sub" / "y.txt").read_text() == "y y\n"
    assert os.stat(work / "in" / "a.txt").st_ino != os.stat(served / "a.txt").st_ino
    assert [s.to_record() for s in staged] == [
        {"name": "in/a.txt", "source": str(served / "a.txt"), "size": 17, "files": 1,
         "mode": "copy"},
        {"name": "tree", "source": str(served / "tree"), "size": 6, "files": 2, "mode": "copy"},
    ]
    assert leftovers(work) == []


def test_link_and_symlink_modes(served, work):
    t = ServiceParamTemplate("x", input_files={"a.txt": str(served / "a.txt"),
                                               "tree": str(served / "tree")}, input_mode="link")
    staged = stage_inputs(t, work)
    assert os.stat(work / "a.txt").st_ino == os.stat(served / "a.txt").st_ino
    assert os.stat(work / "tree" / "x.txt").st_ino == os.stat(served / "tree" / "x.txt").st_ino
    assert {s.mode for s in staged} == {"link"}

    t.input_mode = "symlink"
    staged = stage_inputs(t, work)  # a second attempt replaces what the first left
    assert (work / "a.txt").is_symlink() and (work / "tree").is_symlink()
    assert os.readlink(work / "a.txt") == str((served / "a.txt").resolve())
    assert (work / "tree" / "sub" / "y.txt").read_text() == "y y\n"
    assert {s.mode for s in staged} == {"symlink"}
    assert (served / "a.txt").exists() and not (served / "a.txt").is_symlink()

    t.input_mode = "copy"  # and back: the symlinks are replaced, their targets untouched
    stage_inputs(t, work)
    assert not (work / "tree").is_symlink() and (served / "tree" / "x.txt").exists()


def test_missing_local_source_names_it(work):
    with pytest.raises(FetchError, match=r"/no/such/input.*no such file or directory"):
        stage("/no/such/input", work, "input")


def test_input_mode_and_output_fields_are_validated():
    with pytest.raises(ValidationError, match="input_mode"):
        ServiceParamTemplate("x", input_mode="move").validate()
    with pytest.raises(ValidationError, match="optional_outputs"):
        ServiceParamTemplate("x", optional_outputs=["../up"]).validate()
    with pytest.raises(ValidationError, match="output_target"):
        ServiceParamTemplate("x", output_target="relative/dir").validate()
    with pytest.raises(ValidationError, match="work_path"):
        ServiceParamTemplate("x", work_path=".soaf/runs").validate()
    with pytest.raises(ValidationError, match="service id"):
        ServiceParamTemplate("x", input_files=["soaf://../x"]).validate()
    ServiceParamTemplate("x", input_mode="symlink", output_target="s3://b/{service_id}",
                         optional_outputs=["*.log"],
                         input_files=[soaf.output_ref("abc", "out/r.txt")]).validate()


def test_payload_from_before_the_data_fields_still_decodes():
    t = ServiceParamTemplate("x", input_files=["/a"])
    for name in ("input_mode", "optional_outputs", "output_target"):
        del t.__dict__[name]  # as pickled by a client that did not know these fields
    back = soaf.loads(soaf.dumps(t, "k" * 20), ["k" * 20])
    back.validate()
    assert (back.input_mode, tuple(back.optional_outputs), back.output_target) == ("copy", (), None)


# -- http ---------------------------------------------------------------------------------


def test_http_download(http_files, served, work):
    staged = stage(http_files.url("b.bin"), work, "b.bin")
    assert (work / "b.bin").read_bytes() == (served / "b.bin").read_bytes()
    assert (staged.size, staged.mode, staged.source) == (1 << 20, "download", http_files.url("b.bin"))


def test_http_404_names_url_and_status(http_files, work):
    url = http_files.url("nothere.txt")
    with pytest.raises(FetchError) as info:
        stage(url, work, "nothere.txt")
    assert url in str(info.value) and "HTTP 404" in str(info.value)
    assert list(work.iterdir()) == []


def test_unreachable_host(work):
    url = f"http://127.0.0.1:{closed_port()}/x.txt"
    with pytest.raises(FetchError, match="refused") as info:
        stage(url, work, "x.txt")
    assert url in str(info.value)
    assert list(work.iterdir()) == []


def test_download_cut_half_way_leaves_no_complete_looking_file(http_files, work):
    with pytest.raises(FetchError, match=r"closed after 524288 of 1048576 bytes"):
        stage(http_files.url("half/b.bin"), work, "b.bin")
    assert list(work.iterdir()) == []  # neither b.bin nor a .part file


def test_failed_retry_keeps_nothing_half_done_over_an_old_file(http_files, work):
    (work / "b.bin").write_bytes(b"old")
    with pytest.raises(FetchError):
        stage(http_files.url("half/b.bin"), work, "b.bin")
    assert (work / "b.bin").read_bytes() == b"old"
    assert leftovers(work) == []


# -- ftp ----------------------------------------------------------------------------------


def test_ftp_file_and_directory(ftp_files, served, work):
    stage(ftp_files.url("b.bin"), work, "b.bin")
    assert (work / "b.bin").read_bytes() == (served / "b.bin").read_bytes()
    staged = stage(ftp_files.url("tree"), work, "tree")
    assert (work / "tree" / "sub" / "y.txt").read_text() == "y y\n"
    assert (staged.files, staged.size) == (2, 6)


def test_ftp_credentials_are_used_but_never_recorded(ftp_files, work):
    staged = stage(ftp_files.url("a.txt", user=True), work, "a.txt")
    assert (work / "a.txt").read_text() == "alpha beta gamma\n"
    assert FTP_PASSWORD not in staged.source and "soaf@127.0.0.1" in staged.source
    assert redact("ftp://u:pw@h:21/x") == "ftp://u@h:21/x"


def test_ftp_missing_file(ftp_files, work):
    with pytest.raises(FetchError, match=r"nothere\.txt: not found"):
        stage(ftp_files.url("nothere.txt"), work, "nothere.txt")
    assert list(work.iterdir()) == []


# -- memory (fsspec, in this process) -----------------------------------------------------


def test_memory_filesystem_file_and_tree(work):
    fs = fsspec.filesystem("memory")
    fs.pipe("/staging-test/one.txt", b"one")
    fs.pipe("/staging-test/dir/two.txt", b"two!")
    t = ServiceParamTemplate("x", input_files={"one.txt": "memory://staging-test/one.txt",
                                               "d": "memory://staging-test/dir"})
    staged = stage_inputs(t, work)
    assert (work / "one.txt").read_bytes() == b"one"
    assert (work / "d" / "two.txt").read_bytes() == b"two!"
    assert [(s.size, s.files) for s in staged] == [(3, 1), (4, 1)]
    with pytest.raises(FetchError, match="not found"):
        stage("memory://staging-test/none", work, "none")


def test_unknown_scheme(work):
    with pytest.raises(FetchError, match="nosuchscheme"):
        stage("nosuchscheme://x/y", work, "y")


# -- the program's default step records what it staged ------------------------------------


def test_prepare_input_file_records_inputs(http_files, served, work):
    seen: list[dict] = []
    t = ServiceParamTemplate("x", input_files=[http_files.url("a.txt"), str(served / "tree")])
    program = ServiceProgramTemplate(t, work, plugin_root=work)
    program.service = Service(t, work, attempt=1, node="n", plugin_version="1", emit=seen.append)
    program.prepare_input_file()
    assert seen == [{"inputs": [
        {"name": "a.txt", "source": http_files.url("a.txt"), "size": 17, "files": 1,
         "mode": "download"},
        {"name": "tree", "source": str(served / "tree"), "size": 6, "files": 2, "mode": "copy"},
    ]}]


def test_reference_without_a_core_resolver(work):
    with pytest.raises(FetchError, match="resolved by a core only"):
        stage("soaf://abc/out.txt", work, "out.txt")


def test_reference_resolved_to_a_local_path_is_hard_linked(served, work):
    context = StageContext(resolve=lambda ref: served / "b.bin")
    staged = stage("soaf://abc/b.bin", work, "b.bin", context=context)
    assert os.stat(work / "b.bin").st_ino == os.stat(served / "b.bin").st_ino
    assert staged.mode == "link" and staged.to_record()["resolved"] == str(served / "b.bin")


def test_reference_resolved_to_a_url_is_downloaded(http_files, work):
    context = StageContext(resolve=lambda ref: http_files.url("a.txt"))
    staged = stage("soaf://abc/a.txt", work, "a.txt", context=context)
    assert (work / "a.txt").read_text() == "alpha beta gamma\n"
    assert staged.mode == "download"
