"""A mixture-of-experts training step with an ``experts``-mode adapter against the frozen base
(issue 13). Never imported by the package.

A small Mixtral-shaped model built from a config (random weights, no download), one process, the
same base weights for every variant, rounds interleaved (the order rotates every round), every
figure the median of per-round ratios to the frozen base step measured in the same round, with
the min–max over rounds. The frozen base trains only its RMSNorm weights (so a backward runs
through the whole network); the adapted variants train only their factors. The base's experts
run transformers' default experts implementation (``grouped_mm``) and, as a second baseline,
its ``eager`` loop over the hit experts -- the form tensadapt's routed forward takes.

Usage (appends a section to benchmarks/RESULTS.md unless --no-write):
    python benchmarks/bench_moe.py --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
THREADS = 2
CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=1000,
    max_position_embeddings=256,
)
BATCH, SEQ = 4, 128
EXPERTS = ["expert_gate", "expert_up", "expert_down"]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "base (grouped_mm)": None,
    "base (eager)": None,
    "cp experts+depth r8": {"factorization": "cp", "modes": ["experts", "depth"], "rank": 8},
    "tucker qkv+experts+depth r4": {
        "factorization": "tucker",
        "modes": ["qkv", "experts", "depth"],
        "rank": 4,
    },
    "lora per expert r8": {"factorization": "lora", "modes": [], "rank": 8},
}


def build(impl: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", **CONFIG)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def variants() -> dict[str, nn.Module]:
    from tensadapt.model import TensadaptModel

    ref = build("grouped_mm")
    out: dict[str, nn.Module] = {}
    for name, spec in VARIANTS.items():
        m = copy.deepcopy(ref)
        if name == "base (eager)":
            m.config._experts_implementation = "eager"
        if spec is None:
            for n, p in m.named_parameters():
                p.requires_grad_("norm" in n)
            out[name] = m
            continue
        tm = TensadaptModel(m, {**spec, "targets": EXPERTS}, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in tm.adapter().parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out[name] = tm
    return out


def check(models: dict[str, nn.Module], ids: torch.Tensor) -> str:
    """Each adapted variant's output equals the same model merged (the routed update is the
    dense ΔW per expert); both bases agree."""
    lines = []
    with torch.no_grad():
        a = models["base (grouped_mm)"](input_ids=ids).logits
        b = models["base (eager)"](input_ids=ids).logits
        lines.append(f"bases agree: {float((a - b).norm() / b.norm()):.1e}")
        for name, m in models.items():
            if not hasattr(m, "merge_adapter"):
                continue
            y = m(input_ids=ids).logits
            m.merge_adapter()
            z = m(input_ids=ids).logits
            m.unmerge_adapter()
            lines.append(f"{name}: routed vs merged {float((y - z).norm() / z.norm()):.1e}")
    return "; ".join(lines)


class Step:
    def __init__(self, m: nn.Module) -> None:
        self.m = m
        self.opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self, ids: torch.Tensor) -> None:
        self.m.train()
        loss = self.m(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(
    fns: dict[str, Callable[[], None]], rounds: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for fn in fns.values():  # warm-up
        fn()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (2)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared machine, "
        "with --threads 1)",
    )
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    sys.path.insert(0, str(ROOT))
    models = variants()
    ids = torch.randint(
        0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    checks = check(models, ids)
    steps = {n: Step(m) for n, m in models.items()}
    times = timed({n: (lambda s=s: s(ids)) for n, s in steps.items()}, a.rounds, clock)
    base = times["base (grouped_mm)"]
    eager = times["base (eager)"]
    rows = []
    for n, ts in times.items():
        r1 = [t / b for t, b in zip(ts, base, strict=True)]
        r2 = [t / b for t, b in zip(ts, eager, strict=True)]
        params = sum(p.numel() for p in models[n].parameters() if p.requires_grad)
        rows.append(
            f"| {n} | {params:,} | {statistics.median(ts) * 1000:.0f} | "
            f"{statistics.median(r1):.3f} ({min(r1):.2f}–{max(r1):.2f}) | "
            f"{statistics.median(r2):.3f} ({min(r2):.2f}–{max(r2):.2f}) |"
        )
    load = os.getloadavg()
    cmd = (
        f"python benchmarks/bench_moe.py --rounds {a.rounds} --threads {a.threads} "
        f"--clock {a.clock}"
    )
    text = "\n".join(
        [
            "",
            "## Mixture-of-experts training step (issue 13)",
            "",
            f"Reproduce: `{cmd}` ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"{a.threads} thread(s), {a.clock} clock, torch {torch.__version__}, load {load[0]:.1f}). Mixtral-shaped: "
            f"d={CONFIG['hidden_size']}, I={CONFIG['intermediate_size']}, "
            f"{CONFIG['num_local_experts']} experts top-{CONFIG['num_experts_per_tok']}, "
            f"{CONFIG['num_hidden_layers']} layers, batch {BATCH} × {SEQ} tokens; medians of "
            f"{a.rounds} interleaved rounds, ratios per round (min–max).",
            "",
            f"Checks: {checks}.",
            "",
            "| variant | trainable | step ms | ÷ frozen base (grouped_mm) | ÷ frozen base (eager loop) |",
            "| --- | ---: | ---: | --- | --- |",
            *rows,
            "",
        ]
    )
    print(text)
    if not a.no_write:
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
