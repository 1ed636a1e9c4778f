"""The adapter spec: one small YAML file describing one adapter, validated all at once.

A spec names the weight matrices to adapt (``targets``), how their updates are stacked into tensors
(``modes``) and laid out (``orientation``, ``head_layout``), how each tensor is parameterised
(``factorization``, ``rank``, ``options``), how the adapter starts (``init``, ``residual``,
``base``) and, optionally, how it is trained (``training``). :func:`load_spec` turns a file, a YAML
string or a dict into a frozen :class:`AdapterSpec`, or raises :class:`~tensadapt.errors.SpecError`
carrying *every* problem found, each with its YAML path (``rank.qkv``, ``targets.2``,
``options.n_cores``) and, when the spec came from YAML text, its line.

Example::

    factorization: tucker
    targets: [q, k, v]
    modes: [qkv, depth]
    rank: {in: 8, out: 8, qkv: 3, depth: 4}

How it is checked: pydantic validates every field with strict types (no string-to-number, no
bool-as-int), per-field validators add the checks with hints (unknown names with a did-you-mean,
duplicates), one model validator runs the checks that involve several fields (an init the
factorization does not support, rank keys, the factorization's ``options``, ...), and
:func:`tensadapt.spec_errors.render_errors` turns pydantic's structured errors into the messages
users read. The value checks live in :mod:`tensadapt.spec_checks`; reading the text, its limits and
its line numbers is :mod:`tensadapt.specfile`'s job. Validating a spec that names only built-ins
imports no plugin and no torch.

Checks that need the model's sizes (e.g. an MPO ``in_shape`` whose product must equal the width)
belong to the planner, not to the spec.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import spec_checks as checks
from . import specfile
from .arch.base import PROJECTIONS
from .errors import Problem, SpecError
from .factorizations.base import Factorization
from .modes import ALIASES as MODE_ALIASES
from .modes import MODES
from .plugins import factorization_registry, initializer_registry
from .registry import Initializer
from .spec_checks import axis_names
from .spec_errors import CROSS, problems_error, render_errors, show

#: Storage of the frozen residual (``residual:``) and of the targeted base weights (``base:``).
RESIDUALS: tuple[str, ...] = ("none", "frozen", "nf4")
BASES: tuple[str, ...] = ("fp", "nf4")

# The validation context key holding the fields that failed on their own: the model validator
# leaves out the checks touching them, so that one mistake is not reported twice.
_SKIP = "tensadapt.spec.skip"


# -- names -----------------------------------------------------------------------------------------
def get_factorization(name: str) -> Factorization:
    """The factorization registered as ``name`` (plugins are loaded if it is no built-in).

    Raises:
        RegistryError: ``name`` is not registered; the message lists the valid names.
    """
    return factorization_registry().get(name)


def _nonempty_rank(value: dict[str, int]) -> dict[str, int]:
    if not value:
        raise ValueError("an empty mapping gives no rank; write an integer or name the axes")
    return value


def _rank_kind(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return "integer"
    return "mapping" if isinstance(value, Mapping) else None


def _layers_kind(value: object) -> str:
    return "all" if isinstance(value, str) else "indices"


PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
Rank = Annotated[
    Union[  # noqa: UP007  (a discriminated union needs the tagged members spelled out)
        Annotated[PositiveInt, Tag("integer")],
        Annotated[dict[str, PositiveInt], AfterValidator(_nonempty_rank), Tag("mapping")],
    ],
    Discriminator(
        _rank_kind,
        custom_error_type="rank_type",
        custom_error_message="must be an integer >= 1 (e.g. 8) or a mapping from axis name to "
        "rank (e.g. {in: 8, qkv: 3, default: 4})",
    ),
]
Layers = Annotated[
    Union[  # noqa: UP007
        Annotated[Literal["all"], Tag("all")],
        Annotated[tuple[Annotated[int, Field(ge=0)], ...], Tag("indices")],
    ],
    Discriminator(_layers_kind),
]


# -- the models ------------------------------------------------------------------------------------
class TrainingSpec(BaseModel):
    """The optional ``training:`` section: the recipe a method was published with. Every key is
    optional; ``null`` (the default) leaves the command's own default or flag in force."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, title="training")

    lr: PositiveNumber | None = Field(
        None, description="Peak learning rate of the adapter's factors, e.g. 1e-3."
    )
    head_lr: PositiveNumber | None = Field(
        None,
        description="Learning rate of the modules trained in full (modules_to_save, a new "
        "classification head); null = lr.",
    )
    schedule: Literal["linear", "cosine", "constant"] | None = Field(
        None, description="Learning-rate schedule after the warm-up: linear, cosine or constant."
    )
    warmup_ratio: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = Field(
        None, description="Share of the training steps spent warming up, in [0, 1)."
    )
    epochs: PositiveNumber | None = Field(
        None, description="Passes over the training data (> 0; fractions allowed)."
    )
    batch_size: PositiveInt | None = Field(None, description="Examples per optimiser step (>= 1).")
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None, description="AdamW weight decay (>= 0)."
    )
    head_weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None,
        description="AdamW weight decay of the modules trained in full (modules_to_save, a new "
        "classification head); null = weight_decay.",
    )
    max_length: PositiveInt | None = Field(
        None, description="Tokens per example (>= 1); longer texts are truncated."
    )


