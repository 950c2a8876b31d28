"""soaf:// references resolve to local paths only inside the work root."""

from __future__ import annotations

from pathlib import Path

import pytest

from soaf.data.handoff import resolve_ref
from soaf.errors import FetchError


def record(url: str) -> dict:
    return {"state": "succeeded", "host": "elsewhere", "work_dir": "/nowhere",
            "outputs": [{"name": "data.txt", "url": url}]}


@pytest.mark.parametrize("url", ["/etc/shadow", "file:///etc/passwd", "../../etc/passwd"])
def test_local_path_outside_the_work_root_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(FetchError, match="outside the work root"):
        resolve_ref("soaf://p/data.txt", lookup={"p": record(url)}.get, work_root=tmp_path)


def test_link_out_of_the_work_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to("/etc")
    with pytest.raises(FetchError, match="outside the work root"):
        resolve_ref("soaf://p/data.txt", lookup={"p": record(str(root / "out/passwd"))}.get,
                    work_root=root)


def test_remote_url_and_path_inside_the_root_are_kept(tmp_path: Path) -> None:
    inside = tmp_path / "w" / "data.txt"
    lookup = {"p": record("s3://bucket/data.txt"), "q": record(str(inside))}.get
    assert resolve_ref("soaf://p/data.txt", lookup=lookup, work_root=tmp_path) == \
        "s3://bucket/data.txt"
    assert resolve_ref("soaf://q/data.txt", lookup=lookup, work_root=tmp_path) == inside
