"""Plots of a sweep: metric vs trainable parameters with the Pareto front (``pareto.png``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write


def pareto_front(summary: Sequence[Mapping[str, Any]], higher_is_better: bool = True) -> list[str]:
    """Names of the configurations no other beats on both fewer-or-equal params and a better mean."""
    front = []
    sign = 1 if higher_is_better else -1
    for a in summary:
        dominated = any(
            b is not a
            and b["params"] <= a["params"]
            and sign * b["mean"] >= sign * a["mean"]
            and (b["params"] < a["params"] or sign * b["mean"] > sign * a["mean"])
            for b in summary
        )
        if not dominated:
            front.append(str(a["spec"]))
    return front


def _num(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _label(s: Mapping[str, Any], show_scale: bool) -> str:
    """A point's label: the spec, its learning rate (tuned or given) and, when the specs'
    scales differ, its scale."""
    lr, scale = _num(s.get("lr")), _num(s.get("scale"))
    extra = [f"lr {lr:.2g}"] if lr is not None else []
    if show_scale and scale is not None:
        extra.append(f"scale {scale:.2g}")
    return f"{s['spec']} ({', '.join(extra)})" if extra else str(s["spec"])


def plot_pareto(summary: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Metric vs trainable parameters (log x): mean ± std per spec, Pareto front, LoRA highlighted;
    each point labelled with its spec and learning rate (and scale when they differ)."""
    # a Figure of its own, not pyplot: no global backend switch, nothing left open in a notebook
    from matplotlib.figure import Figure

    metric = str(summary[0]["metric"]) if summary else "metric"
    higher = metric != "eval_loss" and metric != "train_loss"
    front = set(pareto_front(summary, higher))
    scales = {_num(s.get("scale")) for s in summary}
    show_scale = len(scales) > 1
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for s in summary:
        is_lora = s["factorization"] == "lora" and s["modes"] == "none"
        color = "tab:red" if is_lora else ("tab:blue" if s["spec"] in front else "tab:gray")
        ax.errorbar(
            s["params"],
            s["mean"],
            yerr=s["std"],
            fmt="*" if is_lora else "o",
            ms=14 if is_lora else 6,
            color=color,
            capsize=3,
            zorder=3 if is_lora else 2,
        )
        ax.annotate(
            _label(s, show_scale),
            (s["params"], s["mean"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    pts = sorted((s["params"], s["mean"]) for s in summary if s["spec"] in front)
    if pts:
        ax.step(
            [p for p, _ in pts],
            [m for _, m in pts],
            where="post",
            color="tab:blue",
            alpha=0.6,
            label="Pareto front",
        )
    ax.plot([], [], "*", color="tab:red", ms=12, label="LoRA")
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log scale)")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title or f"{metric} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path
