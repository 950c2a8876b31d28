"""Work directories: where they live under the work root, and keeping paths inside them.

Every name a template or plugin hands soaf (work_path, input and output names) is
resolved through ``confine``, which follows symlinks, so neither ``..`` nor a symlink
planted inside a work dir can reach a file outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from soaf.errors import ValidationError
from soaf.protocol.template import ServiceParamTemplate, check_relative


def confine(root: Path, name: str, *, field: str = "path") -> Path:
    """``root / name`` with symlinks resolved, or ValidationError if it leaves ``root``.

    Public as ``soaf.confine``: a plugin that writes files itself (an overridden
    ``prepare_input_file``) passes every name through it. ``name`` must be relative,
    without ``..``, and name an entry *in* ``root``; a symlink anywhere on the way,
    the last component included, is followed and must stay inside. ``field`` is the
    name the ValidationError gives (the template field the name came from).
    """
    check_relative(field, name)
    real_root = root.resolve()
    target = (real_root / name).resolve()
    if target == real_root:
        raise ValidationError(field, f"{name!r} resolves to {real_root} itself, not an entry in it")
    if real_root not in target.parents:
        raise ValidationError(field, f"{name!r} resolves to {target}, outside {real_root}")
    return target


def work_dir_for(work_root: Path, template: ServiceParamTemplate) -> Path:
    """The work dir a template runs in: its ``work_path`` or one named after its id."""
    name = template.work_path or template.service_id
    return confine(work_root, name, field="work_path" if template.work_path else "service_id")


def literal_prefix(name: str) -> str:
    """The part of an output name before its first glob character (``out`` for
    ``out/*.txt``): the directories a collector will walk through."""
    parts: list[str] = []
    for part in name.split("/"):
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return "/".join(parts)


def check_names(work_root: Path, work_dir: Path, template: ServiceParamTemplate, *,
                outputs_only: bool = False) -> None:
    """Check again, with the symlinks that exist *now*, that the work dir is still the one
    soaf created and that no input or output name leads out of it.

    ``build()`` or the program itself may have created links since the template was
    validated; nothing must be staged into or collected from outside through them.
    Raises ValidationError naming the field.
    """
    if not outputs_only:
        if template.work_path is None and not work_dir.is_symlink():
            pass  # one plain component under the resolved root: an lstat is proof enough
        elif (now := work_dir_for(work_root, template)) != work_dir:
            raise ValidationError(
                "work_path", f"the work dir {work_dir} now resolves to {now}; it was replaced")
        for name in ServiceParamTemplate.input_names(template):
            confine(work_dir, name, field="input_files")
    for name in template.output_files:
        prefix = literal_prefix(name)
        if prefix:
            confine(work_dir, prefix, field="output_files")


def create(work_root: Path, template: ServiceParamTemplate) -> Path:
    """Create (or re-use, for a shared ``work_path``) the template's work dir."""
    if template.work_path is None:
        # The common case, kept cheap: a validated id is one plain path component, and a
        # directory this call creates cannot be a symlink. (``work_root`` is resolved.)
        path = work_root / template.service_id
        try:
            path.mkdir()
            return path
        except FileNotFoundError:
            work_root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            pass
    path = work_dir_for(work_root, template)
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_aside(path: Path, label: str) -> Path | None:
    """Move ``path`` to ``<path>.<label>`` (numbered if taken) so a new, empty one can be made;
    returns where it went, None if there was nothing to move."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.{label}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{n}")
    path.rename(target)
    return target


def scan(work_dir: str) -> tuple[list[str], list[int], list[str]]:
    """(directories, their modification times, files) below ``work_dir``, as
    ``list_files`` lists the files, in one walk: each directory's time is read *before*
    the directory is listed, so any entry made after the listing moves a time returned
    here. A directory that cannot be read has the time -1 (and no files)."""
    dirs: list[str] = []
    mtimes: list[int] = []
    files: list[str] = []
    cut = len(work_dir) + 1
    todo = [work_dir]
    while todo:
        path = todo.pop()
        dirs.append(path)
        try:
            mtimes.append(os.stat(path).st_mtime_ns)
            entries = list(os.scandir(path))
        except OSError:
            if len(mtimes) < len(dirs):
                mtimes.append(-1)
            continue
        prefix = path[cut:]
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(f"{prefix}/{entry.name}" if prefix else entry.name)
            elif not _is_link(entry):  # as os.walk: a link to a dir is neither walked nor listed
                todo.append(entry.path)
    files.sort()
    return dirs, mtimes, files


def _is_link(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def list_files(work_dir: Path) -> list[str]:
    """Sorted paths of every regular file below ``work_dir``, relative to it (``scan``'s)."""
    return scan(str(work_dir))[2]
