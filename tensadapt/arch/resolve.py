"""Find the modules of an :class:`Architecture`'s sites in a concrete model."""

from __future__ import annotations

from collections.abc import Iterable

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
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "ndim", 0) != 2 or weight_layout(module) is None:
        return None  # a wrapper (e.g. an injected adapter): nothing to check here
    rows, cols = (int(n) for n in weight.shape)
    d_in, d_out = (rows, cols) if site.layout == "conv1d" else (cols, rows)
    stop = site.out_slice[1] if site.out_slice else site.out_features
    ok_out = d_out >= stop if site.out_slice else d_out == site.out_features
    if d_in == site.in_features and ok_out:
        return None
    want = f"in {site.in_features}, out {site.out_features}"
    if site.out_slice:
        want += f" at columns {site.out_slice[0]}:{site.out_slice[1]}"
    return f"{site.module} ({site.proj}): expected {want}, found in {d_in}, out {d_out}"


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
            (respecting ``layout`` and ``out_slice``); wrapped modules are not checked.

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
