"""TensLoRA-style enumeration of adapter configurations, with isorank or isoparameter ranks.

Every subset of the stacking modes {heads, qkv, depth} (the empty one is per-matrix, i.e. LoRA's
layout) is crossed with every requested factorization (default: every registered one, plugins
included, that can plan the subset) and given ranks by one policy:

- **isorank** (``rank=R``): ``R`` on every axis, as TensLoRA counts it. A per-axis rank may then
  exceed a small axis (``qkv`` = 3): such rows list the axes in ``over_axis``. With
  ``cap_ranks=True`` every per-axis rank is capped at its axis size instead.
- **isoparameters** (``budget=N`` parameters, or ``budget_of="lora:R"``: the parameter count of
  LoRA at rank ``R`` on the same targets): the largest ranks whose parameter count stays within
  the budget, never above a cap (below).

Rank caps. A per-axis rank (a key of :meth:`Factorization.rank_keys` naming an axis: Tucker's
``r_a``) is capped at that axis's size, the smallest over the spec's tensors (GQA models have two
tensors with different ``qkv`` sizes). A tensor-train bond (keyed by the axis on its left) is
capped at that axis's size too, and at ``min(product of the axes on its left, product of those on
its right)``, past which it adds parameters and no expressiveness; a factorization may define its
own ``rank_caps(axes) -> {key: cap}`` (still never above the key's axis). A
single-integer rank (lora, cp, mpo) is capped at the tensor's size divided by its largest axis,
the bound beyond which a low-rank format stops being low-rank (``min(in, out)`` for a matrix).

Allocation rule for per-axis ranks under a budget (Tucker, TT and any plugin with rank keys),
deterministic and documented here because TensLoRA leaves it open:

1. *level*: all ranks share one level ``ℓ``, each capped: ``r_a = min(ℓ, cap_a)``; ``ℓ`` is the
   largest level whose parameter count fits the budget (binary search, counts are monotone);
2. *fill*: while some rank can grow by one without leaving the budget or passing its cap, grow the
   one whose increment costs the fewest parameters (ties: axis order). This spends the remainder
   that one more level could not.

Rows whose parameterisation repeats an earlier row of the same factorization (same number of
tensors and same factor sizes: e.g. lora with ``heads``, whose ``in × rest`` unfolding ignores the
head split) are left out and listed in :attr:`Enumeration.skipped`, as are rows that cannot be
planned or whose rank-1 form already exceeds the budget.

Everything here reads only the architecture (a config or preset): no weights are loaded.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import PlanError, SpecError, TensadaptError, first_line
from .factorizations.base import Axis, Factorization
from .planner import Plan, plan
from .plugins import factorization_registry
from .spec import MODES, AdapterSpec, get_factorization, load_spec, spec_to_yaml

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: Every subset of the stacking modes that apply to every model (``experts`` only exists in
#: mixture-of-experts models), in the order tables list them.
_DENSE_MODES = tuple(m for m in MODES if m != "experts")
MODE_SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    combo for k in range(len(_DENSE_MODES) + 1) for combo in itertools.combinations(_DENSE_MODES, k)
)

Rank = int | dict[str, int]


class EnumerateError(TensadaptError, ValueError):
    """Enumeration options that cannot be honoured (bad budget, unknown factorization, ...)."""


@dataclass(frozen=True)
class Row:
    """One enumerated configuration.

    Attributes:
        name: ``<factorization>-<modes>`` (``none`` for no modes), e.g. ``tucker-qkv-depth``.
        modes: canonical stacking modes.
        factorization: registered factorization name.
        rank: the spec's rank (an int, or a per-axis mapping).
        policy: ``isorank`` or ``isoparameters``.
        n_params: trainable adapter parameters (from the plan's factor shapes).
        model_percent: ``n_params`` as a percentage of the base model's parameters, if known.
        ratio_to_lora: ``n_params`` / the reference LoRA's parameters (:attr:`Enumeration.lora_params`).
        flops_per_token: adapter FLOPs per token (unmerged forward, from the plan).
        budget: the isoparameter budget, ``None`` for isorank.
        over_axis: per-axis ranks larger than their axis, as ``"qkv:8>3"`` (isorank only).
        spec: the spec of this row (valid: ``tensadapt validate`` accepts its YAML).
    """

    name: str
    modes: tuple[str, ...]
    factorization: str
    rank: Rank
    policy: str
    n_params: int
    model_percent: float | None
    ratio_to_lora: float
    flops_per_token: float
    budget: int | None
    over_axis: tuple[str, ...]
    spec: AdapterSpec

    @property
    def is_lora(self) -> bool:
        """The plain LoRA baseline: factorization ``lora`` with no stacking modes."""
        return self.factorization == "lora" and not self.modes

    @property
    def filename(self) -> str:
        """The YAML file name ``--out`` writes this row to."""
        return f"{self.name}.yaml"

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON data (the spec as its resolved mapping)."""
        return {
            "name": self.name,
            "modes": list(self.modes),
            "factorization": self.factorization,
            "rank": self.rank,
            "policy": self.policy,
            "n_params": self.n_params,
            "model_percent": self.model_percent,
            "ratio_to_lora": self.ratio_to_lora,
            "flops_per_token": self.flops_per_token,
            "budget": self.budget,
            "over_axis": list(self.over_axis),
            "spec": self.spec.to_dict(),
        }


@dataclass(frozen=True)
class Enumeration:
    """The result of :func:`enumerate_configs`: rows plus what was left out and why."""

    model: str
    targets: tuple[str, ...]
    policy: str
    lora_rank: int
    lora_params: int
    model_params: int | None
    budget: int | None
    rows: tuple[Row, ...]
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "targets": list(self.targets),
            "policy": self.policy,
            "lora_rank": self.lora_rank,
            "lora_params": self.lora_params,
            "model_params": self.model_params,
            "budget": self.budget,
            "rows": [r.to_dict() for r in self.rows],
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return format_table(self)

    def write_specs(self, directory: str | Path) -> list[Path]:
        """Write one spec YAML per row to ``directory`` (created), named :attr:`Row.filename`."""
        from .atomic import atomic_write

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for r in self.rows:
            note = (
                f"# {r.name}: {r.factorization} over modes [{', '.join(r.modes) or 'none'}], "
                f"{r.policy}, {r.n_params:,} trainable parameters on {self.model} "
                f"(ratio to LoRA r={self.lora_rank}: {r.ratio_to_lora:.4f}).\n"
                f"# Written by `tensadapt enumerate`; run: tensadapt plan {r.filename} "
                f"--model {self.model}\n"
            )
            path = out / r.filename
            atomic_write(path, _text_writer(note + spec_to_yaml(r.spec)))
            paths.append(path)
        return paths


# -- helpers -----------------------------------------------------------------------------------


def _text_writer(text: str) -> Callable[[str], object]:
    """A writer for :func:`~tensadapt.io.atomic_write` that writes ``text`` as UTF-8."""
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


def parse_budget_of(text: str) -> int:
    """The LoRA rank in ``"lora:R"``; raises :class:`EnumerateError` on anything else."""
    kind, _, value = text.partition(":")
    if kind.strip() != "lora" or not value.strip().isdigit() or int(value) < 1:
        raise EnumerateError(f"--budget-of: expected 'lora:R' with an integer R >= 1, got {text!r}")
    return int(value)


def _mode_label(modes: Sequence[str]) -> str:
    return "-".join(modes) if modes else "none"


def _tensor_axes(p: Plan) -> list[tuple[Axis, ...]]:
    return [t.axes for t in p.tensors]


def rank_caps(fact: Factorization, tensors: Sequence[Sequence[Axis]]) -> dict[str, int]:
    """The cap of every rank key (see the module docstring); ``{"r": cap}`` for integer ranks."""
    keys = fact.rank_keys([a.name for a in tensors[0]])
    own = getattr(fact, "rank_caps", None) or _CAP_RULES.get(fact.name)
    if keys and own is not None:
        per = [(own(ax), {a.name: a.size for a in ax}) for ax in tensors]
        return {k: min(min(c[k], sz.get(k, c[k])) for c, sz in per) for k in keys}
    if not keys:
        return {
            "r": min(math.prod(a.size for a in ax) // max(a.size for a in ax) for ax in tensors)
        }
    caps: dict[str, int] = {}
    for k in keys:
        found = [a.size for ax in tensors for a in ax if a.name == k]
        caps[k] = min(found) if found else 1 << 30
    return caps


def _tt_caps(axes: Sequence[Axis]) -> dict[str, int]:
    """Bond caps of a tensor train: ``min(prod(left sizes), prod(right sizes))`` per bond."""
    sizes = [a.size for a in axes]
    return {
        a.name: min(math.prod(sizes[: i + 1]), math.prod(sizes[i + 1 :]))
        for i, a in enumerate(axes[:-1])
    }


#: caps of built-in formats whose rank keys are bonds rather than axes (see the module docstring)
_CAP_RULES: dict[str, Callable[[Sequence[Axis]], dict[str, int]]] = {"tt": _tt_caps}


def _count(
    fact: Factorization, tensors: Sequence[Sequence[Axis]], rank: Rank, options: BaseModel
) -> int:
    return sum(fact.n_params(ax, rank, options) for ax in tensors)


def _largest(fits: Callable[[int], bool], hi: int) -> int:
    """The largest ``x`` in ``[1, hi]`` with ``fits(x)`` (monotone), or 0 when ``fits(1)`` fails."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocate_ranks(
    fact: Factorization,
    tensors: Sequence[Sequence[Axis]],
    budget: int,
    options: BaseModel | None = None,
) -> Rank | None:
    """The isoparameter ranks of ``fact`` on these tensors within ``budget`` (module docstring).

    Args:
        fact: the factorization.
        tensors: the axes of every tensor of the spec.
        budget: the most trainable parameters allowed.
        options: parsed factorization options (defaults when ``None``).
    Returns:
        an int rank, a per-axis mapping, or ``None`` when even rank 1 exceeds the budget.
    """
    options = options if options is not None else fact.options_model()
    caps = rank_caps(fact, tensors)
    if list(caps) == ["r"]:
        r = _largest(lambda x: _count(fact, tensors, x, options) <= budget, caps["r"])
        return r or None

    def level(x: int) -> dict[str, int]:
        return {k: min(x, c) for k, c in caps.items()}

    top = max(caps.values())
    lvl = _largest(lambda x: _count(fact, tensors, level(x), options) <= budget, top)
    if not lvl:
        return None
    ranks = level(lvl)
    used = _count(fact, tensors, ranks, options)
    while True:
        best: tuple[int, int, str] | None = None
        for i, (k, c) in enumerate(caps.items()):
            if ranks[k] >= c:
                continue
            n = _count(fact, tensors, {**ranks, k: ranks[k] + 1}, options)
            if n <= budget and (best is None or (n - used, i) < best[:2]):
                best = (n - used, i, k)
        if best is None:
            return ranks
        ranks[best[2]] += 1
        used += best[0]


def _over_axis(fact: Factorization, tensors: Sequence[Sequence[Axis]], rank: Rank) -> list[str]:
    caps = rank_caps(fact, tensors)
    if list(caps) == ["r"]:
        return []
    out = []
    for k, c in caps.items():
        r = rank if isinstance(rank, int) else rank[k]
        if r > c:
            out.append(f"{k}:{r}>{c}")
    return out


def model_param_count(model: str | Path | PretrainedConfig) -> int | None:
    """Parameters of the base model (``AutoModel`` on the ``meta`` device: no memory, no weights)."""
    try:
        import torch
        from transformers import AutoModel

        from .arch import load_config

        config = load_config(model) if isinstance(model, str | Path) else model
        with torch.device("meta"):
            m = AutoModel.from_config(config)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # an exotic config: the % column is left empty
        return None


def factorization_names() -> list[str]:
    """Every registered factorization (built-ins and plugins)."""
    return list(factorization_registry().names())


# -- the enumeration ---------------------------------------------------------------------------


def enumerate_configs(
    model: str | Path | PretrainedConfig,
    *,
    rank: int | None = None,
    cap_ranks: bool = False,
    budget: int | None = None,
    budget_of: str | int | None = None,
    targets: Sequence[str] = ("q", "k", "v"),
    factorizations: Iterable[str] | None = None,
    modes: Iterable[Sequence[str]] | None = None,
    scale: float = 2.0,
    model_name: str | None = None,
) -> Enumeration:
    """Every mode subset × factorization with ranks by one policy.

    Args:
        model: preset name, local model/config path, or a ``transformers`` config.
        rank: isorank ``R`` (default 8 when no budget is given).
        cap_ranks: isorank only: cap each per-axis rank at its axis size.
        budget: isoparameters: at most this many trainable parameters per row.
        budget_of: isoparameters: the budget of LoRA at this rank (``"lora:8"`` or ``8``).
        targets: projections to adapt.
        factorizations: names to enumerate (default: every registered one).
        modes: mode subsets (default: all 8 of :data:`MODE_SUBSETS`).
        scale: every spec gets ``alpha = scale · (its largest rank)``, i.e. the same update scale.
        model_name: how the model is named in messages and YAML comments.
    Returns:
        the :class:`Enumeration`.
    Raises:
        EnumerateError: contradictory or invalid options, an unknown factorization name.
    """
    from .arch import load_config

    if budget is not None and budget_of is not None:
        raise EnumerateError("give either --params or --budget-of, not both")
    if rank is not None and (budget is not None or budget_of is not None):
        raise EnumerateError("--rank (isorank) and a budget (isoparameters) exclude each other")
    if cap_ranks and (budget is not None or budget_of is not None):
        raise EnumerateError("--cap-ranks applies to isorank; isoparameter ranks are always capped")
    if rank is not None and rank < 1:
        raise EnumerateError(f"--rank must be >= 1, got {rank}")
    if budget is not None and budget < 1:
        raise EnumerateError(f"--params must be >= 1, got {budget}")
    lora_rank = (
        parse_budget_of(budget_of)
        if isinstance(budget_of, str)
        else budget_of
        if budget_of is not None
        else rank or 8
    )
    if lora_rank < 1:
        raise EnumerateError(f"LoRA rank must be >= 1, got {lora_rank}")
    iso_params = budget is not None or budget_of is not None
    isorank = rank or 8

    name = model_name or (str(model) if isinstance(model, str | Path) else "model")
    config = load_config(model) if isinstance(model, str | Path) else model
    targets = tuple(targets)
    all_names = factorization_names()
    wanted = list(factorizations) if factorizations is not None else all_names
    unknown = [f for f in wanted if f not in all_names]
    if unknown:
        raise EnumerateError(
            f"--factorizations: unknown {', '.join(map(repr, unknown))}; "
            f"registered: {', '.join(all_names)}"
        )
    subsets = [tuple(m) for m in modes] if modes is not None else list(MODE_SUBSETS)

    def base_spec(fact: str, ms: tuple[str, ...], r: Rank) -> dict[str, Any]:
        top = r if isinstance(r, int) else max(r.values())
        return {
            "name": f"{fact}-{_mode_label(ms)}",
            "factorization": fact,
            "targets": list(targets),
            "modes": list(ms),
            "rank": r,
            "alpha": float(scale * top),
        }

    try:
        lora_plan = plan(base_spec("lora", (), lora_rank), config)
    except SpecError as e:
        raise EnumerateError(f"--targets: {e}") from None
    lora_params = lora_plan.n_params
    the_budget = budget if budget is not None else (lora_params if iso_params else None)
    model_params = model_param_count(config)

    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[Any, ...]] = set()
    for ms in subsets:
        probe: Plan | None = None
        for fname in wanted:
            label = f"{fname}-{_mode_label(ms)}"
            fact = get_factorization(fname)
            try:
                if probe is None:
                    probe = plan(base_spec("cp", ms, 1), config)
                tensors = _tensor_axes(probe)
                options = fact.parse_options({})
                r: Rank | None
                if iso_params:
                    assert the_budget is not None
                    r = allocate_ranks(fact, tensors, the_budget, options)
                    if r is None:
                        skipped.append((label, f"rank 1 already exceeds the budget {the_budget:,}"))
                        continue
                elif cap_ranks:
                    caps = rank_caps(fact, tensors)
                    r = (
                        isorank
                        if list(caps) == ["r"]
                        else {k: min(isorank, c) for k, c in caps.items()}
                    )
                else:
                    r = isorank
                p = plan(load_spec(base_spec(fname, ms, r)), config)
            except (PlanError, SpecError, ValueError) as e:
                skipped.append((label, f"cannot be planned: {first_line(e)}"))
                continue
            sig = (
                fname,
                json.dumps(r, sort_keys=True),
                tuple(sorted(tuple(sorted(f.numel for f in t.factors)) for t in p.tensors)),
            )
            if sig in seen:
                skipped.append((label, "same parameterisation as an earlier row"))
                continue
            seen.add(sig)
            rows.append(
                Row(
                    name=label,
                    modes=ms,
                    factorization=fname,
                    rank=r,
                    policy="isoparameters" if iso_params else "isorank",
                    n_params=p.n_params,
                    model_percent=100 * p.n_params / model_params if model_params else None,
                    ratio_to_lora=p.n_params / lora_params,
                    flops_per_token=p.flops_per_token,
                    budget=the_budget,
                    over_axis=tuple(_over_axis(fact, tensors, r)) if not iso_params else (),
                    spec=p.spec,
                )
            )
    return Enumeration(
        model=name,
        targets=targets,
        policy="isoparameters" if iso_params else "isorank",
        lora_rank=lora_rank,
        lora_params=lora_params,
        model_params=model_params,
        budget=the_budget,
        rows=tuple(rows),
        skipped=tuple(skipped),
    )


def _fmt_rank(r: Rank) -> str:
    if isinstance(r, int):
        return str(r)
    return ",".join(f"{k}={v}" for k, v in r.items())


def format_table(e: Enumeration, limit: int | None = None) -> str:
    """The enumeration as a text table (what ``tensadapt enumerate`` prints)."""
    if e.policy == "isorank":
        head = f"isorank on {e.model}, targets {','.join(e.targets)}"
    else:
        assert e.budget is not None
        head = f"isoparameters on {e.model}, targets {','.join(e.targets)}, budget {e.budget:,}"
    head += f"; reference LoRA r={e.lora_rank}: {e.lora_params:,} parameters"
    rows: list[tuple[str, ...]] = [
        ("modes", "factorization", "ranks", "params", "% model", "vs LoRA", "FLOPs/token", "note")
    ]
    shown = e.rows if limit is None else e.rows[:limit]
    for r in shown:
        rows.append(
            (
                ",".join(r.modes) or "none",
                r.factorization,
                _fmt_rank(r.rank),
                f"{r.n_params:,}",
                f"{r.model_percent:.4f}" if r.model_percent is not None else "-",
                f"{r.ratio_to_lora:.3f}",
                f"{r.flops_per_token:,.0f}",
                ("rank > axis: " + " ".join(r.over_axis)) if r.over_axis else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6}
    lines = []
    for i, row in enumerate(rows):
        cells = [
            c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    more = len(e.rows) - len(shown)
    if more:
        lines.append(f"... {more} more row(s)")
    tail = [f"{len(e.rows)} configuration(s)"]
    if e.skipped:
        tail.append(f"{len(e.skipped)} left out: " + "; ".join(f"{n} ({w})" for n, w in e.skipped))
    return head + "\n" + "\n".join(lines) + "\n" + "\n".join(tail)


def load_rows_from_dir(directory: str | Path) -> list[tuple[str, AdapterSpec]]:
    """``(stem, spec)`` for every ``*.yaml``/``*.yml`` spec in ``directory``, sorted by name.

    Raises:
        EnumerateError: the directory is missing or holds no spec.
        SpecError: a spec is invalid (every problem, with its file).
    """
    d = Path(directory)
    if not d.is_dir():
        raise EnumerateError(f"--specs: {d}: no such directory")
    files = sorted([*d.glob("*.yaml"), *d.glob("*.yml")])
    odd = [f.name for f in files if not f.is_file()]
    if odd:  # a FIFO would block the reader forever
        raise EnumerateError(f"--specs: {d}: not regular files: {', '.join(odd)}")
    if not files:
        raise EnumerateError(f"--specs: {d}: no *.yaml spec files")
    return [(f.stem, load_spec(f)) for f in files]


def rank_summary(rank: Mapping[str, int] | int) -> str:
    """A compact rank string (``8`` or ``in=8,out=8,qkv=3``) for tables and CSV files."""
    return _fmt_rank(rank if isinstance(rank, int) else dict(rank))
