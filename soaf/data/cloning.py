"""Cloning: putting another service's output into a work dir without copying its bytes.

Per file, the cheapest way the file systems allow, in this order:

1. a reflink (``FICLONE``; btrfs, XFS, bcachefs ...): a private copy-on-write copy that
   shares the blocks until either side writes. The consumer may change it freely.
2. a hard link: the same inode as the producer's file. So that the consumer cannot
   change the producer's output through it, the shared inode loses its write bits
   (the producer has finished: its outputs no longer change). File modes do not stop a
   program running as root; such a program must not write its linked inputs in place.
3. a copy, across file systems (``EXDEV``) or where links are refused.

The mode used is recorded per input (``inputs[].mode``): the weakest one any of its
files needed (``reflink`` < ``link`` < ``copy``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: ``_IOW(0x94, 9, int)`` from <linux/fs.h>: clone all of one file into another.
FICLONE = 0x40049409

#: errno values that mean "this way is not possible here", not "something broke".
NOT_HERE = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.EOPNOTSUPP,
                      errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EBADF})

_RANK = {"reflink": 0, "link": 1, "copy": 2}

Copy = Callable[[str, str], object]


def reflink(src: str, dst: str) -> bool:
    """Clone ``src`` to the new file ``dst``; False (and no ``dst``) where not possible."""
    try:
        with open(src, "rb") as source, open(dst, "xb") as target:
            try:
                fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
            except OSError:
                os.unlink(dst)
                raise
    except OSError as e:
        if e.errno not in NOT_HERE:
            raise
        return False
    shutil.copystat(src, dst)
    return True


def read_only(path: str) -> None:
    """Take the write bits off ``path`` (the inode a hard link shares)."""
    mode = os.stat(path).st_mode
    os.chmod(path, stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def clone_file(src: str, dst: str, *, copy: Copy) -> str:
    """Put ``src`` at ``dst``: ``reflink``, else ``link`` (read-only), else ``copy``."""
    if reflink(src, dst):
        return "reflink"
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in NOT_HERE:
            raise
        copy(src, dst)
        return "copy"
    read_only(dst)
    return "link"


def clone(source: Path, tmp: Path, *, copy: Copy) -> str:
    """Put the file or tree ``source`` at ``tmp``; the weakest mode any file needed."""
    used = ["reflink"]

    def one(src: str, dst: str) -> None:
        mode = clone_file(src, dst, copy=copy)
        if _RANK[mode] > _RANK[used[0]]:
            used[0] = mode

    if source.is_dir():
        shutil.copytree(source, tmp, copy_function=one)
    else:
        one(str(source), str(tmp))
    log.debug("cloned %s to %s (%s)", source, tmp, used[0])
    return used[0]
