"""Init time (svd / mpo) next to tensorly called directly, and forward time with an NF4 residual.

Model: a 12-layer, 768-wide BERT (``roberta-base`` preset) built from its config, random weights.
Targets q, k, v of every layer.

1. Init: tensadapt's pretrained init of every tensor (stacking W0, tensorly decomposition, mapping
   onto the factors, padding) vs the bare tensorly call on the same stacked tensors.
2. Forward: the same MPO adapter (QDoTA, N = 5, R = 16) with the residual in NF4 vs in fp32, and the
   plain fp32 base model; min over repeats, interleaved. bitsandbytes' own ``Linear4bit`` in place of
   every q, k, v as a reference when it runs on this machine.

Run: python benchmarks/bench_init.py [--part init|forward|all] [--threads 1]
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def build() -> torch.nn.Module:
    from transformers import AutoModel

    from tensadapt.arch import preset_config

    torch.manual_seed(0)
    return AutoModel.from_config(preset_config("roberta-base")).eval()


def bench_init() -> list[str]:
    import tensorly as tl
    from tensorly.decomposition import tensor_train, tucker
    from tensorly.tenalg import svd_interface

    from tensadapt.factorizations.base import Network
    from tensadapt.init import decompose, pretrained_tensor, target_matrix
    from tensadapt.model import adapted_modules
    from tensadapt.planner import plan

    model = build()
    specs = {
        "lora svd (PiSSA, r=16, per matrix)": dict(factorization="lora", modes=[], rank=16),
        "tucker svd (qkv+depth, r=16)": dict(
            factorization="tucker", modes=["qkv", "depth"], rank=16
        ),
        "tt svd (qkv+depth, r=16)": dict(factorization="tt", modes=["qkv", "depth"], rank=16),
        "mpo (DoTA, N=5, R=16, per matrix)": dict(
            factorization="mpo", modes=[], rank=16, options={"n_cores": 5}
        ),
    }
    rows = [
        "| init | tensors | tensadapt decompose (s) | tensorly direct (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    for label, kw in specs.items():
        spec = {"targets": ["q", "k", "v"], **kw}
        p = plan(spec, model)
        import tensadapt as ta

        m2 = copy.deepcopy(model)
        ta.inject(m2, p)
        mods = adapted_modules(m2)
        mats = {t.key: target_matrix(t, m.weight) for _, m in mods for t in m.targets}
        fulls = []
        for tp in p.tensors:
            ts = [t for t in p.targets if t.tensor == tp.name]
            net = Network(tp.factors, tp.axis_legs, tp.leg_sizes, tp.zero_factor)
            fulls.append((tp, net, pretrained_tensor(tp, ts, mats)))
        t0 = time.perf_counter()
        for _tp, net, full in fulls:
            decompose(kw["factorization"], net, full)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        with tl.backend_context("pytorch"):
            for tp, _net, full in fulls:
                if kw["factorization"] == "lora":
                    svd_interface(full.reshape(full.shape[0], -1), n_eigenvecs=16)
                elif kw["factorization"] == "tucker":
                    tucker(full, rank=[min(16, s) for s in full.shape], n_iter_max=10, tol=1e-7)
                elif kw["factorization"] == "tt":
                    tensor_train(full, rank=[1] + [16] * (full.dim() - 1) + [1])
                else:  # MPO = TT-SVD of (i1 j1)(i2 j2)... exactly as DoTA's Algorithm 1
                    legs = [g for _, ls in tp.axis_legs for g in ls]
                    sizes = dict(tp.leg_sizes)
                    n = len(legs) // 2
                    x = full.reshape([sizes[g] for g in legs])
                    x = x.permute([k for i in range(n) for k in (i, n + i)])
                    x = x.reshape([sizes[legs[i]] * sizes[legs[n + i]] for i in range(n)])
                    tensor_train(x, rank=[1] + [16] * (n - 1) + [1])
        direct = time.perf_counter() - t0
        rows.append(f"| {label} | {len(fulls)} | {ours:.3f} | {direct:.3f} | {ours / direct:.2f} |")
        # whole inject (planning, stacking, decomposition, residual) for the record
    return rows


def _time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_forward(batch: int = 8, seq: int = 128, reps: int = 7) -> list[str]:
    import tensadapt as ta
    from tensadapt.model import get_adapter

    base = build()
    spec = dict(
        factorization="mpo", targets=["q", "k", "v"], rank=16, init="mpo", options={"n_cores": 5}
    )
    fp = ta.inject(copy.deepcopy(base), {**spec, "residual": "frozen"})
    q = ta.inject(copy.deepcopy(base), {**spec, "residual": "nf4"})
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    models = {"fp32 base (no adapter)": base, "DoTA, fp32 residual": fp, "QDoTA, NF4 residual": q}
    try:  # bitsandbytes' own 4-bit linear in place of q, k, v (reference)
        import bitsandbytes as bnb

        ref = copy.deepcopy(base)
        for layer in ref.encoder.layer:
            for name in ("query", "key", "value"):
                lin = getattr(layer.attention.self, name)
                m = bnb.nn.Linear4bit(
                    768, 768, bias=True, quant_type="nf4", compute_dtype=torch.float32
                )
                m.load_state_dict(lin.state_dict())
                m = m.to("cpu")
                setattr(layer.attention.self, name, m)
        with torch.no_grad():
            ref(input_ids=ids)
        models["fp32 base, bnb Linear4bit q,k,v"] = ref
    except Exception as e:  # pragma: no cover - depends on the bnb build
        print(f"bitsandbytes Linear4bit reference skipped: {e}")
    times = {k: float("inf") for k in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids)
        for _ in range(reps):  # interleaved, so load changes hit every variant alike
            for k, m in models.items():
                times[k] = min(times[k], _time(lambda m=m: m(input_ids=ids), 1))
        out_b = base(input_ids=ids).last_hidden_state
        out_q = q(input_ids=ids).last_hidden_state
    rel = float((out_q - out_b).norm() / out_b.norm())
    rows = [
        f"| model (batch {batch} × seq {seq}) | forward (ms) | ÷ DoTA fp32 residual | ÷ fp32 base |",
        "|---|---|---|---|",
    ]
    for k, t in times.items():
        rows.append(
            f"| {k} | {1000 * t:.1f} | {t / times['DoTA, fp32 residual']:.3f} | "
            f"{t / times['fp32 base (no adapter)']:.3f} |"
        )
    rep = get_adapter(q).init_report
    rows.append("")
    rows.append(
        f"QDoTA step-0 output error ‖y−y_base‖/‖y_base‖ = {rel:.2e}; {rep}".replace("\n", "; ")
    )
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["init", "forward", "all"], default="all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.part in ("init", "all"):
        print("\n".join(bench_init()))
        print()
    if args.part in ("forward", "all"):
        print("\n".join(bench_forward()))
