"""Training-step / inference / memory benchmark of tensadapt adapters against PEFT LoRA and the
peers' rebuild-per-call strategy (issue #6). Never imported by the package.

One process, every variant on the same base weights (copied from one randomly initialised model
built from a bundled preset config, no download), base dropout off, rounds interleaved (the
variant order rotates every round), and every figure is the median of per-round ratios to the
frozen base measured in the same round, with the min-max over rounds. Before anything is timed,
every variant is checked against a reference:

- tensadapt ``lora`` vs PEFT LoRA with the same A, B (BERT; GPT-2's PEFT LoRA is one fused c_attn
  matrix, a different adapter, so it is not compared there);
- every tensadapt variant's fast forward vs its straightforward contraction
  (:meth:`TensorAdapter.reference_update`, one einsum of x with every factor per target);
- the rebuild-per-call variant vs tensadapt ``lorta`` with the same factors.

Memory: peak RSS over a training step minus RSS before it, in a fresh subprocess per variant
(``/proc/self/clear_refs`` resets the high-water mark after a warm-up step), minus the same for the
frozen base. torch's CPU allocator keeps no statistics and tracemalloc does not see its buffers.

Usage (appends a section to benchmarks/RESULTS.md unless --no-write):
    python benchmarks/bench_step.py --models bert gpt2 --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
THREADS = 2

#: model key -> (preset, batch, seq, PEFT target modules, fan_in_fan_out)
MODELS: dict[str, tuple[str, int, int, list[str], bool]] = {
    "bert": ("minilm", 8, 128, ["query", "key", "value"], False),
    "gpt2": ("gpt2", 4, 128, ["c_attn"], True),
}
SPECS = {
    "lora": "specs/lora.yaml",
    "lorta": "specs/lorta.yaml",
    "lorta-qkv": "specs/lorta.yaml",
    "tenslora-qkv-depth": "specs/tenslora-qkv-depth.yaml",
    "tt-qkv-depth": "specs/tt-qkv-depth.yaml",
    "rebuild-lorta": "specs/lorta.yaml",
}
VARIANTS = ["base", "peft-lora", *SPECS]


# -- models ------------------------------------------------------------------------------------
def base_config(preset: str) -> Any:
    from tensadapt.arch import preset_config

    cfg = preset_config(preset)
    for k in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
    ):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    return cfg


def build_base(preset: str) -> nn.Module:
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(base_config(preset)).train()


def spec_for(name: str, dropout: float = 0.0) -> dict[str, Any]:
    from tensadapt.spec import load_spec

    d = load_spec(ROOT / SPECS[name]).to_dict()
    d["dropout"] = dropout
    if name == "lorta-qkv":
        d["targets"] = ["q", "k", "v"]
    return d


def make_variant(name: str, base: nn.Module, model_key: str) -> nn.Module:
    """A copy of ``base`` carrying variant ``name`` (factors non-zero so updates are real)."""

    m = copy.deepcopy(base)
    if name == "base":
        for n, p in m.named_parameters():
            p.requires_grad_(n.endswith("bias"))  # backward still reaches layer 0
        return m
    if name == "peft-lora":
        import peft

        _, _, _, targets, fifo = MODELS[model_key]
        cfg = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=fifo
        )
        pm = peft.get_peft_model(m, cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return pm
    from tensadapt.model import TensadaptModel

    m = TensadaptModel(m, spec_for(name), seed=0)  # its forward opens the executor's frame
    ad = adapter_of(m)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if name.startswith("rebuild"):
        use_rebuild(m)
    return m


def adapter_of(m: nn.Module) -> Any:
    from tensadapt.model import get_adapter

    return get_adapter(m)


def use_rebuild(m: nn.Module) -> None:
    """The peers' strategy: on every call, reconstruct the whole update tensor, slice this
    target's ΔW out of it and apply it with ``F.linear`` (LoRTA / TensLoRA reference code)."""
    from tensadapt.factorizations.base import Network, reconstruct

    ad = adapter_of(m)

    def add_updates(
        targets: Any, x: torch.Tensor, y: torch.Tensor, inplace: bool, frame: Any
    ) -> torch.Tensor:
        ups = []
        for t in targets:
            tp = ad.plan.tensor(t.tensor)
            pd = ad.factors[tp.name]
            net = Network(tp.factors, tp.axis_legs, tp.leg_sizes, tp.zero_factor)
            full = reconstruct(net, dict(pd.items()))  # the whole tensor, every call
            dw = delta_from_full(full, tp, t) * ad.scaling  # [out, in]
            ups.append((t, F.linear(ad.dropout(x), dw)))
        return y + place(ups, y)

    ad.add_updates = add_updates


