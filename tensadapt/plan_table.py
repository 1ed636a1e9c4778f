"""The text table a :class:`~tensadapt.planner.Plan` prints (what ``tensadapt plan`` shows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .factorizations.base import nominal_rank

if TYPE_CHECKING:
    from .planner import Plan


def _fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def format_plan(p: Plan) -> str:
    """The plan as a text table (what ``tensadapt plan`` prints)."""
    spec = p.spec
    a = p.architecture
    head = (
        f"tensadapt plan: {spec.factorization} over modes [{', '.join(spec.modes) or 'none'}], "
        f"targets {','.join(spec.targets)}, rank {spec.rank}\n"
        f"model: {a['family']} ({a['model_type']}), {a['n_layers']} layers, d={a['hidden_size']}, "
        f"heads={a['n_heads']}, kv_heads={a['n_kv_heads']}, head_dim={a['head_dim']}\n"
    )
    rows = [("tensor", "axes", "factors", "params", "targets")]
    counts: dict[str, int] = {}
    for t in p.targets:
        counts[t.tensor] = counts.get(t.tensor, 0) + 1
    shown = p.tensors if len(p.tensors) <= 12 else (*p.tensors[:10], None, p.tensors[-1])
    for tp in shown:
        if tp is None:
            rows.append((f"... {len(p.tensors) - 11} more", "", "", "", ""))
            continue
        axes = " × ".join(f"{x.name}={x.size}" for x in tp.axes)
        facs = " ".join(f"{f.name}{list(f.shape)}" for f in tp.factors)
        rows.append((tp.name, axes, facs, _fmt_int(tp.n_params), str(counts.get(tp.name, 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    widths[2] = min(widths[2], 70)
    lines = []
    for i, r in enumerate(rows):
        cells = [r[j] if j != 2 or len(r[j]) <= 70 else r[j][:67] + "..." for j in range(5)]
        lines.append(
            "  ".join(c.ljust(widths[j]) if j < 4 else c for j, c in enumerate(cells)).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    pct = f" ({100 * p.n_params / p.model_params:.4f}% of the model)" if p.model_params else ""
    tail = (
        f"\ntrainable parameters: {_fmt_int(p.n_params)}{pct}\n"
        f"LoRA at rank {nominal_rank(spec.rank)} on the same targets: {_fmt_int(p.lora_params)} "
        f"(ratio {p.ratio_to_lora:.4f})\n"
        f"adapter FLOPs per token: {_fmt_int(p.flops_per_token)} "
        f"(LoRA: {_fmt_int(p.lora_flops_per_token)})\n"
        f"targets: {len(p.targets)} matrices in {len(p.tensors)} tensor(s)"
    )
    extra = "".join(f"\n{k}: {v}" for k, v in p.extras)
    if p.memory is not None:
        extra = "".join(f"\n{line}" for line in p.memory.lines()) + extra
    return head + "\n".join(lines) + tail + extra
