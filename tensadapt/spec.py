"""The adapter spec: one small YAML file describing one adapter, validated all at once.

A spec names the weight matrices to adapt (``targets``), how their updates are stacked into tensors
(``modes``), how each tensor is parameterised (``factorization``, ``rank``, ``options``) and how the
adapter starts (``init``, ``residual``, ``base``). :func:`load_spec` turns a file, a YAML string or a
dict into a frozen :class:`AdapterSpec`, or raises :class:`~tensadapt.errors.SpecError` carrying
*every* problem found, each with its YAML path (``rank.qkv``, ``targets.2``, ``options.n_cores``)
and, when the spec came from YAML text, its line.

Example::

    factorization: tucker
    targets: [q, k, v]
    modes: [qkv, depth]
    rank: {in: 8, out: 8, qkv: 3, depth: 4}

Checks that need the model's sizes (e.g. an MPO ``in_shape`` whose product must equal the width)
belong to the planner, not to the spec.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .arch.base import PROJECTIONS
from .errors import Problem, SpecError
from .modes import ALIASES as MODE_ALIASES
from .modes import MODES
from .registry import Registry

if TYPE_CHECKING:
    from .factorizations.base import Factorization

#: Storage of the frozen residual (``residual:``) and of the targeted base weights (``base:``).
RESIDUALS: tuple[str, ...] = ("none", "frozen", "nf4")
BASES: tuple[str, ...] = ("fp", "nf4")

# Module names users often write for a projection; used only to suggest the right name.
_PROJECTION_HINTS: Mapping[str, str] = {
    "query": "q",
    "q_proj": "q",
    "key": "k",
    "k_proj": "k",
    "value": "v",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "dense": "o",
    "c_proj": "o",
    "up_proj": "up",
    "gate_proj": "gate",
    "down_proj": "down",
}

# The validation context that makes AdapterSpec skip its cross-field checks (load_spec runs them
# itself so that they are reported together with the per-field problems).
_SKIP_CROSS = "tensadapt.spec.skip_cross"


# -- factorization registry ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _builtin_factorizations() -> Registry[Factorization]:
    """A registry holding one instance of each built-in factorization."""
    from .factorizations import BUILTINS

    reg: Registry[Factorization] = Registry("factorization")
    for cls in BUILTINS:
        reg.register(cls.name, cls())
    return reg


def _factorizations() -> Registry[Any]:
    """The registry of factorizations specs may name.

    :mod:`tensadapt.plugins` owns the real one (built-ins and plugins, filled through the pluggy
    hooks); until it is importable the built-ins are used. ``factorization_registry`` may be a
    :class:`~tensadapt.registry.Registry` or a function returning one.
    """
    try:
        from tensadapt.plugins import factorization_registry  # type: ignore[attr-defined]
    except ImportError:
        return _builtin_factorizations()
    reg: Any = factorization_registry
    return reg if isinstance(reg, Registry) else reg()


def get_factorization(name: str) -> Factorization:
    """The factorization registered as ``name`` (an instance; a registered class is instantiated).

    Raises:
        RegistryError: ``name`` is not registered; the message lists the valid names.
    """
    obj = _factorizations().get(name)
    return obj() if isinstance(obj, type) else obj  # type: ignore[no-any-return]


def axis_names(modes: Iterable[str]) -> tuple[str, ...]:
    """The axis names of one update tensor for these stacking modes (aliases accepted).

    ``("in", "out")`` without ``heads``, ``("in", "head_dim", "heads")`` with it; then ``qkv`` and
    ``depth`` when stacked. These are the names a ``rank:`` mapping is keyed by.
    """
    canon = {MODE_ALIASES.get(m, m) for m in modes}
    names: list[str] = ["in", "head_dim", "heads"] if "heads" in canon else ["in", "out"]
    names += [m for m in ("qkv", "depth") if m in canon]
    return tuple(names)


# -- helpers for messages --------------------------------------------------------------------------


class _Issues(ValueError):
    """A ``ValueError`` carrying several problems, each at a path relative to the failing field."""

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self.items = tuple(items)
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in self.items))


def _show(value: Any, limit: int = 60) -> str:
    """A short YAML-flavoured rendering of a user value for messages."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(word: object, valid: Iterable[str], hints: Mapping[str, str] | None = None) -> str:
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


