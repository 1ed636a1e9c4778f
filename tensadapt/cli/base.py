"""What every command module of the CLI shares: the usage error and small argument checks."""

from __future__ import annotations

import argparse
import codecs
from pathlib import Path

from ..errors import TensadaptError


class UsageError(TensadaptError):
    """A command-line mistake (exit 2)."""


def existing_file(path: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; :class:`UsageError` unless it is a regular file."""
    p = Path(path)
    problem = file_problem(p)
    if problem:
        raise UsageError(f"{path}: {problem}")
    return p


def file_problem(p: Path) -> str | None:
    """Why ``p`` cannot be read as a file (``None`` when it can): missing, a directory, or not a
    regular file (a FIFO or a device would block or never end)."""
    if not p.exists():
        return "no such file"
    if p.is_dir():
        return "is a directory, expected a file"
    if not p.is_file():
        return "is not a regular file (a pipe or a device cannot be read)"
    return None


def encoding(text: str) -> str:
    """argparse ``type=`` of ``--encoding``: a codec Python knows."""
    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown text encoding {text!r}") from None
    return text


def not_a_file(path: str | None, flag: str) -> None:
    """:class:`UsageError` when an output directory flag names an existing non-directory."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