class AdapterSpec(BaseModel):
    """One adapter, as written in a spec file. Frozen; build it with :func:`load_spec`.

    Every field's description is user help: it appears in the JSON Schema and in ``--help``.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, title="tensadapt adapter spec"
    )

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
    orientation: Literal["head-consistent", "lorta"] = Field(
        "head-consistent",
        description=(
            "How each target matrix is oriented before stacking. 'head-consistent' (default): the "
            "model-width side is always the 'in' axis (o and down transposed), so 'heads' splits "
            "the output of q, k, v and the input of o. 'lorta': every slice is applied as "
            "x·ΔWᵀ as in the LoRTA authors' PEFT tuner, so q, k, v are transposed like o and the "
            "head split falls on their input side."
        ),
    )
    head_layout: Literal["contiguous", "strided"] = Field(
        "contiguous",
        description=(
            "How 'heads' splits the head side: 'contiguous' (default), head h is columns "
            "h·hd … (h+1)·hd−1, the model's real heads; 'strided', head h is columns "
            "{h, h+H, h+2H, …}, as the TensLoRA authors' tl.unfold does. Needs the heads mode."
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
    rank: Rank = Field(
        8,
        description=(
            "Rank: one integer >= 1 for every bond, or (tucker, tt, ...) a mapping from axis name "
            "to rank, e.g. {in: 8, out: 8, qkv: 3, depth: 4}. Axis names are in and out (or in, "
            "head_dim, heads with the heads mode), then qkv and depth when stacked; 'default' "
            "covers the axes not named."
        ),
    )
    alpha: PositiveNumber | None = Field(
        None,
        description=(
            "Scale of the update: it is multiplied by alpha / rank (rank = the integer, or the "
            "largest rank in the mapping). null (default) means a scale of 1."
        ),
    )
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = Field(
        0.0, description="Dropout probability on the adapter's input, in [0, 1). 0 disables it."
    )
    init: str = Field(
        "zeros",
        description=(
            "Initialiser. 'zeros' starts from a zero update, so the model is unchanged at step 0. "
            "svd (lora/cp/tucker/tt) and mpo (mpo) start from the pretrained weights and need a "
            "residual; lorta (cp) and tenslora (tucker, cp) are those authors' inits. Which ones "
            "a factorization supports: `tensadapt plugins`."
        ),
    )
    residual: Literal["none", "frozen", "nf4"] = Field(
        "none",
        description=(
            "With a pretrained init, the initial reconstruction is subtracted from the weight into "
            "a frozen residual W0 - init so the model is unchanged at step 0 (DoTA). 'frozen' keeps "
            "it in the model's dtype; 'nf4' stores it as 4-bit NormalFloat (QDoTA). 'none' "
            "(default) goes with an init that does not start from the pretrained weights."
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
    layers: Layers = Field(
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
    options: dict[str, JsonValue] = Field(
        default_factory=dict,
        description=(
            "Options of the chosen factorization, e.g. for mpo {n_cores: 5, in_shape: [4, 4, 4, "
            "4, 3]}. Unknown options are errors."
        ),
    )
    training: TrainingSpec | None = Field(
        None,
        description=(
            "Optional training recipe (lr, head_lr, schedule, warmup_ratio, epochs, batch_size, "
            "weight_decay, max_length) that `tensadapt train` and `sweep` use unless a flag "
            "overrides it; null (default) = the commands' defaults."
        ),
    )

    # -- per-field validators (each independent of the others; see spec_checks) --------------
    @field_validator("targets", mode="before")
    @classmethod
    def _check_targets(cls, value: object) -> tuple[str, ...]:
        return checks.targets(value)

    @field_validator("modes", mode="before")
    @classmethod
    def _check_modes(cls, value: object) -> tuple[str, ...]:
        return checks.modes(value)

    @field_validator("factorization")
    @classmethod
    def _check_factorization(cls, value: str) -> str:
        return checks.registered(factorization_registry(), value)

    @field_validator("init")
    @classmethod
    def _check_init(cls, value: str) -> str:
        return checks.registered(initializer_registry(), value)

    @field_validator("layers", mode="before")
    @classmethod
    def _check_layers(cls, value: object) -> object:
        return checks.layers(value)

    @field_validator("layers")
    @classmethod
    def _sort_layers(cls, value: str | tuple[int, ...]) -> str | tuple[int, ...]:
        return value if isinstance(value, str) else tuple(sorted(value))

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _check_modules(cls, value: object) -> tuple[str, ...]:
        return checks.module_names(value)

    @field_validator("options", mode="before")
    @classmethod
    def _check_options(cls, value: object) -> JsonValue:
        return checks.options(value)

    # -- the checks that involve several fields -------------------------------------------------
    @model_validator(mode="after")
    def _check_together(self, info: ValidationInfo) -> AdapterSpec:
        skip = set((info.context or {}).get(_SKIP, ()))
        problems = checks.cross_problems(self, skip)
        if problems:
            raise problems_error(problems, kind=CROSS)
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

    def get_initializer(self) -> Initializer:
        """The initialiser this spec names (from the registry): ``.pretrained`` says whether it
        starts from the pretrained weights; calling it returns the factors."""
        return initializer_registry().get(self.init)

    def parsed_options(self) -> BaseModel:
        """``options`` validated by the factorization's ``options_model`` (defaults filled in)."""
        return self.get_factorization().parse_options(self.options)

    def to_dict(self) -> dict[str, JsonValue]:
        """The resolved spec as plain data (every field, defaults included; lists, not tuples)."""
        data: dict[str, JsonValue] = self.model_dump(mode="json")
        return data

    def __hash__(self) -> int:  # the dict fields (rank, options) are not hashable themselves
        return hash(json.dumps(self.to_dict(), sort_keys=True))