def _as_list(value: Any, what: str) -> list[Any]:
    """``value`` as a list, or a ``ValueError`` saying a list of ``what`` was expected."""
    if isinstance(value, (list, tuple)):
        return list(value)
    example = f" (write [{value}])" if isinstance(value, str) else ""
    raise ValueError(f"must be a list of {what}, got {_show(value)}{example}")


def _plain(value: Any, path: str = "") -> Any:
    """``value`` as plain YAML/JSON data (dicts with str keys, lists, scalars); tuples become lists."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Issues([(path, f"keys must be strings, got {_show(k)}")])
            out[k] = _plain(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    raise _Issues(
        [(path, f"must be plain data (numbers, strings, lists, mappings), got {value!r}")]
    )


def _reject_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {_show(value)}")
    return value


# -- the model -------------------------------------------------------------------------------------


class AdapterSpec(BaseModel):
    """One adapter, as written in a spec file. Frozen; build it with :func:`load_spec`.

    Every field's description is user help: it appears in the JSON Schema and in ``--help``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", title="tensadapt adapter spec")

    name: str | None = Field(
        None,
        description="Optional label for this adapter in tables and logs, e.g. 'tenslora-qkv-depth'.",
    )
    targets: tuple[str, ...] = Field(
        ("q", "k", "v"),
        description=(
            "Projections to adapt in every selected layer: q, k, v, o (attention) and up, gate, "
            "down (MLP). Order does not matter; it is stored in that canonical order. "
            "Example: [q, k, v, o]."
        ),
    )
    modes: tuple[str, ...] = Field(
        (),
        description=(
            "Stacking modes: which updates share one tensor. 'heads' (alias 'att', 'attention') "
            "splits the head-structured side into head_dim x heads; 'qkv' stacks the targeted "
            "projections; 'depth' (alias 'layers') stacks the layers. A mode not listed gives "
            "separate tensors along it. [] is per-matrix (LoRA); [heads, qkv, depth] is one tensor "
            "for the whole model (LoRTA)."
        ),
    )
    factorization: str = Field(
        "lora",
        description=(
            "How each update tensor is parameterised: lora (matrix B·A), cp (LoRTA), tucker "
            "(TensLoRA), tt (tensor train), mpo (DoTA), or a name added by a plugin "
            "(`tensadapt plugins` lists them)."
        ),
    )
    rank: PositiveInt | dict[str, PositiveInt] = Field(
        8,
        description=(
            "Rank: one integer >= 1 for every bond, or (tucker, tt, ...) a mapping from axis name "
            "to rank, e.g. {in: 8, out: 8, qkv: 3, depth: 4}. Axis names are in and out (or in, "
            "head_dim, heads with the heads mode), then qkv and depth when stacked; 'default' "
            "covers the axes not named."
        ),
    )
    alpha: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Scale of the update: it is multiplied by alpha / rank (rank = the integer, or the "
            "largest rank in the mapping). null (default) means a scale of 1."
        ),
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="Dropout probability on the adapter's input, in [0, 1). 0 disables it.",
    )
    init: str = Field(
        "zeros",
        description=(
            "Initialiser. 'zeros' starts from a zero update, so the model is unchanged at step 0. "
            "Others start from the pretrained weights (svd for lora/cp/tucker/tt, mpo for mpo) and "
            "need a residual. Which ones a factorization supports: `tensadapt plugins`."
        ),
    )
    residual: Literal["none", "frozen", "nf4"] = Field(
        "none",
        description=(
            "With a pretrained init, the initial reconstruction is subtracted from the weight into "
            "a frozen residual W0 - init so the model is unchanged at step 0 (DoTA). 'frozen' keeps "
            "it in the model's dtype; 'nf4' stores it as 4-bit NormalFloat (QDoTA). 'none' "
            "(default) goes with init: zeros."
        ),
    )
    base: Literal["fp", "nf4"] = Field(
        "fp",
        description=(
            "Storage of the frozen base weights of the targeted matrices: 'fp' (unchanged) or "
            "'nf4' (QLoRA-style 4-bit NormalFloat). Not combined with a residual, which already "
            "replaces those weights (use residual: nf4 instead)."
        ),
    )
    layers: Literal["all"] | tuple[NonNegativeInt, ...] = Field(
        "all",
        description="Layers to adapt: 'all' (default) or a list of 0-based indices, e.g. [0, 1, 2].",
    )
    modules_to_save: tuple[str, ...] = Field(
        (),
        description=(
            "Modules trained in full and saved with the adapter, e.g. [classifier] for a new "
            "classification head."
        ),
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Options of the chosen factorization, e.g. for mpo {n_cores: 5, in_shape: [4, 4, 4, "
            "4, 3]}. Unknown options are errors."
        ),
    )

    # -- per-field validators (each independent of the others) -------------------------------

    @field_validator("targets", mode="before")
    @classmethod
    def _check_targets(cls, value: Any) -> tuple[str, ...]:
        items = _as_list(value, "projection names, e.g. [q, k, v]")
        issues: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        for i, t in enumerate(items):
            if not isinstance(t, str):
                issues.append((str(i), f"must be a projection name, got {_show(t)}"))
            elif t not in PROJECTIONS:
                hint = _suggest(t, PROJECTIONS, _PROJECTION_HINTS)
                issues.append(
                    (str(i), f"unknown projection {t!r}{hint}; valid: {', '.join(PROJECTIONS)}")
                )
            elif t in seen:
                issues.append((str(i), f"{t!r} is listed twice (also at index {seen[t]})"))
            else:
                seen[t] = i
        if not items:
            issues.append(("", "must name at least one projection, e.g. [q, k, v]"))
        if issues:
            raise _Issues(issues)
        return tuple(p for p in PROJECTIONS if p in seen)

    @field_validator("modes", mode="before")
    @classmethod
    def _check_modes(cls, value: Any) -> tuple[str, ...]:
        items = _as_list(value, "stacking modes, e.g. [qkv, depth]")
        issues: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        spellings = [*MODES, *MODE_ALIASES]
        for i, m in enumerate(items):
            if not isinstance(m, str):
                issues.append((str(i), f"must be a mode name, got {_show(m)}"))
                continue
            canon = MODE_ALIASES.get(m, m)
            if canon not in MODES:
                issues.append(
                    (
                        str(i),
                        f"unknown mode {m!r}{_suggest(m, spellings)}; valid: heads (alias att, "
                        "attention), qkv, depth (alias layers)",
                    )
                )
            elif canon in seen:
                j = seen[canon]
                first = items[j]
                alias = " (aliases name the same mode)" if first != m else ""
                issues.append(
                    (
                        str(i),
                        f"{m!r} is mode {canon!r}, already listed as {first!r} at index {j}{alias}",
                    )
                )
            else:
                seen[canon] = i
        if issues:
            raise _Issues(issues)
        return tuple(m for m in MODES if m in seen)

    @field_validator("factorization")
    @classmethod
    def _check_factorization(cls, value: str) -> str:
        reg = _factorizations()
        if value not in reg:
            names = reg.names()
            raise ValueError(
                f"unknown factorization {value!r}{_suggest(value, names)}; "
                f"valid names: {', '.join(names)}"
            )
        return value

    @field_validator("rank", mode="before")
    @classmethod
    def _check_rank(cls, value: Any) -> int | dict[str, int]:
        if isinstance(value, bool) or not isinstance(value, (int, Mapping)):
            raise ValueError(
                "must be an integer >= 1 (e.g. 8) or a mapping from axis name to rank "
                f"(e.g. {{in: 8, qkv: 3, default: 4}}), got {_show(value)}"
            )
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"must be >= 1, got {value}")
            return value
        issues: list[tuple[str, str]] = []
        for key, r in value.items():
            if not isinstance(key, str):
                issues.append(("", f"keys must be axis names or 'default', got {_show(key)}"))
            elif isinstance(r, bool) or not isinstance(r, int):
                issues.append((key, f"must be an integer >= 1, got {_show(r)}"))
            elif r < 1:
                issues.append((key, f"must be >= 1, got {r}"))
        if not value:
            issues.append(("", "an empty mapping gives no rank; write an integer or name the axes"))
        if issues:
            raise _Issues(issues)
        return dict(value)

    @field_validator("alpha", "dropout", mode="before")
    @classmethod
    def _check_number(cls, value: Any) -> Any:
        return _reject_bool(value)

    @field_validator("layers", mode="before")
    @classmethod
    def _check_layers(cls, value: Any) -> str | tuple[int, ...]:
        if isinstance(value, str):
            if value == "all":
                return value
            raise ValueError(
                f"must be 'all' or a list of layer indices (e.g. [0, 1, 2]), got {value!r}"
            )
        items = _as_list(value, "layer indices, e.g. [0, 1, 2], or 'all'")
        issues: list[tuple[str, str]] = []
        seen: dict[int, int] = {}
        for i, x in enumerate(items):
            if isinstance(x, bool) or not isinstance(x, int):
                issues.append((str(i), f"must be a layer index (integer >= 0), got {_show(x)}"))
            elif x < 0:
                issues.append((str(i), f"layer index must be >= 0, got {x}"))
            elif x in seen:
                issues.append((str(i), f"layer {x} is listed twice (also at index {seen[x]})"))
            else:
                seen[x] = i
        if not items:
            issues.append(("", "an empty list adapts no layer; write 'all' or list indices"))
        if issues:
            raise _Issues(issues)
        return tuple(sorted(seen))

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _check_modules(cls, value: Any) -> tuple[str, ...]:
        items = _as_list(value, "module names, e.g. [classifier]")
        issues: list[tuple[str, str]] = []
        for i, m in enumerate(items):
            if not isinstance(m, str) or not m:
                issues.append((str(i), f"must be a module name, got {_show(m)}"))
            elif m in items[:i]:
                issues.append((str(i), f"{m!r} is listed twice"))
        if issues:
            raise _Issues(issues)
        return tuple(items)

    @field_validator("options", mode="before")
    @classmethod
    def _check_options(cls, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError(f"must be a mapping of option names to values, got {_show(value)}")
        plain: dict[str, Any] = _plain(value)
        return plain

    # -- cross-field checks -------------------------------------------------------------------

    @model_validator(mode="after")
    def _check_together(self, info: ValidationInfo) -> AdapterSpec:
        if info.context and info.context.get(_SKIP_CROSS):
            return self
        problems = _cross_problems(self, skip=set())
        if problems:
            raise _Issues([(p.path, p.message) for p in problems])
        return self

    # -- derived ------------------------------------------------------------------------------

    @property
    def scaling(self) -> float:
        """Factor the update is multiplied by: ``alpha / rank`` (largest rank of a mapping), or 1."""
        if self.alpha is None:
            return 1.0
        r = self.rank if isinstance(self.rank, int) else max(self.rank.values())
        return self.alpha / r

    def get_factorization(self) -> Factorization:
        """The factorization this spec names (from the registry)."""
        return get_factorization(self.factorization)

    def parsed_options(self) -> BaseModel:
        """``options`` validated by the factorization's ``options_model`` (defaults filled in)."""
        return self.get_factorization().parse_options(self.options)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (every field, defaults included; lists, not tuples)."""
        return self.model_dump(mode="json")

    def __hash__(self) -> int:  # the dict fields (rank, options) are not hashable themselves
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _cross_problems(spec: AdapterSpec, skip: set[str]) -> list[Problem]:
    """Problems that involve several fields; checks touching a field in ``skip`` are left out.

    ``skip`` holds the fields that failed their own validation (``spec`` then carries defaults
    for them), so that one mistake is not reported twice under another name.
    """
    out: list[Problem] = []
    ok = lambda *fields: not skip.intersection(fields)  # noqa: E731

    fact = get_factorization(spec.factorization) if ok("factorization") else None

    # init and residual
    if fact is not None and ok("init") and spec.init not in fact.inits:
        out.append(
            Problem(
                "init",
                f"init {spec.init!r} is not supported by factorization {spec.factorization!r}; "
                f"it supports: {', '.join(fact.inits)}",
            )
        )
    if ok("init", "residual"):
        if spec.init != "zeros" and spec.residual == "none":
            out.append(
                Problem(
                    "init",
                    f"init {spec.init!r} starts from the pretrained weights, which changes the "
                    "model unless that reconstruction is subtracted into a frozen residual; "
                    "add residual: frozen (or nf4), or use init: zeros",
                )
            )
        if spec.residual != "none" and spec.init == "zeros":
            out.append(
                Problem(
                    "residual",
                    f"residual {spec.residual!r} holds W0 minus a pretrained initialisation, but "
                    "init is 'zeros' (nothing to subtract); choose a pretrained init such as svd "
                    "or mpo, or residual: none",
                )
            )
    if ok("base", "residual") and spec.base == "nf4" and spec.residual != "none":
        out.append(
            Problem(
                "base",
                f"base: nf4 quantises the frozen base weights, but residual {spec.residual!r} "
                "already replaces them; for a 4-bit residual use residual: nf4 with base: fp",
            )
        )

    # rank mapping keys
    if fact is not None and ok("rank", "modes") and isinstance(spec.rank, dict):
        axes = axis_names(spec.modes)
        keys = tuple(fact.rank_keys(axes))
        modes = f"[{', '.join(spec.modes)}]"
        if not keys:
            out.append(
                Problem(
                    "rank",
                    f"factorization {spec.factorization!r} takes a single integer rank "
                    f"(e.g. rank: {max(spec.rank.values())}), not a mapping",
                )
            )
        else:
            valid = [*keys, "default"]
            for key in spec.rank:
                if key not in valid:
                    alias = MODE_ALIASES.get(key)
                    hint = (
                        f" (did you mean {alias!r}? rank keys use canonical axis names)"
                        if alias in valid
                        else _suggest(key, valid)
                    )
                    out.append(
                        Problem(
                            f"rank.{key}",
                            f"{key!r} is not a rank key of {spec.factorization!r} with modes "
                            f"{modes}{hint}; valid keys: {', '.join(valid)}",
                        )
                    )
            missing = [k for k in keys if k not in spec.rank]
            if missing and "default" not in spec.rank:
                out.append(
                    Problem(
                        "rank",
                        f"no rank for {', '.join(map(repr, missing))} and no 'default'; "
                        f"{spec.factorization!r} with modes {modes} needs a rank for each of "
                        f"{', '.join(keys)} (or a 'default')",
                    )
                )

    # factorization options
    if fact is not None and ok("options"):
        try:
            fact.parse_options(spec.options)
        except ValidationError as err:
            out.extend(
                _convert(
                    err, prefix=("options",), model=fact.options_model, owner=spec.factorization
                )
            )
    return out


# -- converting pydantic errors --------------------------------------------------------------------

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
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "set_type": "must be a list",
    "none_required": "must be null",
}


def _message(err: Mapping[str, Any]) -> str:
    """A readable message for one pydantic error (without its location)."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = _show(err.get("input"))
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "is required"
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        key, op = bounds[kind]
        return f"must be {op} {ctx[key]}, got {got}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {got}"
    if kind in ("too_short", "too_long"):
        return f"{err['msg'][0].lower()}{err['msg'][1:]}"
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]}, got {got}"
    msg = str(err.get("msg", kind))
    return f"{msg[:1].lower()}{msg[1:]}, got {got}"


