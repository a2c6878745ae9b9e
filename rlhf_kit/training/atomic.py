"""Atomic directories: build under a temporary name, then rename into place; delete by renaming first.

A directory written with :func:`atomic_directory` either exists complete or not at all, whatever
moment a process is killed at; :func:`remove_directory` renames a directory to a trash name before
deleting it, so a kill mid-delete never leaves a half-deleted directory under its real name. Leftover
temporary and trash names start with ``.`` and are swept by :func:`sweep_leftovers`.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_kit.errors import DiskFullError

TMP_TAG, TRASH_TAG = ".tmp-", ".trash-"


def remove_directory(path: str | Path) -> None:
    """Delete ``path`` (if it exists): renamed to ``.trash-<name>-<id>`` first, then removed."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_TAG}{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_directory(src: str | Path, dst: str | Path) -> None:
    """Move the complete directory ``src`` to ``dst``, replacing a previous ``dst`` (moved aside first)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f"{TRASH_TAG}{dst.name}-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def sweep_leftovers(directory: str | Path, depth: int = 1) -> None:
    """Remove temporary and trash directories a killed process left in ``directory`` (and in its
    subdirectories, ``depth`` levels down). Call it where no other process is writing."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith((TMP_TAG, TRASH_TAG)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        elif depth > 1 and p.is_dir() and not p.is_symlink():
            sweep_leftovers(p, depth - 1)


def is_disk_full(error: BaseException, path: str | Path, min_free: int = 1 << 20) -> bool:
    """True when ``error`` (raised while writing under ``path``) comes from a full disk.

    ``ENOSPC`` is checked first; torch's zip writer reports a full disk only as ``unexpected pos``,
    so for other errors the free space left on ``path``'s file system decides.
    """
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(error) or "unexpected pos" in str(error):
        return True
    try:
        return shutil.disk_usage(Path(path)).free < min_free
    except OSError:
        return False


def disk_full_error(path: str | Path, what: str) -> DiskFullError:
    """The one-line error for a write of ``what`` to ``path`` that failed on a full disk."""
    try:
        free = f"{shutil.disk_usage(Path(path)).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"disk full writing {what} to {path} ({free}); the partial write was removed")


@contextmanager
def atomic_directory(path: str | Path, what: str = "directory") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it replaces ``path`` in one rename.

    On any error the temporary directory is removed; a full disk becomes one-line
    :class:`~rlhf_kit.errors.DiskFullError` naming ``path`` and ``what``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_TAG}{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, DiskFullError):
            if is_disk_full(e, path.parent):
                raise disk_full_error(path, what) from None
        raise


def write_file(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file in the same folder and
    ``os.replace``: readers see the old file or the new one, never half of it. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
