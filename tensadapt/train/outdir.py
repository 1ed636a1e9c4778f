"""Output directories of ``train`` and ``sweep``: checked, then claimed, before any work starts.

An output directory is usable when it does not exist yet (its nearest existing parent must be a
writable directory), or it is empty, or it holds only what the same command writes (a previous
run being replaced, or a sweep being resumed). An existing file, an unwritable place, or a
directory with anything else in it is refused by name -- at once, not after an hour of training.

A *claim* is a lock file (:data:`LOCK_FILE`, holding the claiming process's id and host) created
with ``O_EXCL``: a second process asking for the same directory is refused while the first is
alive; a lock left by a killed process (its pid no longer running on this host) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import TensadaptError

LOCK_FILE = ".tensadapt.lock"
#: what a ``train`` run writes (adapter, specs, plan, metrics; failed.json records a failed run;
#: checkpoints/ with --save-steps)
RUN_FILES: frozenset[str] = frozenset(
    {
        "adapter.safetensors",
        "adapter_config.json",
        ".tensadapt-save.lock",
        "spec.yaml",
        "plan.json",
        "resolved_spec.yaml",
        "metrics.json",
        "failed.json",
        "checkpoints",
    }
)
#: what a ``sweep`` writes at its top level: runs, results, the trained tokenizer of a preset (its
#: workers share it) and with ``--tune-lr`` the studies' journal, its lock file and ``tuning.csv``
#: (named here so that this module imports nothing of tuning's)
SWEEP_FILES: frozenset[str] = frozenset(
    {
        "runs",
        "results.csv",
        "pareto.png",
        "tokenizer",
        "tuning.journal",
        "tuning.journal.lock",
        "tuning.csv",
    }
)


class OutputDirError(TensadaptError, ValueError):
    """An output directory that cannot be used (or is in use); the message says why."""


def _is_ours(name: str) -> bool:
    """Lock files and the temporary files of an interrupted atomic write (``.NAME.xxxx.tmp``)."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def check_output_dir(
    path: str | os.PathLike[str], owned: Collection[str], flag: str = "--out"
) -> Path:
    """Refuse an output directory that cannot hold this command's output.

    Args:
        path: the directory.
        owned: names the command writes there (:data:`RUN_FILES`, :data:`SWEEP_FILES`).
        flag: how the directory is named in messages.
    Returns:
        the directory as a :class:`~pathlib.Path` (not created).
    Raises:
        OutputDirError: an existing non-directory, a directory holding anything else, or a
            place where the directory cannot be created or written.
    """
    d = Path(path)
    if d.exists() or d.is_symlink():
        if not d.is_dir():
            raise OutputDirError(f"{flag} {d}: exists and is not a directory")
        foreign = sorted(n for n in os.listdir(d) if n not in owned and not _is_ours(n))
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise OutputDirError(
                f"{flag} {d}: is not empty and not an earlier output of this command (it holds "
                f"{shown}); choose a new or empty directory"
            )
        where = d
    else:
        where = d.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise OutputDirError(f"{flag} {d}: {where} is not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise OutputDirError(f"{flag} {d}: {where} is not writable")
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass
class Claim:
    """A claimed output directory; :meth:`release` (or leaving the ``with`` block) frees it."""

    path: Path
    lock: Path

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        try:
            if json.loads(self.lock.read_text()).get("pid") == os.getpid():
                self.lock.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def claim_output_dir(
    path: str | os.PathLike[str], owned: Collection[str], flag: str = "--out"
) -> Claim:
    """Check (:func:`check_output_dir`), create and lock an output directory.

    Raises:
        OutputDirError: see :func:`check_output_dir`; or another live process holds the lock
            (its pid is named).
    """
    d = check_output_dir(path, owned, flag)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"{flag} {d}: cannot create it ({e.strerror})") from None
    lock = d / LOCK_FILE
    me: dict[str, object] = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = -1, str(me["host"])  # unreadable or half-written: a crashed claim
            if host != str(me["host"]) or (pid > 0 and _alive(pid)):
                raise OutputDirError(
                    f"{flag} {d}: in use by process {pid} on {host} (lock file {lock}; delete it "
                    "if no run is using the directory)"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        except OSError as e:
            raise OutputDirError(f"{flag} {d}: cannot write there ({e.strerror})") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return Claim(d, lock)
    raise OutputDirError(f"{flag} {d}: could not take the lock {lock}; try again")
