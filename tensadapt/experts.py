"""Mixture-of-experts modules: :class:`AdaptedExperts` wraps ``transformers``' stacked-parameter
experts (one 3-D weight per projection, ``[E, out, in]``) and adds the active adapter's per-expert
updates on the routed path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .nn import Adapted, AdapterHub
from .planner import TargetPlan


class AdaptedExperts(Adapted):
    """A mixture-of-experts module (``transformers``' stacked-parameter experts: ``gate_up_proj
    [E, 2I, d]`` or ``up_proj``, ``down_proj [E, d, I]``, optional biases, ``is_transposed``,
    ``_apply_gate``/``act_fn``) plus the active adapter's updates of its experts.

    The forward is routed: each expert a token is sent to runs ``down(gate(x·W_gu[e] + ΔW_gu[e]))``
    with its update contracted from the factors for *its* tokens only -- an expert no token is
    routed to costs nothing, and nothing is rebuilt per expert. It reads transformers' own
    experts interface (the attributes above), so no family needs code of its own.
    """

    def __init__(self, base: nn.Module, hub: AdapterHub) -> None:
        super().__init__(base, hub)
        if getattr(base, "has_post_expert_norm", False):
            from .errors import PlanError

            raise PlanError(
                f"{type(base).__name__}: experts with a post-expert norm are not supported"
            )
        self._by_expert: dict[str, dict[int, tuple[tuple[TargetPlan, ...], ...]]] = {}

    def weight_of(self, t: TargetPlan) -> torch.Tensor:
        assert t.experts is not None and t.expert is not None
        param: torch.Tensor = getattr(self.base, t.experts.param)
        return param[t.expert]

    def _weights(self, name: str) -> list[torch.Tensor]:
        names = dict.fromkeys(t.experts.param for t in self.adapter_targets[name] if t.experts)
        return [getattr(self.base, n) for n in names]

    def _prepare(self, name: str, targets: tuple[TargetPlan, ...]) -> None:
        """The routed forward groups the targets per expert (:meth:`_split`, rebuilt lazily);
        there is no program of the whole module's targets to build: they are never run as one."""
        self._by_expert.pop(name, None)

    def _split(self, name: str) -> dict[int, tuple[tuple[TargetPlan, ...], ...]]:
        """Per expert: (targets of its first projection, targets of its down projection)."""
        found = self._by_expert.get(name)
        if found is None:
            first_param = "gate_up_proj" if getattr(self.base, "has_gate", True) else "up_proj"
            by: dict[int, tuple[list[TargetPlan], list[TargetPlan]]] = {}
            for t in self.adapter_targets[name]:
                assert t.experts is not None and t.expert is not None
                lists = by.setdefault(t.expert, ([], []))
                lists[0 if t.experts.param == first_param else 1].append(t)
            found = {e: (tuple(a), tuple(b)) for e, (a, b) in by.items()}
            self._by_expert[name] = found
        return found

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: object) -> torch.Tensor:
        found = self.active_targets()
        if found is None:
            return self.base(hidden_states, *args, **kwargs)
        ad, _ = found
        index, weights = _routing(args, kwargs)
        ex: Any = self.base
        per_expert = self._split(self.hub.active or "")
        has_gate = getattr(ex, "has_gate", True)
        first = ex.gate_up_proj if has_gate else ex.up_proj
        first_bias = (
            (ex.gate_up_proj_bias if has_gate else ex.up_proj_bias) if ex.has_bias else None
        )
        down_bias = ex.down_proj_bias if ex.has_bias else None
        transposed = bool(getattr(ex, "is_transposed", False))
        n_experts = first.shape[0]
        k = index.shape[-1]
        tokens = torch.arange(hidden_states.shape[0], device=index.device).repeat_interleave(k)
        flat = index.reshape(-1)
        flat_w = weights.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        out = torch.zeros_like(hidden_states)
        start = 0
        empty: tuple[TargetPlan, ...] = ()
        for e, c in enumerate(counts[:n_experts]):
            if c == 0:
                continue
            sel = order[start : start + c]
            start += c
            rows = tokens[sel]
            x = hidden_states[rows]
            ups, downs = per_expert.get(e, (empty, empty))
            h = _expert_linear(
                x, first[e], first_bias[e] if first_bias is not None else None, transposed
            )
            if ups:
                h = ad.add_updates(ups, x, h, False, None)
            h = ex._apply_gate(h) if has_gate else ex.act_fn(h)
            y = _expert_linear(
                h, ex.down_proj[e], down_bias[e] if down_bias is not None else None, transposed
            )
            if downs:
                y = ad.add_updates(downs, h, y, False, None)
            out.index_add_(0, rows, (y * flat_w[sel, None]).to(out.dtype))
        return out


def _routing(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index [T, k], top_k_weights [T, k])`` of an experts module call, however the
    family names them."""
    index = kwargs.get("top_k_index", kwargs.get("router_indices"))
    weights = kwargs.get("top_k_weights", kwargs.get("routing_weights"))
    rest = list(args)
    if index is None and rest:
        index = rest.pop(0)
    if weights is None and rest:
        weights = rest.pop(0)
    if index is None or weights is None:
        raise TypeError(
            "an experts module is called with (hidden_states, top_k_index, top_k_weights)"
        )
    return index, weights


def _expert_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """``x·W[e]`` in the experts' layout (``[out, in]``, or ``[in, out]`` when transposed)."""
    y = x @ w if transposed else x @ w.t()
    return y if b is None else y + b


__all__ = ["AdaptedExperts"]
