"""Training and evaluation data: read, check, refuse by name -- before anything is built.

Formats (chosen by the file's extension):

- ``.tsv`` / ``.csv``: a header line, then one example per row with a text and an integer label
  column (sequence classification). Fields may be quoted as RFC 4180 says (``"a, b"``); a row
  whose number of fields differs from the header's is refused with its line (an unquoted comma
  in a CSV text would otherwise cut the text silently), as is a quote that is never closed.
- ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line; the text must be a JSON string
  and the label an integer (a list or an object is refused, not stringified).
- ``.txt``: plain text, one document per line (causal-LM fine-tuning).
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face ``datasets`` dataset (the ``[hf]`` extra).

Every file is decoded with ``--encoding`` (default UTF-8; a UTF-8 byte-order mark is accepted);
bytes that do not decode are refused naming the line and byte offset, whatever the format. Only
regular files are read (a FIFO or a device would block or never end). Labels are integers
``0 <= label < MAX_LABELS`` (a label of 999999999 would otherwise size a classifier head of
billions of parameters). Every problem is a :class:`DataError` naming the file and the line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..deps import require
from ..errors import TensadaptError, first_line
from .options import check

#: the most classes a classification task may have (labels are 0 .. MAX_LABELS - 1)
MAX_LABELS = 10_000
TASKS: tuple[str, ...] = ("auto", "classification", "causal-lm")
JSON_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".ndjson")
DELIMITED: dict[str, str] = {".tsv": "\t", ".csv": ","}
_DIGITS = re.compile(r"[0-9]+")


class DataError(TensadaptError, ValueError):
    """Training or evaluation data that cannot be used; the message names file, line and column."""


@dataclass(frozen=True)
class DataOptions:
    """How to read the data.

    Attributes:
        text_column: column holding the text (classification).
        label_column: column holding the integer class label.
        task: ``classification``, ``causal-lm`` or ``auto`` (a ``.txt`` file is causal LM).
        max_length: tokens per example (classification) or per block (causal LM).
        max_train: use only the first N training examples (``None``: all).
        max_eval: use only the first N evaluation examples.
        split, eval_split: splits of an ``hf:`` dataset without ``@SPLIT``.
        encoding: text encoding of the files (any codec Python knows; a UTF-8 BOM is skipped).

    Raises:
        DataError: an option out of range (named as its command-line flag).
    """

    text_column: str = "sentence"
    label_column: str = "label"
    task: str = "auto"
    max_length: int = 128
    max_train: int | None = None
    max_eval: int | None = None
    split: str = "train"
    eval_split: str = "validation"
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        check(self, DataError)  # max_length, max_train, max_eval against options.BOUNDS
        if self.text_column == self.label_column:
            raise DataError(
                f"--text-column and --label-column are both {self.text_column!r}; they must differ"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise DataError(f"--encoding: unknown text encoding {self.encoding!r}") from None


@dataclass
class Split:
    """One split: texts and (classification) labels."""

    source: str
    texts: list[str]
    labels: list[int] | None


@dataclass
class TaskData:
    """Checked data of one task."""

    task: str
    train: Split
    eval: Split | None
    num_labels: int


#: ``(line, row)``: a row of a data file with the line it starts on
Row = tuple[int, Mapping[str, Any]]


def detect_task(path: str, task: str) -> str:
    """``task`` itself, or for ``auto``: ``causal-lm`` for a ``.txt`` file, else classification."""
    if task not in TASKS:
        raise DataError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if task != "auto":
        return task
    return "causal-lm" if path.lower().endswith(".txt") else "classification"


def check_file(path: Path, what: str) -> None:
    """Raise :class:`DataError` unless ``path`` is a regular file (a FIFO would block forever)."""
    if not path.exists():
        raise DataError(f"{what} {path}: no such file")
    if path.is_dir():
        raise DataError(f"{what} {path}: is a directory, expected a data file")
    if not path.is_file():
        raise DataError(f"{what} {path}: is not a regular file (a pipe or a device cannot be read)")


def read_text(path: Path, what: str, encoding: str = "utf-8") -> str:
    """The whole text of a regular file in ``encoding`` (a UTF-8 byte-order mark is skipped).

    Raises:
        DataError: not a regular file, empty, or bytes that do not decode (line and byte named).
    """
    check_file(path, what)
    data = path.read_bytes()
    skip = 0
    if codecs.lookup(encoding).name == "utf-8" and data.startswith(codecs.BOM_UTF8):
        skip = len(codecs.BOM_UTF8)
    try:
        text = data[skip:].decode(encoding)
    except UnicodeDecodeError as e:
        at = e.start + skip
        line = data[:at].count(b"\n") + 1
        raise DataError(
            f"{what} {path}:{line}: not {encoding} text ({e.reason} at byte {at}); if the file "
            "uses another encoding, give it with --encoding"
        ) from None
    if not text.strip():
        raise DataError(f"{what} {path}: file is empty")
    return text


def lines_of(text: str) -> list[str]:
    """Lines ended by ``\n`` or ``\r\n`` only (``str.splitlines`` would also split inside a
    JSON string holding U+2028 or a form feed, and shift every later line number)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _json_rows(text: str, path: Path, what: str) -> tuple[list[str], list[Row]]:
    rows: list[Row] = []
    cols: dict[str, None] = {}
    for i, line in enumerate(lines_of(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, deep nesting
            why = e.msg if isinstance(e, json.JSONDecodeError) else first_line(e, 80)
            raise DataError(f"{what} {path}:{i}: not a JSON object per line ({why})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{what} {path}:{i}: expected a JSON object, got {type(obj).__name__}")
        cols.update(dict.fromkeys(obj))
        rows.append((i, obj))
    return list(cols), rows


def _delimited_rows(
    text: str, path: Path, what: str, delimiter: str
) -> tuple[list[str], list[Row]]:
    """Rows of a TSV/CSV text; every row must have exactly the header's number of fields."""
    name = "tab" if delimiter == "\t" else "comma"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[Row] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            hint = (
                " (a quoted field opened here is never closed)" if "end of data" in str(e) else ""
            )
            raise DataError(
                f"{what} {path}:{start}: malformed {name}-separated row: {e}{hint}"
            ) from None
        if not fields:
            continue  # a blank line
        if header is None:
            header = [c.strip() for c in fields]
            dupes = sorted({c for c in header if c and header.count(c) > 1})
            if dupes:
                raise DataError(
                    f"{what} {path}:{start}: column(s) {', '.join(map(repr, dupes))} appear more "
                    "than once in the header"
                )
            continue
        if len(fields) != len(header):
            more = len(fields) > len(header)
            hint = (
                f"an unquoted {name} inside a text? quote the field"
                if more
                else f"a missing field, or a {name} missing between fields?"
            )
            raise DataError(
                f"{what} {path}:{start}: {len(fields)} field(s), but the header has "
                f"{len(header)} ({hint})"
            )
        rows.append((start, dict(zip(header, fields, strict=True))))
    if header is None:
        raise DataError(f"{what} {path}: no header line")
    return header, rows


def read_rows(path: Path, what: str, encoding: str = "utf-8") -> tuple[list[str], list[Row]]:
    """``(columns, [(line, row)])`` of a TSV/CSV/JSONL file, every row checked for shape.

    Raises:
        DataError: see :func:`read_text`; unknown extension; a malformed row (its line named).
    """
    check_file(path, what)
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES and suffix not in DELIMITED:
        raise DataError(
            f"{what} {path}: unknown format {suffix or '(no extension)'!r}; use .tsv, .csv, "
            ".jsonl (classification) or .txt (causal LM)"
        )
    text = read_text(path, what, encoding)
    if suffix in JSON_SUFFIXES:
        return _json_rows(text, path, what)
    return _delimited_rows(text, path, what, DELIMITED[suffix])


def as_label(raw: Any) -> int | None:
    """An integer class label >= 0 from a JSON number or a string of ASCII digits, else ``None``."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if raw >= 0 else None
    if isinstance(raw, float):
        return int(raw) if raw.is_integer() and raw >= 0 else None
    if isinstance(raw, str) and _DIGITS.fullmatch(raw.strip()):
        digits = raw.strip()
        return int(digits) if len(digits) <= 18 else 10**18  # past any limit, never a huge int
    return None


def split_from_rows(
    src: str, cols: Sequence[str], rows: Sequence[Row], opts: DataOptions, what: str
) -> Split:
    """Texts and labels of checked rows.

    Raises:
        DataError: a missing column (the columns found are listed), no rows, a label that is not
            an integer in ``[0, MAX_LABELS)``, a text that is empty or not a string.
    """
    missing = [c for c in (opts.text_column, opts.label_column) if c not in cols]
    if missing:
        names = {opts.text_column: "--text-column", opts.label_column: "--label-column"}
        raise DataError(
            f"{what} {src}: missing column(s) "
            + ", ".join(f"{c!r} ({names[c]})" for c in missing)
            + f"; the file has: {', '.join(map(repr, cols)) or '(none)'}"
        )
    if not rows:
        raise DataError(f"{what} {src}: no data rows after the header")
    texts: list[str] = []
    labels: list[int] = []
    for line, row in rows:
        for col in (opts.label_column, opts.text_column):
            if col not in row:
                raise DataError(f"{what} {src}:{line}: no field {col!r}")
        raw = row[opts.label_column]
        label = as_label(raw)
        if label is None:
            raise DataError(
                f"{what} {src}:{line}: label {_show(raw)} in column {opts.label_column!r} is not "
                "an integer >= 0 (classes must be numbered 0, 1, ...)"
            )
        if label >= MAX_LABELS:
            raise DataError(
                f"{what} {src}:{line}: label {_show(raw)} in column {opts.label_column!r} is too large: "
                f"at most {MAX_LABELS:,} classes (labels 0..{MAX_LABELS - 1}) are supported"
            )
        text = row[opts.text_column]
        if not isinstance(text, str):
            raise DataError(
                f"{what} {src}:{line}: the text in field {opts.text_column!r} is a JSON "
                f"{_json_type(text)}, expected a string"
            )
        if not text.strip():
            raise DataError(f"{what} {src}:{line}: empty text in column {opts.text_column!r}")
        texts.append(text)
        labels.append(label)
    return Split(src, texts, labels)


def _show(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    kinds = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def read_hf(src: str, opts: DataOptions, task: str, what: str) -> Split:
    """``hf:NAME[:CONFIG][@SPLIT]`` through ``datasets.load_dataset`` (needs the hub or its cache).

    Raises:
        MissingDependencyError: ``datasets`` is not installed (the ``[hf]`` extra).
        DataError: the dataset cannot be loaded, or see :func:`split_from_rows`.
    """
    body = src[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    split = split or (opts.split if what == "--data" else opts.eval_split)
    if not name:
        raise DataError(f"{what} {src}: expected hf:NAME[:CONFIG][@SPLIT]")
    require("datasets", f"{what} {src}")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        raise DataError(
            f"{what} {src}: cannot load Hugging Face dataset {name!r}"
            f"{f' config {config!r}' if config else ''} split {split!r} (offline, or no such "
            f"dataset?): {first_line(e)}"
        ) from None
    cols = list(ds.column_names)
    if task == "causal-lm":
        col = opts.text_column if opts.text_column in cols else "text"
        if col not in cols:
            raise DataError(f"{what} {src}: no text column {opts.text_column!r}; has {cols}")
        return Split(src, [t for t in ds[col] if isinstance(t, str) and t.strip()], None)
    rows: Iterator[Row] = ((i + 2, r) for i, r in enumerate(ds))
    return split_from_rows(src, cols, list(rows), opts, what)


def read_split(
    path: str | os.PathLike[str], opts: DataOptions, task: str, what: str = "--data"
) -> Split:
    """Read one split from a file (or ``hf:`` name), checking everything.

    Raises:
        DataError: see the module docstring; every message names the file and, for a row, the line.
    """
    src = str(path)
    if src.startswith("hf:"):
        return read_hf(src, opts, task, what)
    p = Path(path)
    if task == "causal-lm":
        lines = [ln for ln in lines_of(read_text(p, what, opts.encoding)) if ln.strip()]
        return Split(str(p), lines, None)
    cols, rows = read_rows(p, what, opts.encoding)
    return split_from_rows(str(p), cols, rows, opts, what)


def load_task_data(
    data: str | os.PathLike[str], eval_data: str | os.PathLike[str] | None, opts: DataOptions
) -> TaskData:
    """Read and check the training (and evaluation) data.

    Raises:
        DataError: see :func:`read_split`; also eval labels the training data never uses, or a
            single class in the training data.
    """
    task = detect_task(str(data), opts.task)
    train = read_split(data, opts, task, "--data")
    ev = read_split(eval_data, opts, task, "--eval") if eval_data is not None else None
    if opts.max_train is not None:
        train = head(train, opts.max_train)
    if ev is not None and opts.max_eval is not None:
        ev = head(ev, opts.max_eval)
    num_labels = 0
    if task == "classification":
        assert train.labels is not None
        num_labels = max(train.labels) + 1
        if len(set(train.labels)) < 2:
            raise DataError(
                f"--data {train.source}: every label is {train.labels[0]}; classification needs "
                "at least two classes"
            )
        if ev is not None and ev.labels is not None and max(ev.labels) >= num_labels:
            raise DataError(
                f"--eval {ev.source}: label {max(ev.labels)} does not occur in the training data "
                f"(labels 0..{num_labels - 1})"
            )
    return TaskData(task, train, ev, num_labels)


def head(s: Split, n: int) -> Split:
    """The first ``n`` examples of a split."""
    return Split(s.source, s.texts[:n], s.labels[:n] if s.labels is not None else None)
