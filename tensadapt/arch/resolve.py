"""Find the modules of an :class:`Architecture`'s sites in a concrete model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ArchitectureError
from .base import Architecture, TargetSite
from .scan import weight_layout


class ModuleIndex:
    """Module names of a model, looked up by any dot-bounded suffix.

    ``lookup("layers.0.self_attn.q_proj")`` finds ``model.layers.0.self_attn.q_proj`` in a
    ``LlamaForCausalLM``. Building the index costs one pass over ``named_modules()``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: set[str] = set()
        self._by_suffix: dict[str, list[str]] = {}
        for name, _ in model.named_modules():
            if not name:
                continue
            self.names.add(name)
            parts = name.split(".")
            for i in range(len(parts)):
                self._by_suffix.setdefault(".".join(parts[i:]), []).append(name)

    def lookup(self, path: str) -> list[str]:
        """Full names equal to ``path`` (preferred, if any) or ending with ``"." + path``."""
        if path in self.names:
            return [path]
        return list(self._by_suffix.get(path, ()))

    def has_all(self, paths: Iterable[str]) -> bool:
        """Whether every path resolves to exactly one module."""
        return all(len(self.lookup(p)) == 1 for p in paths)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at the full dotted ``name`` (``model.get_submodule``).

    Raises:
        ArchitectureError: no such module.
    """
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ArchitectureError(f"{type(model).__name__} has no module {name!r}: {exc}") from None


def _shape_problem(site: TargetSite, module: nn.Module) -> str | None:
    """Why ``module`` cannot hold ``site`` (wrong weight shape), or ``None`` if it fits."""
    want = f"in {site.in_features}, out {site.out_features}"
    out_total = site.fused.width if site.fused is not None else site.out_features
    if site.fused is not None:
        want += f" within a fused output of {out_total}"
    if site.experts is not None:
        return _expert_problem(site, module, want, out_total)
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "ndim", 0) != 2 or weight_layout(module) is None:
        return None  # a wrapper (e.g. an injected adapter): nothing to check here
    rows, cols = (int(n) for n in weight.shape)
    d_in, d_out = (rows, cols) if site.layout == "conv1d" else (cols, rows)
    if d_in == site.in_features and d_out == out_total:
        return None
    return f"{site.module} ({site.proj}): expected {want}, found in {d_in}, out {d_out}"


def _expert_problem(site: TargetSite, module: nn.Module, want: str, out_total: int) -> str | None:
    """Why ``module``'s stacked expert parameter does not fit ``site``, or ``None``."""
    assert site.experts is not None
    name = site.experts.param
    param = getattr(module, name, None)
    where = f"{site.module}.{name} ({site.proj})"
    if not isinstance(param, torch.Tensor):
        return f"{where}: no such parameter on {type(module).__name__}"
    e, out, d_in = site.experts.n_experts, out_total, site.in_features
    expected = (e, d_in, out) if site.layout == "conv1d" else (e, out, d_in)
    if tuple(param.shape) != expected:
        return (
            f"{where}: expected {e} experts of {want} (shape {list(expected)}), "
            f"found shape {list(param.shape)}"
        )
    bias = site.experts.bias
    if bias is not None:
        b = getattr(module, bias, None)
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (e, out):
            found = list(b.shape) if isinstance(b, torch.Tensor) else "none"
            return f"{site.module}.{bias} ({site.proj}): expected shape {[e, out]}, found {found}"
    return None


def resolve_modules(
    model: nn.Module, arch: Architecture, *, check_shapes: bool = True
) -> dict[tuple[int, str], str]:
    """The full module name of every site of ``arch`` in ``model``.

    A site's module is the unique module whose full name equals ``site.module`` or ends with
    ``"." + site.module``, so one architecture serves ``BertModel`` and
    ``BertForSequenceClassification`` (``bert.`` prefix) alike.

    Args:
        model: the model (any device, ``meta`` included).
        arch: its architecture.
        check_shapes: also check that each linear module's weight fits the site's widths
            (respecting ``layout`` and ``fused``), and each expert parameter its
            ``[E, out, in]`` (or ``[E, in, out]``) shape; wrapped modules are not checked.

    Returns:
        ``{(layer, proj): full module name}`` in ``arch.sites`` order.

    Raises:
        ArchitectureError: listing every site that is missing, ambiguous or of the wrong shape.
    """
    index = ModuleIndex(model)
    resolved: dict[tuple[int, str], str] = {}
    problems: list[str] = []
    for site in arch.sites:
        names = index.lookup(site.module)
        if len(names) == 1:
            resolved[(site.layer, site.proj)] = names[0]
            if check_shapes:
                problem = _shape_problem(site, model.get_submodule(names[0]))
                if problem:
                    problems.append(problem)
        elif not names:
            problems.append(f"no module {site.module!r} (layer {site.layer} {site.proj})")
        else:
            problems.append(f"{site.module!r} is ambiguous: {', '.join(names[:4])}")
    if problems:
        shown = "\n  - ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        linear = [n for n, m in model.named_modules() if weight_layout(m) is not None][:4]
        raise ArchitectureError(
            f"{arch.family} architecture ({arch.model_type}) does not fit "
            f"{type(model).__name__}:\n  - {shown}{more}\n"
            f"linear modules of this model look like: {', '.join(linear) or 'none'}"
        )
    return resolved
