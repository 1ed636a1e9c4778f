"""Compiled vs eager training step of tensadapt adapters and PEFT LoRA (issue #10). Never imported
by the package.

Variants, each eager and under ``torch.compile(model)`` (inductor, the default backend):
``lorta`` (specs/lorta.yaml: CP over heads+qkv+depth on q, k, v, o), ``tenslora-qkv-depth``
(specs/tenslora-qkv-depth.yaml: Tucker over qkv+depth on q, k, v), both as a
:class:`~tensadapt.model.TensadaptModel`, and PEFT LoRA r=8 (alpha 16) on query/key/value. Base:
BERT 6 layers × 384 (the ``minilm`` preset config, random weights, no download), dropout off,
8 × 128 tokens, CPU, one process. Training step = forward + backward + AdamW step (the optimizer
runs eagerly in every variant; only the model is compiled).

Every variant gets its own copy of the same base weights, factors set to the same random non-zero
values in its eager and compiled copies. Before anything is timed, each compiled copy's output
and factor gradients are compared with its eager copy's (relative error printed; fails above
1e-4: inductor may reorder float sums). Warm-up steps (the compilation included) are not timed;
then rounds are interleaved (the order rotates every round) and every figure is the median of
per-round ratios, with the min-max over rounds.

Usage (appends a section to benchmarks/RESULTS.md unless --no-write):
    python benchmarks/bench_compile.py --rounds 7                          # wall clock, 2 threads
    python benchmarks/bench_compile.py --rounds 9 --threads 1 --clock cpu  # on a shared machine

On a machine other processes load, wall-clock steps swing several-fold from round to round;
``--clock cpu`` times this process's CPU seconds instead (with one thread, so that no thread's
spin-wait is counted), which such load barely changes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import base_config, fmt, machine, probe, rel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PRESET, BATCH, SEQ = "minilm", 8, 128
SPECS = {"lorta": "specs/lorta.yaml", "tenslora-qkv-depth": "specs/tenslora-qkv-depth.yaml"}
ADAPTERS = [*SPECS, "peft-lora"]
TOL = 1e-4


# -- models --------------------------------------------------------------------------------------
def build_base() -> nn.Module:
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(base_config(PRESET)).train()


def make(name: str, base: nn.Module) -> nn.Module:
    """A copy of ``base`` with adapter ``name``, its trainable factors set to fixed random values
    (the same in every copy)."""
    m = copy.deepcopy(base)
    if name == "peft-lora":
        import peft

        cfg = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "key", "value"], lora_dropout=0.0
        )
        model: nn.Module = peft.get_peft_model(m, cfg)
    else:
        from tensadapt.model import TensadaptModel

        model = TensadaptModel(m, ROOT / SPECS[name], seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


class Step:
    """forward + backward + AdamW step of ``run`` (the model or its compiled wrapper)."""

    def __init__(self, model: nn.Module, run: Any) -> None:
        self.run = run
        self.opt = torch.optim.AdamW(trainable(model), lr=1e-5)

    def __call__(self, ids: torch.Tensor) -> None:
        probe(self.run(input_ids=ids).last_hidden_state).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# -- checks ----------------------------------------------------------------------------------------
def check(eager: nn.Module, compiled_model: nn.Module, compiled: Any, ids: torch.Tensor) -> str:
    """Compiled vs eager: output and every trainable parameter's gradient (same values in both
    copies); the first compiled call compiles."""
    out = {}
    for key, m, run in (("eager", eager, eager), ("compiled", compiled_model, compiled)):
        y = run(input_ids=ids).last_hidden_state
        grads = torch.autograd.grad(probe(y), trainable(m))
        out[key] = (y.detach(), grads)
    eo = rel(out["compiled"][0], out["eager"][0])
    eg = max(rel(a, b) for a, b in zip(out["compiled"][1], out["eager"][1], strict=True))
    assert eo < TOL and eg < TOL, (eo, eg)
    return f"output rel err {eo:.1e}, grads {eg:.1e}"


# -- timing ----------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_rounds(
    fns: dict[str, Any], rounds: int, clock: str, warmup: int = 2
) -> dict[str, list[float]]:
    """Per-round seconds of every fn on ``clock`` (``wall``, or ``cpu``: this process's CPU
    time, which other processes on the machine barely disturb), the order rotating each round."""
    now = CLOCKS[clock]
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    res: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = now()
            fns[n]()
            res[n].append(now() - t0)
    return res


# -- main ------------------------------------------------------------------------------------------
def run(rounds: int, threads: int, clock: str) -> dict[str, Any]:
    torch.set_num_threads(threads)
    base = build_base()
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    steps: dict[str, Step] = {}
    checks: dict[str, str] = {}
    compile_s: dict[str, float] = {}
    for name in ADAPTERS:
        eager = make(name, base)
        comp_model = make(name, base)
        compiled = torch.compile(comp_model)
        t0 = time.perf_counter()
        checks[name] = check(eager, comp_model, compiled, ids)
        compile_s[name] = time.perf_counter() - t0
        steps[f"{name} eager"] = Step(eager, eager)
        steps[f"{name} compiled"] = Step(comp_model, compiled)
        print(f"{name}: {checks[name]} (compile + first calls {compile_s[name]:.0f} s)", flush=True)
    del base
    res = timed_rounds({k: (lambda s=s: s(ids)) for k, s in steps.items()}, rounds, clock)

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        rs = [x / y for x, y in zip(res[a], res[b], strict=True)]
        return statistics.median(rs), min(rs), max(rs)

    return {
        "checks": checks,
        "compile_s": compile_s,
        "step_ms": {k: 1000 * statistics.median(v) for k, v in res.items()},
        "compiled_vs_eager": {n: ratio(f"{n} compiled", f"{n} eager") for n in ADAPTERS},
        "vs_peft_compiled": {n: ratio(f"{n} compiled", "peft-lora compiled") for n in SPECS},
        "vs_peft_eager": {n: ratio(f"{n} eager", "peft-lora eager") for n in SPECS},
    }


def report(
    r: dict[str, Any], rounds: int, threads: int, clock: str, cmd: str, load: tuple[str, str]
) -> str:
    what = "wall-clock" if clock == "wall" else "CPU time of this process (`time.process_time`)"
    lines = [
        "## torch.compile: compiled vs eager training step, tensadapt vs PEFT LoRA (issue #10)",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `{cmd}`",
        "",
        f"Machine: {machine()}. Load average (1, 5, 15 min) before / after: {load[0]} / {load[1]}.",
        "",
        f"BERT 6 layers × 384 (`minilm` preset config, random weights), {BATCH} × {SEQ} tokens, "
        f"{threads} torch threads, one process, dropout off; times are {what}. "
        "Training step = forward + backward + "
        "AdamW step; `torch.compile(model)` with the default backend (inductor), optimizer eager. "
        f"{rounds} interleaved rounds after 2 untimed warm-up steps; median (min–max) of "
        "per-round ratios. `lorta` = specs/lorta.yaml (CP over heads+qkv+depth on q,k,v,o, r=8); "
        "`tenslora-qkv-depth` = specs/tenslora-qkv-depth.yaml (Tucker over qkv+depth on q,k,v, "
        "r=8); PEFT LoRA r=8 on query/key/value.",
        "",
        "Checks before timing (compiled vs eager copy, same factors): "
        + "; ".join(f"{k}: {v}" for k, v in r["checks"].items()),
        "",
        "| variant | eager step ms | compiled step ms | compiled ÷ eager | ÷ PEFT LoRA, both compiled | ÷ PEFT LoRA, both eager | compile + first calls s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in ADAPTERS:
        vs_c = fmt(r["vs_peft_compiled"][n]) if n in SPECS else "1"
        vs_e = fmt(r["vs_peft_eager"][n]) if n in SPECS else "1"
        lines.append(
            f"| {n} | {r['step_ms'][f'{n} eager']:.0f} | {r['step_ms'][f'{n} compiled']:.0f} | "
            f"{fmt(r['compiled_vs_eager'][n])} | {vs_c} | {vs_e} | {r['compile_s'][n]:.0f} |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: this process's CPU time (steadier on a shared machine; use with --threads 1, "
        "where no thread spins waiting for another)",
    )
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    torch.set_num_threads(a.threads)
    print(machine(), flush=True)
    print(f"load average before: {load0}", flush=True)
    r = run(a.rounds, a.threads, a.clock)
    load1 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = "python benchmarks/bench_compile.py " + " ".join(sys.argv[1:])
    text = report(r, a.rounds, a.threads, a.clock, cmd.strip(), (load0, load1))
    print(text)
    if not a.no_write:
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
