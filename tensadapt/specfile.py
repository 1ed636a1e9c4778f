"""Reading a spec: YAML (or JSON) text within limits, with the line of every path.

A spec is a few hundred bytes. Anything far larger or deeper is a mistake or an attack, so every
limit is checked *before* the work it protects, and a breach is a
:class:`~tensadapt.errors.SpecError` that names the limit:

============  ===================================================================================
limit         checked
============  ===================================================================================
size          :data:`MAX_BYTES` of file or text, from ``stat`` / ``len`` before anything is read
              or parsed (a 50 MB file is refused without reading it); only regular files are
              read (a FIFO would block forever)
depth         :data:`MAX_DEPTH` levels of nesting, counted on the YAML event stream before a node
              is composed (PyYAML composes recursively: 600 levels would be a ``RecursionError``)
values        :data:`MAX_VALUES` values, aliases counted each time they are used ("billion
              laughs": 500 bytes of nested aliases expand to 10^9 values), counted lazily so the
              count stops at the limit
integers      :data:`MAX_INT_DIGITS` digits, checked on the literal before Python converts it
              (a 5,000-digit literal is a ``ValueError`` in ``int()``)
============  ===================================================================================

:func:`check_data` applies the depth, value and integer limits to data given as Python objects
(``load_spec(dict)``), shared references and cycles included.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import yaml

from .errors import Problem, SpecError, describe

#: Largest spec file or text, in bytes (characters for text).
MAX_BYTES = 1 << 20
#: Deepest nesting of mappings and lists (a real spec uses 3: ``options: {in_shape: [...]}``).
MAX_DEPTH = 32
#: Most values (scalars, lists, mappings) a spec may hold once aliases are expanded.
MAX_VALUES = 10_000
#: Most digits of an integer (int64 range; ranks and sizes are far smaller).
MAX_INT_DIGITS = 18

_INT_TAG = "tag:yaml.org,2002:int"
_RESOLVER = yaml.resolver.Resolver()


if TYPE_CHECKING:
    _SafeLoader = yaml.SafeLoader
else:  # libyaml's parser when PyYAML was built with it
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):
    """PyYAML's safe loader (libyaml's parser when PyYAML has it: 20 times faster on a large
    hostile file), reading YAML 1.2 exponents without a dot (``2e-3``, ``1E+5``) as numbers, as
    users write learning rates; YAML 1.1 (PyYAML) reads them as text, which a strict spec would
    then refuse."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class Parsed:
    """A parsed spec document.

    Attributes:
        data: the document as plain Python data (``None`` for an empty document).
        lines: YAML path (``rank.qkv``, ``targets.2``) -> 1-based line; empty for JSON.
        problems: duplicate mapping keys (YAML keeps only the last value; JSON is not checked).
    """

    data: object
    lines: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def refuse(source: str, message: str) -> NoReturn:
    """Raise a :class:`SpecError` with one problem about the whole document."""
    raise SpecError([Problem("", message)], source=source)


def read_source(source: object, source_name: str | None = None) -> tuple[Parsed, str]:
    """Read a spec given as a path, YAML/JSON text or a mapping into plain data, within the
    limits; returns it and the name messages use for it.

    A string is a path when it names an existing file or directory, or ends in ``.yaml``,
    ``.yml`` or ``.json``; otherwise it is YAML text.
    """
    if isinstance(source, str) and len(source) > MAX_BYTES:
        refuse(source_name or "<string>", _too_big(len(source), "characters"))
    if isinstance(source, Path) or (isinstance(source, str) and _as_path(source) is not None):
        path = Path(source)
        name = source_name or str(path)
        return read_file(path, name), name
    if isinstance(source, str):
        name = source_name or "<string>"
        return parse_text(source, name), name
    if isinstance(source, Mapping):
        name = source_name or "<dict>"
        check_data(source, name)
        return Parsed(source), name
    name = source_name or "<spec>"
    refuse(
        name, f"cannot load a spec from {type(source).__name__}; give a path, YAML text or a dict"
    )


