"""The one renderer of pydantic's structured errors into tensadapt's spec messages.

Every problem in a spec reaches the user as a :class:`~tensadapt.errors.Problem`: a dotted YAML
path (``rank.qkv``, ``targets.2``, ``training.lr``) and one sentence saying what is wrong and, where
it can, what was meant (``unknown key 'rnak' (did you mean 'rank'?)``). pydantic finds the problems
(types, bounds, literals, unknown keys) and tensadapt's validators add their own as pydantic errors
of the types :data:`FIELD` and :data:`CROSS` (:func:`problems_error`); :func:`render_errors` words
them all.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import get_args

from pydantic import BaseModel, Tag, ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from .errors import Problem

#: The pydantic error types of tensadapt's own problems, by a field's validator (``FIELD``) or by
#: the checks that involve several fields (``CROSS``); their message is final.
FIELD, CROSS = "spec", "spec_cross"


def show(value: object, limit: int = 60) -> str:
    """A short YAML-flavoured rendering of a user value for messages."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: object, valid: Iterable[str], hints: Mapping[str, str] | None = None) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid name, or ``""``."""
    if not isinstance(word, str):
        return ""
    valid = list(valid)
    if hints and word in hints and hints[word] in valid:
        return f" (did you mean {hints[word]!r}?)"
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    if not close:
        close = [v for v in valid if v.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def problems_error(problems: Sequence[Problem], kind: str = FIELD) -> ValidationError:
    """Several problems (paths relative to where it is raised) as one pydantic error, so that a
    validator reports each at its own path (pydantic prefixes the field)."""
    return ValidationError.from_exception_data(
        "AdapterSpec",
        [
            InitErrorDetails(
                type=PydanticCustomError(kind, "{message}", {"message": p.message}),
                loc=tuple(p.path.split(".")) if p.path else (),
                input=None,
            )
            for p in problems
        ],
    )


_TYPE_MESSAGES: Mapping[str, str] = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "set_type": "must be a list",
    "none_required": "must be null",
}
_BOUNDS: Mapping[str, tuple[str, str]] = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def render_errors(
    err: ValidationError,
    model: type[BaseModel],
    prefix: tuple[str, ...] = (),
    owner: str | None = None,
) -> list[Problem]:
    """pydantic's structured errors as :class:`~tensadapt.errors.Problem` s: a dotted YAML path
    and a message (bounds, types, literals, unknown keys with a did-you-mean, tensadapt's own).

    Args:
        err: the error.
        model: the model that was validated: where unknown keys get their suggestions, and
            whose discriminated unions' tags are dropped from the paths (``rank.integer`` is
            ``rank``).
        prefix: where that model sits in the spec (``("options",)`` for a factorization's
            options).
        owner: the factorization owning ``model`` (for "takes no options").
    """
    out = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        if len(loc) > 1 and loc[1] in _union_tags(model, loc[0]):
            del loc[1]
        if loc and loc[-1] == "[key]":  # a mapping key of the wrong type: at the mapping
            loc, message = loc[:-2], f"keys must be strings, got {show(e['input'])}"
        else:
            message = _message(e, model, loc, owner)
        out.append(Problem(".".join(str(p) for p in (*prefix, *loc)), message))
    return out


def _message(
    e: ErrorDetails, model: type[BaseModel], loc: Sequence[object], owner: str | None
) -> str:
    """The message of one pydantic error (without its location)."""
    kind = e["type"]
    ctx = e.get("ctx") or {}
    got = show(e.get("input"))
    if kind in (FIELD, CROSS):
        return e["msg"]
    if kind == "value_error":
        return str(ctx.get("error", e["msg"]))
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return _unknown_key(str(loc[-1]), _model_at(model, loc[:-1]), owner)
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {ctx[key]}, got {got}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {got}"
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]}, got {got}"
    msg = e["msg"]
    return f"{msg[:1].lower()}{msg[1:]}" + (
        "" if kind in ("too_short", "too_long") else f", got {got}"
    )


def _unknown_key(key: str, model: type[BaseModel] | None, owner: str | None) -> str:
    fields = list(model.model_fields) if model is not None else []
    if model is not None and not fields:
        what = f"factorization {owner!r} takes no options" if owner else "no keys allowed"
        return f"unknown key {key!r}: {what}"
    hint = suggest(key, fields)
    return f"unknown key {key!r}" + (
        hint or (f"; valid keys: {', '.join(fields)}" if fields else "")
    )


def _model_at(model: type[BaseModel], loc: Sequence[object]) -> type[BaseModel] | None:
    """The model validated at ``loc`` below ``model`` (``training`` -> :class:`TrainingSpec`)."""
    found: type[BaseModel] | None = model
    for part in loc:
        field = found.model_fields.get(str(part)) if found is not None else None
        found = _model_in(field.annotation) if field is not None else None
    return found


def _union_tags(model: type[BaseModel], name: object) -> set[str]:
    """The tags of field ``name``'s discriminated union (pydantic puts one after the field in an
    error's location)."""
    field = model.model_fields.get(str(name))
    if field is None:
        return set()
    members = get_args(field.annotation)
    return {
        m.tag for arg in members for m in getattr(arg, "__metadata__", ()) if isinstance(m, Tag)
    }


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)
