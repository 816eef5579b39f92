"""Writing files all or nothing, and failing early when a path cannot be written.

Every write goes through :func:`atomic_write` (temporary file in the same folder, fsync,
rename): a failed write raises OutputError("cannot write <path>: <cause>") and leaves an
earlier file at that path as it was. That holds for writers that hide the OSError too
(torch's C++ zip writer reports a full disk as "enforce fail ... unexpected pos").
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


class _RecordingFile:
    """A file object that remembers the first OSError its write() raised: some writers
    (torch.save's C++ zip writer) swallow it and fail later with their own message."""

    def __init__(self, f):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            if self.error is None:
                self.error = e
            raise

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: Optional[str] = None) -> Iterator:
    """Write ``path`` all or nothing: yields a temporary file in the same folder (parents are
    created); when the block ends it is flushed, fsynced and renamed over ``path``.

    Any OSError (read-only or full disk, a file where a folder should be, a folder where
    the file should be, ...) becomes ``OutputError("cannot write <path>: <cause>")``; the
    temporary file is removed and an earlier file at ``path`` is left unchanged. A writer
    that turns a failed write into its own exception (torch.save's RuntimeError) gets the
    same OutputError, with the cause the write met.
    """
    path = Path(path)
    tmp = None
    recording = None
    try:
        fd, tmp = _temp_beside(path)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            recording = _RecordingFile(f)
            yield recording
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    except Exception:
        if recording is not None and recording.error is not None:
            raise write_error(path, recording.error) from None
        raise
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


def write_texts_atomic(texts: dict) -> None:
    """Several text files as one set ({path: text}, UTF-8): every file is written and synced to a
    temporary file first, and only then are they renamed into place, so a full disk leaves the
    earlier set whole instead of a new file beside old ones. OutputError names the file that
    failed; no temporary file is left."""
    temps: list = []
    try:
        for path, text in texts.items():
            path = Path(path)
            try:
                fd, tmp = _temp_beside(path)
                temps.append((tmp, path))
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, _FILE_MODE)
            except OSError as e:
                raise write_error(path, e) from None
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(path, e) from None
        temps = []
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
