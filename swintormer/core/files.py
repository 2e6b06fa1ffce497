"""Atomic writes: a file or a whole folder appears complete or not at all.

Everything this project writes that someone may read while it is written, or that a killed
process may leave behind (images, configs, models, checkpoints, cache entries), goes through
:func:`atomic_write_bytes` / :func:`atomic_write_text` or :func:`atomic_folder`: the content is
written beside the target under a hidden temporary name and moved into place with ``os.replace``,
which POSIX makes atomic within one file system. Temporary names start with ``.{name}.`` and end
in ``.tmp``, so :func:`remove_stale_temporaries` can clear what a killed writer left.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def _plain_file_mode(path: str) -> None:
    """``mkstemp`` creates files private (0600); give them the mode a plain ``open()`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush one file's content to disk (a no-op for folders)."""
    if Path(path).is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _plain_file_mode(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it in for ``target`` on success.

    ``with atomic_folder(dir) as staging:`` yields an empty folder beside ``dir``; write into it.
    When the block ends normally every file is flushed and the staging folder replaces ``dir``
    (an existing ``dir`` is moved aside first and deleted after), so a reader never sees half a
    model and an interrupted save leaves the previous one. When the block raises, the staging
    folder is deleted and ``dir`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent))
    staging.chmod(0o755)
    try:
        yield staging
        for entry in staging.rglob("*"):
            fsync_file(entry)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=TEMPORARY_SUFFIX,
                                            dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the temporary files and folders a killed writer left in ``folder`` (those of
    ``name`` only, when given). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # glob.escape: a file name may hold glob characters ("[1].jpg")
    pattern = f".{glob.escape(name)}.*{TEMPORARY_SUFFIX}" if name else f".*{TEMPORARY_SUFFIX}"
    removed = []
    for stale in folder.glob(pattern):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