def _dotted(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _convert(
    err: ValidationError,
    prefix: tuple[str, ...] = (),
    model: type[BaseModel] | None = None,
    owner: str | None = None,
) -> list[Problem]:
    """Problems for a pydantic ``ValidationError``, paths dotted and prefixed with ``prefix``.

    Args:
        err: the error.
        prefix: location of the validated object in the spec (``("options",)`` for options).
        model: the model validated, to suggest keys for unknown ones.
        owner: the factorization owning ``model`` (for "takes no options").
    """
    out: list[Problem] = []
    for e in err.errors(include_url=False):
        loc = (*prefix, *e["loc"])
        ctx = e.get("ctx") or {}
        issues = ctx.get("error")
        if e["type"] == "value_error" and isinstance(issues, _Issues):
            for sub, msg in issues.items:
                out.append(Problem(_dotted((*loc, sub) if sub else loc), msg))
            continue
        if e["type"] == "extra_forbidden":
            key = e["loc"][-1]
            fields = list(model.model_fields) if model is not None and len(e["loc"]) == 1 else []
            if model is not None and len(e["loc"]) == 1 and not fields:
                what = f"factorization {owner!r} takes no options" if owner else "no keys allowed"
                out.append(Problem(_dotted(loc), f"unknown key {key!r}: {what}"))
                continue
            hint = _suggest(key, fields)
            tail = hint or (f"; valid keys: {', '.join(fields)}" if fields else "")
            out.append(Problem(_dotted(loc), f"unknown key {key!r}{tail}"))
            continue
        out.append(Problem(_dotted(loc), _message(e)))
    return out


# -- loading ---------------------------------------------------------------------------------------


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML syntax error, with its 1-based line and column."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = ": ".join(p for p in (exc.context, exc.problem) if p)
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {what}"
    return f"YAML syntax error: {exc}"


def _walk_nodes(
    node: yaml.Node, prefix: str, lines: dict[str, int], problems: list[Problem]
) -> None:
    """Record the 1-based line of every path below ``node``; report duplicate mapping keys."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                problems.append(
                    Problem(
                        path,
                        f"key {key_node.value!r} is given twice (lines {seen[key_node.value]} "
                        f"and {line}); YAML would keep only the last",
                    )
                )
            seen[key_node.value] = line
            lines.setdefault(path, line)
            _walk_nodes(value_node, path, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}" if prefix else str(i)
            lines.setdefault(path, item.start_mark.line + 1)
            _walk_nodes(item, path, lines, problems)


def _parse_text(
    text: str, source: str, suffix: str = ""
) -> tuple[Any, dict[str, int], list[Problem]]:
    """Parse YAML (or JSON, for ``.json`` files).

    Returns:
        the data, a path -> 1-based line index, and the duplicate-key problems (YAML keeps only
        the last value of a repeated key; JSON files are not checked for them).
    """
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    if suffix == ".json":
        try:
            return (json.loads(text) if text.strip() else None), lines, problems
        except json.JSONDecodeError as exc:
            msg = f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            raise SpecError([Problem("", msg)], source=source) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([Problem("", _yaml_error(exc))], source=source) from None
    if node is not None:
        _walk_nodes(node, "", lines, problems)
    return data, lines, problems


def _read(path: Path, source: str) -> tuple[Any, dict[str, int], list[Problem]]:
    if path.is_dir():
        raise SpecError([Problem("", f"{path} is a directory, not a spec file")], source=source)
    if not path.is_file():
        raise SpecError([Problem("", f"file not found: {path}")], source=source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem("", f"cannot read {path}: {exc}")], source=source) from None
    return _parse_text(text, source, path.suffix.lower())


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


def load_spec(
    source: str | Path | Mapping[str, Any] | AdapterSpec, *, source_name: str | None = None
) -> AdapterSpec:
    """Load and validate a spec, reporting every problem at once.

    Args:
        source: a path (``str`` or :class:`~pathlib.Path`) to a ``.yaml``/``.yml``/``.json`` file,
            a YAML string, a mapping, or an :class:`AdapterSpec` (returned as is). A string that
            names an existing file, or ends in ``.yaml``/``.yml``/``.json``, is a path.
        source_name: the name used for ``source`` in error messages (default: the file path,
            ``<string>`` or ``<dict>``).
    Returns:
        the validated, frozen spec (modes canonical, targets in canonical order).
    Raises:
        SpecError: with every problem found, each with its path (``rank.qkv``) and, for YAML
            text, its line.
    """
    if isinstance(source, AdapterSpec):
        return source
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    if isinstance(source, Path) or (isinstance(source, str) and _as_path(source) is not None):
        path = Path(source)
        name = source_name or str(path)
        data, lines, problems = _read(path, name)
    elif isinstance(source, str):
        name = source_name or "<string>"
        data, lines, problems = _parse_text(source, name)
    elif isinstance(source, Mapping):
        name = source_name or "<dict>"
        data = source
    else:
        msg = f"cannot load a spec from {type(source).__name__}; give a path, YAML text or a dict"
        raise SpecError([Problem("", msg)], source=source_name or "<spec>")

    if data is None:
        msg = "empty spec: write at least '{}' for all defaults, or keys such as 'rank: 8'"
        raise SpecError([Problem("", msg)], source=name)
    if not isinstance(data, Mapping):
        kind = "a list" if isinstance(data, list) else f"{type(data).__name__} {_show(data)}"
        msg = f"a spec must be a mapping of keys (targets, rank, ...), got {kind}"
        raise SpecError([Problem("", msg)], source=name)

    found, spec = _validate(data)
    problems += found
    if problems or spec is None:
        fields = list(AdapterSpec.model_fields)

        def order(item: tuple[int, Problem]) -> tuple[int, int, int]:
            i, p = item
            head = p.path.split(".")[0]
            line = _line_of(p.path, lines)
            field = fields.index(head) if head in fields else len(fields)
            return (line if line is not None else 1 << 30, field, i)

        ranked = sorted(enumerate(problems), key=order)
        raise SpecError([_with_line(p, lines) for _, p in ranked], source=name)
    return spec


def _validate(data: Mapping[Any, Any]) -> tuple[list[Problem], AdapterSpec | None]:
    """Validate a mapping: per-field problems, then every cross-field check that can still run."""
    problems: list[Problem] = []
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(key, str):
            clean[key] = value
        else:
            problems.append(Problem(_show(key), f"keys must be strings, got {_show(key)}"))
    context = {_SKIP_CROSS: True}
    bad: set[str] = set()
    try:
        spec = AdapterSpec.model_validate(clean, context=context)
    except ValidationError as err:
        problems.extend(_convert(err, model=AdapterSpec))
        bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
        kept = {k: v for k, v in clean.items() if k in AdapterSpec.model_fields and k not in bad}
        try:
            partial = AdapterSpec.model_validate(kept, context=context)
        except ValidationError:  # pragma: no cover - fields are validated independently
            return problems, None
        problems.extend(_cross_problems(partial, skip=bad))
        return problems, None
    problems.extend(_cross_problems(spec, skip=bad))
    return problems, (None if problems else spec)


def _line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of ``path``, or of its nearest parent that has one."""
    parts = path.split(".") if path else []
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None


def _with_line(problem: Problem, lines: Mapping[str, int]) -> Problem:
    """``problem`` with ``(line N)`` appended when its path (or a parent) has a known line."""
    line = _line_of(problem.path, lines)
    if line is None or "(lines " in problem.message:
        return problem
    return Problem(problem.path, f"{problem.message} (line {line})")


def validate_files(paths: Iterable[str | Path]) -> dict[str, list[Problem]]:
    """Validate spec files (as ``tensadapt validate`` does).

    Args:
        paths: spec files; each is read as a file, never as YAML text.
    Returns:
        each path (as given, as ``str``) -> its problems; an empty list when the spec is valid.
    """
    out: dict[str, list[Problem]] = {}
    for p in paths:
        try:
            load_spec(Path(p), source_name=str(p))
        except SpecError as err:
            out[str(p)] = list(err.problems)
        else:
            out[str(p)] = []
    return out


# -- writing ---------------------------------------------------------------------------------------


def spec_to_yaml(spec: AdapterSpec) -> str:
    """The resolved spec as YAML: every field with defaults filled in, modes canonical.

    ``load_spec(spec_to_yaml(s)) == s`` for every valid spec ``s``.
    """
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file (for editors and docs), with the registered names as enums.

    The factorization enum lists what is registered *now* (built-ins and installed plugins).
    """
    schema = AdapterSpec.model_json_schema()
    schema["title"] = "tensadapt adapter spec"
    props = schema["properties"]
    reg = _factorizations()
    names = reg.names()
    props["factorization"]["enum"] = names
    props["targets"]["items"] = {"type": "string", "enum": list(PROJECTIONS)}
    props["modes"]["items"] = {"type": "string", "enum": [*MODES, *MODE_ALIASES]}
    facts = [get_factorization(n) for n in names]
    props["init"]["examples"] = list(dict.fromkeys(i for f in facts for i in f.inits))
    props["init"]["description"] += (
        " Supported: "
        + "; ".join(f"{n}: {', '.join(f.inits)}" for n, f in zip(names, facts, strict=True))
        + "."
    )
    per_format = [
        f"{n}: "
        + "; ".join(f"{k} ({v.description})" if v.description else k for k, v in fields.items())
        for n, f in zip(names, facts, strict=True)
        if (fields := f.options_model.model_fields)
    ]
    if per_format:
        props["options"]["description"] += (
            " Options by factorization: " + " | ".join(per_format) + "."
        )
    return schema


__all__ = [
    "BASES",
    "MODES",
    "MODE_ALIASES",
    "RESIDUALS",
    "AdapterSpec",
    "axis_names",
    "get_factorization",
    "json_schema",
    "load_spec",
    "spec_to_yaml",
    "validate_files",
]
