"""The checks of a spec's values that pydantic's types do not express: lists of names (known,
listed once, with a did-you-mean), plain data for ``options:``, and the checks that involve several
fields (run by :class:`~tensadapt.spec.AdapterSpec`'s one model validator).

Every check returns or raises :class:`~tensadapt.errors.Problem` s at their YAML path (relative to
the field being validated); :mod:`tensadapt.spec_errors` words and raises them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import JsonValue, ValidationError

from .arch.base import ATTENTION_PROJECTIONS, PROJECTIONS
from .errors import PluginError, Problem
from .modes import ALIASES as MODE_ALIASES
from .modes import MODES, canonical, tensor_axes
from .plugins import factorization_registry, initializer_registry
from .spec_errors import problems_error, render_errors, show, suggest

if TYPE_CHECKING:
    from .factorizations.base import Factorization
    from .registry import Initializer, Registry
    from .spec import AdapterSpec

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


def axis_names(modes: Iterable[str]) -> tuple[str, ...]:
    """The axis names of one attention tensor for these stacking modes (aliases accepted):
    ``in, out`` or ``in, head_dim, heads``, then ``qkv`` and ``depth`` when stacked
    (:func:`tensadapt.modes.tensor_axes`). These are the names a ``rank:`` mapping is keyed by."""
    canon = [canonical(m) for m in modes]
    return tuple(a.name for a in tensor_axes(canon, 1, 1, int("heads" in canon), 1, 1))


def as_list(value: object, what: str) -> list[object]:
    """``value`` as a list, or a ``ValueError`` saying a list of ``what`` was expected."""
    if isinstance(value, list | tuple):
        return list(value)
    example = f" (write [{value}])" if isinstance(value, str) else ""
    raise ValueError(f"must be a list of {what}, got {show(value)}{example}")


def plain(value: object, path: str = "") -> JsonValue:
    """``value`` as plain YAML/JSON data (dicts with str keys, lists, scalars); tuples become lists."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise problems_error([Problem(path, f"keys must be strings, got {show(k)}")])
            out[k] = plain(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(value, list | tuple):
        return [plain(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    raise problems_error(
        [Problem(path, f"must be plain data (numbers, strings, lists, mappings), got {value!r}")]
    )


def _names(
    value: object,
    noun: str,
    example: str,
    valid: Sequence[str],
    unknown: Callable[[str], str],
    twice: Callable[[str, str, int], str],
    spellings: Mapping[str, str] | None = None,
) -> list[str]:
    """Check a list of names: each a string, known, listed once (``spellings`` maps aliases to
    their name). Returns the names, canonical, in the order given; raises every problem at its
    index. ``unknown(item)`` and ``twice(item, first, index)`` word the two mistakes."""
    items = as_list(value, f"{noun}s, e.g. {example}")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, str):
            problems.append(Problem(str(i), f"must be a {noun}, got {show(item)}"))
            continue
        name = (spellings or {}).get(item, item)
        if name not in valid:
            problems.append(Problem(str(i), unknown(item)))
        elif name in seen:
            j = seen[name]
            problems.append(Problem(str(i), twice(item, str(items[j]), j)))
        else:
            seen[name] = i
    if problems:
        raise problems_error(problems)
    return list(seen)


def targets(value: object) -> tuple[str, ...]:
    """``targets:`` as projection names in canonical order (each known, listed once)."""
    if isinstance(value, list | tuple) and not value:
        raise ValueError("must name at least one projection, e.g. [q, k, v]")
    seen = _names(
        value,
        "projection name",
        "[q, k, v]",
        PROJECTIONS,
        unknown=lambda t: (
            f"unknown projection {t!r}"
            f"{suggest(t, PROJECTIONS, _PROJECTION_HINTS)}; valid: {', '.join(PROJECTIONS)}"
        ),
        twice=lambda t, _, j: f"{t!r} is listed twice (also at index {j})",
    )
    return tuple(p for p in PROJECTIONS if p in seen)


def modes(value: object) -> tuple[str, ...]:
    """``modes:`` as canonical mode names in canonical order (aliases resolved, each once)."""
    spellings = [*MODES, *MODE_ALIASES]
    seen = _names(
        value,
        "mode name",
        "[qkv, depth]",
        MODES,
        unknown=lambda m: (
            f"unknown mode {m!r}{suggest(m, spellings)}; valid: heads (alias "
            "att, attention), qkv, depth (alias layers)"
        ),
        twice=lambda m, first, j: (
            f"{m!r} is mode {canonical(m)!r}, already listed as "
            f"{first!r} at index {j}" + (" (aliases name the same mode)" if first != m else "")
        ),
        spellings=MODE_ALIASES,
    )
    return tuple(m for m in MODES if m in seen)


def registered(registry: Registry[Factorization] | Registry[Initializer], name: str) -> str:
    """``name`` when ``registry`` has it (plugins are loaded if it is no built-in)."""
    if name not in registry:
        names = registry.names()
        raise ValueError(
            f"unknown {registry.kind} {name!r}{suggest(name, names)}; "
            f"valid names: {', '.join(names)}"
        )
    return name


def layers(value: object) -> object:
    """``layers:``: ``'all'`` or distinct integers, in the order given (their range is the
    field type's to check, so that an error keeps the index the user wrote)."""
    if isinstance(value, str):
        if value == "all":
            return value
        raise ValueError(
            f"must be 'all' or a list of layer indices (e.g. [0, 1, 2]), got {value!r}"
        )
    items = as_list(value, "layer indices, e.g. [0, 1, 2], or 'all'")
    problems: list[Problem] = []
    seen: dict[int, int] = {}
    for i, x in enumerate(items):
        if isinstance(x, bool) or not isinstance(x, int):
            problems.append(Problem(str(i), f"must be a layer index (integer >= 0), got {show(x)}"))
        elif x in seen:
            problems.append(Problem(str(i), f"layer {x} is listed twice (also at index {seen[x]})"))
        else:
            seen[x] = i
    if not items:
        problems.append(Problem("", "an empty list adapts no layer; write 'all' or list indices"))
    if problems:
        raise problems_error(problems)
    return tuple(items)


def module_names(value: object) -> tuple[str, ...]:
    """``modules_to_save:``: non-empty names, each once."""
    items = as_list(value, "module names, e.g. [classifier]")
    problems = [
        Problem(str(i), f"must be a module name, got {show(m)}")
        if not isinstance(m, str) or not m
        else Problem(str(i), f"{m!r} is listed twice")
        for i, m in enumerate(items)
        if not isinstance(m, str) or not m or m in items[:i]
    ]
    if problems:
        raise problems_error(problems)
    return tuple(str(m) for m in items)


def options(value: object) -> JsonValue:
    """``options:`` as plain data (``null`` is ``{}``); what they mean is the factorization's."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of option names to values, got {show(value)}")
    return plain(value)


def cross_problems(spec: AdapterSpec, skip: set[str]) -> list[Problem]:
    """Problems that involve several fields; checks touching a field in ``skip`` are left out.

    ``skip`` holds the fields that failed their own validation (``spec`` then carries defaults
    for them), so that one mistake is not reported twice under another name.
    """
    ok = lambda *fields: not skip.intersection(fields)  # noqa: E731
    out: list[Problem] = []
    ini = initializer_registry().get(spec.init) if ok("init") else None
    if ok("factorization"):
        try:
            fact = factorization_registry().get(spec.factorization)
            if ini is not None and not ini.supports(spec.factorization):
                supported = [e.name for e in initializer_registry() if e.obj.supports(fact.name)]
                out.append(
                    Problem(
                        "init",
                        f"init {spec.init!r} is not supported by factorization "
                        f"{spec.factorization!r}; it supports: {', '.join(supported)}",
                    )
                )
            if ok("rank", "modes"):
                out += _rank_problems(spec, fact)
            if ok("options"):
                out += _options_problems(spec, fact)
        except PluginError as exc:  # a plugin's method failed: name it, do not crash
            out.append(Problem("factorization", str(exc)))
    if ini is not None and ok("residual"):
        out += _residual_problems(spec, ini)
    if ok("base", "residual") and spec.base == "nf4" and spec.residual != "none":
        out.append(
            Problem(
                "base",
                f"base: nf4 quantises the frozen base weights, but residual {spec.residual!r} "
                "already replaces them; for a 4-bit residual use residual: nf4 with base: fp",
            )
        )
    attention = [t for t in spec.targets if t in ATTENTION_PROJECTIONS]
    if ok("modes", "targets") and "heads" in spec.modes and not attention:
        out.append(
            Problem(
                "modes",
                f"mode 'heads' splits the heads of attention projections, but targets "
                f"[{', '.join(spec.targets)}] has none; add q, k, v or o to targets, or drop "
                "'heads' from modes",
            )
        )
    if ok("head_layout", "modes") and spec.head_layout == "strided" and "heads" not in spec.modes:
        out.append(
            Problem(
                "head_layout",
                "head_layout: strided says how the heads mode splits the head side, but modes "
                f"[{', '.join(spec.modes)}] has no 'heads'; add heads to modes, or drop head_layout",
            )
        )
    return out


def _residual_problems(spec: AdapterSpec, ini: Initializer) -> list[Problem]:
    if ini.pretrained and spec.residual == "none":
        return [
            Problem(
                "init",
                f"init {spec.init!r} starts from the pretrained weights, which changes the model "
                "unless that reconstruction is subtracted into a frozen residual; add residual: "
                "frozen (or nf4), or use init: zeros",
            )
        ]
    if not ini.pretrained and spec.residual != "none":
        return [
            Problem(
                "residual",
                f"residual {spec.residual!r} holds W0 minus a pretrained initialisation, but init "
                f"is {spec.init!r}, which does not start from the pretrained weights (nothing to "
                "subtract); choose a pretrained init such as svd or mpo, or residual: none",
            )
        ]
    return []


def _rank_problems(spec: AdapterSpec, fact: Factorization) -> list[Problem]:
    """A rank mapping's keys against the factorization's rank keys for these modes."""
    if not isinstance(spec.rank, dict):
        return []
    keys = tuple(fact.rank_keys(axis_names(spec.modes)))
    modes = f"[{', '.join(spec.modes)}]"
    if not keys:
        return [
            Problem(
                "rank",
                f"factorization {spec.factorization!r} takes a single integer rank "
                f"(e.g. rank: {max(spec.rank.values())}), not a mapping",
            )
        ]
    valid = [*keys, "default"]
    out = []
    for key in spec.rank:
        if key not in valid:
            alias = MODE_ALIASES.get(key)
            hint = (
                f" (did you mean {alias!r}? rank keys use canonical axis names)"
                if alias in valid
                else suggest(key, valid)
            )
            out.append(
                Problem(
                    f"rank.{key}",
                    f"{key!r} is not a rank key of {spec.factorization!r} with modes {modes}"
                    f"{hint}; valid keys: {', '.join(valid)}",
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
    return out


def _options_problems(spec: AdapterSpec, fact: Factorization) -> list[Problem]:
    """``options:`` against the factorization's options model, strictly (as JSON: no
    string-to-number, no bool-as-int), whatever the model's own strictness."""
    model = fact.options_model
    try:
        model.model_validate_json(json.dumps(spec.options), strict=True)
    except ValidationError as err:
        return render_errors(err, model, prefix=("options",), owner=spec.factorization)
    except Exception as exc:  # a plugin's options model that raises something else
        return [Problem("options", f"factorization {fact.name!r} failed on its options: {exc!r}")]
    return []