def read_file(path: Path, source: str) -> Parsed:
    """Read and parse the spec file at ``path`` (``.json``: JSON; anything else: YAML)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        refuse(source, f"file not found: {path}")
    except OSError as exc:
        refuse(source, f"cannot read {path}: {exc.strerror or exc}")
    if stat.S_ISDIR(info.st_mode):
        refuse(source, f"{path} is a directory, not a spec file")
    if not stat.S_ISREG(info.st_mode):
        refuse(source, f"{path} is not a regular file (a pipe or a device?); give a spec file")
    if info.st_size > MAX_BYTES:
        refuse(source, _too_big(info.st_size, "bytes"))
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)  # a file that grew since stat() is cut here
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        refuse(source, f"cannot read {path}: {exc}")
    return parse_text(text, source, path.suffix.lower())


def parse_text(text: str, source: str, suffix: str = "") -> Parsed:
    """Parse spec text: JSON when ``suffix`` is ``.json``, YAML otherwise; every limit checked.

    Raises:
        SpecError: a syntax error (with its line and column) or a limit breached.
    """
    if len(text) > MAX_BYTES:
        refuse(source, _too_big(len(text), "characters"))
    if suffix == ".json":
        parsed = Parsed(_json(text, source))
        check_data(parsed.data, source)
        return parsed
    _check_events(text, source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        refuse(source, _yaml_error(exc))
    except Exception as exc:  # PyYAML's constructors on hostile values: `2001-13-45` is a
        # ValueError, `!!timestamp x` an AttributeError; whatever it is, it is this value's fault
        refuse(source, f"YAML value cannot be read: {describe(exc)}")
    finally:
        loader.dispose()
    check_data(data, source)  # aliases expanded: after this every walk is bounded
    parsed = Parsed(data)
    if node is not None:
        _walk(node, "", parsed)
    return parsed


def check_data(data: object, source: str) -> None:
    """Apply the depth, value-count and integer limits to plain data (shared references and
    cycles included: each use counts, and a cycle is too deep).

    Raises:
        SpecError: naming the limit breached.
    """
    count = 0
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            refuse(
                source,
                f"the spec holds more than {MAX_VALUES:,} values (YAML aliases such as '*a' count "
                "each time they are used); a spec is a few keys",
            )
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and _digits(value) > MAX_INT_DIGITS
        ):
            refuse(source, _too_long_int(_digits(value)))
        if isinstance(value, Mapping | list | tuple):
            if depth > MAX_DEPTH:
                refuse(source, _too_deep())
            children = [*value.keys(), *value.values()] if isinstance(value, Mapping) else value
            stack.extend((child, depth + 1) for child in children)


def line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of ``path``, or of its nearest parent that has one."""
    parts = path.split(".") if path else []
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None


# -- internals -------------------------------------------------------------------------------------
def _as_path(text: str) -> Path | None:
    """``text`` as a path when it names a file or directory, or looks like a spec file name."""
    if "\n" in text or not text.strip():
        return None
    try:
        path = Path(text)
        exists = path.exists()
    except (OSError, ValueError):
        return None
    if exists or text.lower().endswith((".yaml", ".yml", ".json")):
        return path
    return None


def _check_events(text: str, source: str) -> None:
    """Depth, node count and integer literals, on the event stream (nothing composed yet)."""
    depth = nodes = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    refuse(source, f"{_too_deep()}{_at(event)}")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent) and _is_int(event):
                digits = len(event.value.lstrip("+-").replace("_", "").lstrip("0") or "0")
                if digits > MAX_INT_DIGITS:
                    refuse(source, f"{_too_long_int(digits)}{_at(event)}")
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_VALUES:
                    refuse(source, f"the spec holds more than {MAX_VALUES:,} values")
    except SpecError:
        raise
    except yaml.YAMLError as exc:
        refuse(source, _yaml_error(exc))
    except Exception as exc:  # a scanner or parser bug on hostile text: still this text's fault
        refuse(source, f"YAML text cannot be read: {describe(exc)}")


def _at(event: yaml.Event) -> str:
    mark = event.start_mark
    return "" if mark is None else f" (line {mark.line + 1})"


def _is_int(event: yaml.ScalarEvent) -> bool:
    if event.tag not in (None, "!"):
        return bool(event.tag == _INT_TAG)
    if not event.implicit[0]:  # quoted: a string
        return False
    return bool(_RESOLVER.resolve(yaml.ScalarNode, event.value, (True, False)) == _INT_TAG)


def _json(text: str, source: str) -> object:
    def bounded_int(literal: str) -> int:
        digits = len(literal.lstrip("-").lstrip("0") or "0")
        if digits > MAX_INT_DIGITS:
            refuse(source, _too_long_int(digits))
        return int(literal)

    if not text.strip():
        return None
    try:
        return json.loads(text, parse_int=bounded_int)
    except json.JSONDecodeError as exc:
        refuse(source, f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except RecursionError:
        refuse(source, _too_deep())


def _walk(node: yaml.Node, prefix: str, parsed: Parsed) -> None:
    """Record the 1-based line of every path below ``node``; report duplicate mapping keys."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in seen:
                parsed.problems.append(
                    Problem(
                        path,
                        f"key {key!r} is given twice (lines {seen[key]} and {line}); YAML would "
                        "keep only the last",
                    )
                )
            seen[key] = line
            parsed.lines.setdefault(path, line)
            _walk(value_node, path, parsed)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}" if prefix else str(i)
            parsed.lines.setdefault(path, item.start_mark.line + 1)
            _walk(item, path, parsed)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML error, with its 1-based line and column."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = ": ".join(p for p in (exc.context, exc.problem) if p)
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {what}"
    return f"YAML syntax error: {exc}"


def _digits(value: int) -> int:
    """Decimal digits of ``value``, without converting it to text (``str()`` of an integer of
    more than 4,300 digits raises ``ValueError``, which is what this limit prevents)."""
    n = abs(value)
    if n < 10:
        return 1
    estimate = int(n.bit_length() * 0.30103) + 1  # log10(2): too high by at most one
    if estimate > 100_000:  # far past the limit: the estimate will do
        return estimate
    return estimate - 1 if n < 10 ** (estimate - 1) else estimate


def _too_big(size: int, unit: str) -> str:
    return f"the spec is {size:,} {unit}; the limit is {MAX_BYTES:,} (a spec is a few keys)"


def _too_deep() -> str:
    return f"the spec nests deeper than {MAX_DEPTH} levels of mappings and lists"


def _too_long_int(digits: int) -> str:
    return f"an integer of {digits:,} digits is too large (at most {MAX_INT_DIGITS} digits)"