def delta_from_full(full: torch.Tensor, tp: Any, t: Any) -> torch.Tensor:
    """ΔW ``[out, in]`` of target ``t`` indexed out of the full reconstructed tensor."""
    names = [a.name for a in tp.axes]
    idx: list[Any] = [slice(None)] * len(names)
    for axis, i in t.index:
        idx[names.index(axis)] = i
    mat = full[tuple(idx)]
    kept = [n for n in names if n not in dict(t.index)]
    if "heads" in kept:
        mat = mat.permute(kept.index("in"), kept.index("heads"), kept.index("head_dim")).reshape(
            mat.shape[0], -1
        )
    return mat if t.transposed else mat.t()


def place(ups: list[tuple[Any, torch.Tensor]], y: torch.Tensor) -> torch.Tensor:
    """Updates placed at their output columns of a ``y``-shaped tensor (zeros elsewhere)."""
    width = y.shape[-1]
    pieces, pos = [], 0
    for t, u in sorted(ups, key=lambda tu: (tu[0].out_slice or (0, 0))[0]):
        a, b = t.out_slice or (0, width)
        if a > pos:
            pieces.append(y.new_zeros(*y.shape[:-1], a - pos))
        pieces.append(u)
        pos = b
    if pos < width:
        pieces.append(y.new_zeros(*y.shape[:-1], width - pos))
    return torch.cat(pieces, dim=-1)


def use_reference(m: nn.Module) -> Callable[[], None]:
    """Switch ``m`` to the straightforward contraction; returns the function that switches back."""
    ad = adapter_of(m)

    def add_updates(
        targets: Any, x: torch.Tensor, y: torch.Tensor, inplace: bool, frame: Any
    ) -> torch.Tensor:
        return y + place([(t, ad.reference_update(t, x)) for t in targets], y)

    ad.add_updates = add_updates
    return lambda: delattr(ad, "add_updates")


def set_adapter_dropout(m: nn.Module, p: float) -> None:
    drop: nn.Module = nn.Dropout(p) if p > 0 else nn.Identity()
    if hasattr(m, "tensadapt_adapters"):
        ad = adapter_of(m)
        ad.dropout = drop
        ad.dropout_p = p
    else:
        for mod in m.modules():
            if hasattr(mod, "lora_dropout"):
                for k in list(mod.lora_dropout.keys()):
                    mod.lora_dropout[k] = copy.deepcopy(drop)


# -- checks ------------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(models: dict[str, nn.Module], ids: torch.Tensor, key: str) -> dict[str, str]:
    """Every variant against its reference (outputs and, for the fast path, gradients)."""
    out: dict[str, str] = {}

    def fwd(m: nn.Module) -> torch.Tensor:
        return m(input_ids=ids).last_hidden_state

    for name, m in models.items():
        if name in ("base", "peft-lora"):
            continue
        ref_name = "lorta" if name.startswith("rebuild") else name
        if name.startswith("rebuild"):
            with torch.no_grad():
                got, want = fwd(m), fwd(models[ref_name])
            e = rel(got, want)
            out[name] = f"vs tensadapt lorta (same factors): rel err {e:.1e}"
            assert e < 1e-4, (name, e)
            continue
        params = [p for p in adapter_of(m).parameters()]
        y = fwd(m)
        g = torch.autograd.grad(probe(y), params)
        back = use_reference(m)
        y_ref = fwd(m)
        g_ref = torch.autograd.grad(probe(y_ref), params)
        back()
        eo = rel(y.detach(), y_ref.detach())
        eg = max(rel(a, b) for a, b in zip(g, g_ref, strict=True))
        out[name] = f"vs straightforward contraction: output rel err {eo:.1e}, grads {eg:.1e}"
        assert eo < 1e-4 and eg < 1e-3, (name, eo, eg)
    if key == "bert" and "peft-lora" in models and "lora" in models:
        out["lora-vs-peft"] = check_peft(models["lora"], models["peft-lora"], ids)
    return out