# -- loading ---------------------------------------------------------------------------------------
def load_spec(
    source: str | Path | Mapping[str, object] | AdapterSpec, *, source_name: str | None = None
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
            text, its line; or naming the limit a too large, too deep or too long input breaches
            (:mod:`tensadapt.specfile`).
    """
    if isinstance(source, AdapterSpec):
        return source
    parsed, name = specfile.read_source(source, source_name)
    data = parsed.data
    if data is None:
        specfile.refuse(
            name, "empty spec: write at least '{}' for all defaults, or keys such as 'rank: 8'"
        )
    if not isinstance(data, Mapping):
        kind = "a list" if isinstance(data, list) else f"{type(data).__name__} {show(data)}"
        specfile.refuse(name, f"a spec must be a mapping of keys (targets, rank, ...), got {kind}")
    spec, problems = _validate(data)
    problems = parsed.problems + problems
    if spec is None or problems:
        fields = list(AdapterSpec.model_fields)

        def order(item: tuple[int, Problem]) -> tuple[int, int, int]:
            i, p = item
            line = specfile.line_of(p.path, parsed.lines)
            head = p.path.split(".")[0]
            field = fields.index(head) if head in fields else len(fields)
            return (line if line is not None else 1 << 30, field, i)

        ranked = sorted(enumerate(problems), key=order)
        raise SpecError([_with_line(p, parsed.lines) for _, p in ranked], source=name)
    return spec


def _validate(data: Mapping[object, object]) -> tuple[AdapterSpec | None, list[Problem]]:
    """Validate a mapping: every field, then the cross-field checks -- also when some fields
    failed (pydantic runs the model validator only on a valid model, so it runs again on the
    valid fields, told to leave out the checks touching the failed ones)."""
    problems: list[Problem] = []
    clean: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(key, str):
            clean[key] = value
        else:
            problems.append(Problem(show(key), f"keys must be strings, got {show(key)}"))
    try:
        spec = AdapterSpec.model_validate(clean)
    except ValidationError as err:
        problems += render_errors(err, AdapterSpec)
        bad = {str(e["loc"][0]) for e in err.errors() if e["loc"] and e["type"] != CROSS}
        if bad:
            kept = {
                k: v for k, v in clean.items() if k in AdapterSpec.model_fields and k not in bad
            }
            try:
                AdapterSpec.model_validate(kept, context={_SKIP: bad})
            except ValidationError as again:
                problems += render_errors(again, AdapterSpec)
        return None, problems
    return (None if problems else spec), problems


def _with_line(problem: Problem, lines: Mapping[str, int]) -> Problem:
    """``problem`` with ``(line N)`` appended when its path (or a parent) has a known line."""
    line = specfile.line_of(problem.path, lines)
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


def json_schema() -> dict[str, JsonValue]:
    """The JSON Schema of a spec file (for editors and docs), with the registered names as enums.

    The factorization and init enums list what is registered *now* (built-ins and installed
    plugins).
    """
    schema = AdapterSpec.model_json_schema()
    schema["title"] = "tensadapt adapter spec"
    props = schema["properties"]
    names = factorization_registry().names()
    inits = initializer_registry()
    props["factorization"]["enum"] = names
    props["targets"]["items"] = {"type": "string", "enum": list(PROJECTIONS)}
    props["modes"]["items"] = {"type": "string", "enum": [*MODES, *MODE_ALIASES]}
    props["init"]["enum"] = inits.names()
    props["init"]["description"] += (
        " Supported: "
        + "; ".join(f"{n}: {', '.join(e.name for e in inits if e.obj.supports(n))}" for n in names)
        + "."
    )
    per_format = [
        f"{n}: "
        + "; ".join(f"{k} ({v.description})" if v.description else k for k, v in fields.items())
        for n in names
        if (fields := get_factorization(n).options_model.model_fields)
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
    "TrainingSpec",
    "axis_names",
    "get_factorization",
    "json_schema",
    "load_spec",
    "render_errors",
    "spec_to_yaml",
    "validate_files",
]
