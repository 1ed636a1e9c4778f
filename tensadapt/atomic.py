"""Writing files so that a crash, a full disk or a concurrent writer never leaves a mix.

- :func:`atomic_write`: write to a temporary file in the same directory, flush it to disk, give it
  the mode the umask allows, rename it over the target; on any failure the temporary file is
  removed and the old file is untouched (:class:`AdapterSaveError` says so).
- :func:`locked`: an exclusive ``flock`` on a directory's lock file for the duration of a multi-file
  save, so concurrent savers are serialised; :func:`clean_temp_files` (called under that lock)
  removes what killed writers left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from .errors import TensadaptError


class AdapterSaveError(TensadaptError, OSError):
    """A save could not complete (disk full, permissions); the previous adapter is intact."""


def umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def locked(directory: Path, lock_name: str) -> Iterator[None]:
    """An exclusive lock on ``directory`` (its file ``lock_name``) for the duration of a save."""
    fd = os.open(directory / lock_name, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` (same directory).

    The temporary file is flushed to disk before the rename and removed on any failure; the
    final file gets the mode the umask gives (``mkstemp`` would leave it ``0600``).

    Raises:
        AdapterSaveError: the write failed (the old ``path`` is untouched).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        # safetensors reports a full disk as its own error ("... os error 28")
        full = getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in str(exc)
        what = "disk full" if full else getattr(exc, "strerror", None) or str(exc)
        raise AdapterSaveError(
            f"{path}: could not be written ({what}); the previous file is intact"
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_temp_files(directory: Path, names: Iterable[str]) -> None:
    """Remove what killed saves left behind (only called under the directory's save lock)."""
    for name in names:
        for f in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                f.unlink()


__all__ = [
    "AdapterSaveError",
    "atomic_write",
    "clean_temp_files",
    "fsync_dir",
    "locked",
    "umask",
    "write_text",
]
