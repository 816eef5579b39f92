"""Writing files all or nothing, and failing early when a path cannot be written.

Every write goes through :func:`atomic_write` (temporary file in the same folder, fsync,
rename): a failed write raises OutputError("cannot write <path>: <cause>") and leaves an
earlier file at that path as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

from segadapt.errors import write_error

PathLike = Union[str, Path]


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # mkstemp creates 0600 files; written outputs get the usual permissions


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file (fd, name) in `path`'s folder, created if missing; OSError when
    a file stands where the folder should be or a folder where `path` should be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file stands where the folder should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: Optional[str] = None) -> Iterator:
    """Write ``path`` all or nothing: yields a temporary file in the same folder (parents are
    created); when the block ends it is flushed, fsynced and renamed over ``path``.

    Any OSError (read-only or full disk, a file where a folder should be, a folder where
    the file should be, ...) becomes ``OutputError("cannot write <path>: <cause>")``; the
    temporary file is removed and an earlier file at ``path`` is left unchanged.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _temp_beside(path)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def ensure_writable(path: PathLike) -> Path:
    """Fail early, before long work, when ``path`` could not be written: creates its
    folder, and creates and removes a temporary file there. Raises the OutputError
    :func:`atomic_write` would (a file where a folder should be, a folder where the file
    should be, a read-only file system, no permission). ``path`` itself is not touched."""
    path = Path(path)
    try:
        fd, tmp = _temp_beside(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise write_error(path, e) from None
    return path


def write_text_atomic(path: PathLike, text: str) -> None:
    """``path.write_text(text)`` through :func:`atomic_write` (UTF-8)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