def check_peft(ours: nn.Module, ref: nn.Module, ids: torch.Tensor) -> str:
    """Copy PEFT's A, B into tensadapt ``lora`` (same base weights) and compare outputs."""
    ad = adapter_of(ours)
    proj = {"q": "query", "k": "key", "v": "value"}
    saved = {n: p.detach().clone() for n, p in ad.named_parameters()}
    with torch.no_grad():
        for t in ad.plan.targets:
            mod = ref.get_submodule(
                f"base_model.model.encoder.layer.{t.layer}.attention.self.{proj[t.proj]}"
            )
            ad.factors[t.tensor]["A"].copy_(mod.lora_A["default"].weight.t())
            ad.factors[t.tensor]["B"].copy_(mod.lora_B["default"].weight)
        e = rel(ours(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)
        for n, p in ad.named_parameters():
            p.copy_(saved[n])
    assert e < 1e-4, e
    return f"tensadapt lora vs PEFT LoRA (copied A, B): rel err {e:.1e}"


# -- timing ------------------------------------------------------------------------------------
def probe(y: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every output (the square of a LayerNorm output is ~constant)."""
    w = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(2))
    return (y.float() * w.to(y.device)).sum(-1).square().mean()


def loss_of(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return probe(m(input_ids=ids).last_hidden_state)


class Trainer:
    def __init__(self, m: nn.Module) -> None:
        self.m = m
        self.opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

    def step(self, ids: torch.Tensor) -> None:
        self.m.train()
        loss_of(self.m, ids).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def infer(m: nn.Module, ids: torch.Tensor) -> None:
    m.eval()
    with torch.inference_mode():
        m(input_ids=ids)


def timed_rounds(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Per-round seconds of every fn, order rotating each round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    res: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            res[n].append(time.perf_counter() - t0)
    return res


def ratios(
    res: dict[str, list[float]], base: str = "base"
) -> dict[str, tuple[float, float, float]]:
    out = {}
    for n, ts in res.items():
        rs = [a / b for a, b in zip(ts, res[base], strict=True)]
        out[n] = (statistics.median(rs), min(rs), max(rs))
    return out


# -- memory (subprocess per variant) -----------------------------------------------------------
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(key: str, variant: str) -> None:
    torch.set_num_threads(THREADS)
    preset, b, s, _, _ = MODELS[key]
    base = build_base(preset)
    m = make_variant(variant, base, key)
    del base
    ids = torch.randint(0, 1000, (b, s), generator=torch.Generator().manual_seed(0))
    tr = Trainer(m)
    tr.step(ids)
    tr.step(ids)
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    tr.step(ids)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"extra_kb": peak - before}))


def memory(key: str, variants: list[str]) -> dict[str, float]:
    out = {}
    for v in variants:
        p = subprocess.run(
            [sys.executable, __file__, "--memory-child", key, v],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
        )
        out[v] = json.loads(p.stdout.strip().splitlines()[-1])["extra_kb"] / 1024
    return {v: out[v] - out["base"] for v in variants}


# -- planner figures ---------------------------------------------------------------------------
def planner_figures(m: nn.Module, tokens: int, step_s: float) -> dict[str, float]:
    from tensadapt import contract
    from tensadapt.costs import route_path_flops
    from tensadapt.executor import Executor
    from tensadapt.model import adapted_modules
    from tensadapt.planner import plan

    ad = adapter_of(m)
    ours = opt = 0.0
    worst = 0.0
    for t in ad.plan.targets:
        a, b = route_path_flops(t, ad.plan.tensor(t.tensor), tokens)
        ours, opt, worst = ours + a, opt + b, max(worst, a / b)
    contract._build.cache_clear()
    t0 = time.perf_counter()
    plan(ad.plan.spec, m)  # every contract_path of the plan (stages, routes, deltas)
    t_plan = time.perf_counter() - t0
    contract._build.cache_clear()
    t0 = time.perf_counter()  # the executor's planning: contractions, slices, module programs
    ex = Executor(ad)
    for _, mod in adapted_modules(m.base_model):
        ex.program(mod.adapter_targets["default"])
    t_shape = time.perf_counter() - t0
    return {
        "flops_ratio": ours / opt,
        "flops_ratio_worst": worst,
        "plan_s": t_plan,
        "shape_s": t_shape,
        "search_pct": 100 * (t_plan + t_shape) / step_s,
    }


# -- main --------------------------------------------------------------------------------------
def machine() -> str:
    import opt_einsum
    import transformers

    try:
        import peft

        pv = peft.__version__
    except ImportError:  # pragma: no cover
        pv = "n/a"
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (
        f"{platform.node()} / {cpu} / {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        f" / Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {pv}, opt_einsum {opt_einsum.__version__}"
    )


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.3f} ({r[1]:.2f}–{r[2]:.2f})"


def run_model(key: str, rounds: int, with_memory: bool) -> dict[str, Any]:
    preset, b, s, _, _ = MODELS[key]
    base = build_base(preset)
    ids = torch.randint(0, 1000, (b, s), generator=torch.Generator().manual_seed(0))
    models = {v: make_variant(v, base, key) for v in VARIANTS}
    del base
    checks = check(models, ids, key)
    out: dict[str, Any] = {"checks": checks, "tokens": b * s}

    trainers = {v: Trainer(m) for v, m in models.items()}
    res = timed_rounds({v: (lambda tr=tr: tr.step(ids)) for v, tr in trainers.items()}, rounds)
    out["train"] = ratios(res)
    out["train_s"] = {v: statistics.median(ts) for v, ts in res.items()}

    # the peers' rebuild is timed in the plain training step and unmerged inference only (its
    # dropout step costs the same rebuild; merged it is lorta): keeps a GPT-2 run in minutes
    fast = {v: tr for v, tr in trainers.items() if not v.startswith("rebuild")}
    for m in models.values():
        set_adapter_dropout(m, 0.1)
    res = timed_rounds({v: (lambda tr=tr: tr.step(ids)) for v, tr in fast.items()}, rounds)
    out["train_dropout"] = ratios(res)
    for m in models.values():
        set_adapter_dropout(m, 0.0)

    res = timed_rounds({v: (lambda m=m: infer(m, ids)) for v, m in models.items()}, rounds)
    out["infer"] = ratios(res)

    import tensadapt as ta

    for v, m in models.items():
        if v == "peft-lora":
            m.merge_adapter()
        elif v in fast and v != "base":
            ta.merge(m)
    res = timed_rounds(
        {v: (lambda m=m: infer(m, ids)) for v, m in models.items() if v in fast}, rounds
    )
    out["merged"] = ratios(res)
    for v, m in models.items():
        if v == "peft-lora":
            m.unmerge_adapter()
        elif v in fast and v != "base":
            ta.unmerge(m)

    step = out["train_s"]["base"]
    out["planner"] = {
        v: planner_figures(models[v], b * s, step)
        for v in ("lora", "lorta", "lorta-qkv", "tenslora-qkv-depth", "tt-qkv-depth")
    }
    if with_memory:
        out["memory_mb"] = memory(key, VARIANTS)
    return out


def report(all_res: dict[str, dict[str, Any]], rounds: int, cmd: str, load: tuple[str, str]) -> str:
    lines = [
        "## Issue #6: training step, inference and memory vs frozen base and PEFT LoRA",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `{cmd}`",
        "",
        f"Machine: {machine()}. Load average before / after: {load[0]} / {load[1]} "
        "(other sessions were running tests on the same 2 cores: per-round ratios, interleaved "
        "rounds; the min–max columns show how noisy it was).",
        "",
        f"{rounds} interleaved rounds; figures are median (min–max) of per-round ratios to the "
        "frozen base (only biases trainable) in the same round. Training step = forward + "
        "backward + AdamW step, base dropout off; 'dropout' = adapter dropout 0.1. Inference in "
        "`torch.inference_mode`. BERT = minilm preset (6 layers, 384 wide, 12 heads), 8×128 "
        "tokens; GPT-2 = gpt2 preset (small), 4×128 tokens. PEFT LoRA r=8, alpha 16: on "
        "query/key/value for BERT, on the fused c_attn for GPT-2. `lorta` = CP over "
        "heads+qkv+depth on q,k,v,o; `lorta-qkv` the same on q,k,v only; `rebuild-lorta` = lorta "
        "with the peers' forward (whole CP tensor rebuilt per call, sliced, F.linear).",
        "",
    ]
    for key, r in all_res.items():
        lines += [f"### {key} ({r['tokens']} tokens)", ""]
        lines += [
            "Checks before timing: " + "; ".join(f"{k}: {v}" for k, v in r["checks"].items()),
            "",
        ]
        head = "| variant | train step ÷ base | ÷ PEFT LoRA | train, dropout 0.1 ÷ base | inference unmerged ÷ base | merged ÷ base |"
        if "memory_mb" in r:
            head += " extra peak MB over base |"
        lines += [head, "|" + " --- |" * (head.count("|") - 1)]
        peft_t = r["train"]["peft-lora"][0]
        for v in VARIANTS:
            row = (
                f"| {v} | {fmt(r['train'][v])} | {r['train'][v][0] / peft_t:.3f} | "
                f"{fmt(r['train_dropout'][v]) if v in r['train_dropout'] else '—'} | "
                f"{fmt(r['infer'][v])} | {fmt(r['merged'][v]) if v in r['merged'] else '—'} |"
            )
            if "memory_mb" in r:
                row += f" {r['memory_mb'][v]:.0f} |"
            lines.append(row)
        lines += [
            "",
            f"Frozen-base training step: {r['train_s']['base'] * 1000:.0f} ms (median).",
            "",
            "| spec | planner FLOPs ÷ opt_einsum optimal (total; worst target) | plan() s | executor build s | path search ÷ one base step |",
            "| --- | --- | --- | --- | --- |",
        ]
        for v, p in r["planner"].items():
            lines.append(
                f"| {v} | {p['flops_ratio']:.3f}; {p['flops_ratio_worst']:.3f} | {p['plan_s']:.3f} | "
                f"{p['shape_s']:.4f} | {p['search_pct']:.2f} % |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also dump the raw figures here")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"))
    a = ap.parse_args()
    if a.memory_child:
        memory_child(*a.memory_child)
        return
    torch.set_num_threads(THREADS)
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(machine(), flush=True)
    all_res = {}
    for key in a.models:
        t0 = time.perf_counter()
        all_res[key] = run_model(key, a.rounds, not a.no_memory)
        print(f"{key}: {time.perf_counter() - t0:.0f} s", flush=True)
        print(json.dumps(all_res[key], default=str), flush=True)
    load1 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    text = report(all_res, a.rounds, cmd.strip(), (load0, load1))
    print(text)
    if a.json:
        a.json.write_text(json.dumps(all_res, indent=1, default=str))
    if not a.no_write:
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)  # re-read right before writing


if __name__ == "__main__":
    main()
