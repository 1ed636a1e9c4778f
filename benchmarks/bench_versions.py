"""Eager training step of tensadapt adapters across git versions of the package: is a new
executor slower than an old one? Never imported by the package.

Each version's ``tensadapt/`` is exported with ``git archive`` into a temporary directory; child
processes (one per version and repetition, versions interleaved) each time the frozen base and
every spec on the same weights, rounds interleaved, and report per-round ratios spec ÷ frozen base
(only biases trainable). BERT 6 layers × 384 (``minilm`` preset config, random weights), 8 × 128
tokens, one torch thread, CPU time of the child (``time.process_time``: other processes on a
shared machine barely change it). A version without :class:`~tensadapt.model.TensadaptModel`
is adapted in place with ``inject`` (its own fast path).

Usage:
    python benchmarks/bench_versions.py b534479 13b2341 HEAD --reps 4 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("lorta", "tenslora-qkv-depth")


def child(rounds: int) -> None:
    import copy

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_step import base_config, probe
    from transformers import AutoModel

    import tensadapt as ta

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = AutoModel.from_config(base_config("minilm")).train()
    try:
        from tensadapt.model import TensadaptModel

        def adapt(m: torch.nn.Module, spec: Path) -> torch.nn.Module:
            return TensadaptModel(m, spec, seed=0)
    except ImportError:  # an older version: in place

        def adapt(m: torch.nn.Module, spec: Path) -> torch.nn.Module:
            return ta.inject(m, str(spec), seed=0)

    frozen = copy.deepcopy(base)
    for n, p in frozen.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    models = {"base": frozen}
    for name in SPECS:
        m = adapt(copy.deepcopy(base), ROOT / "specs" / f"{name}.yaml")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        models[name] = m.train()
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for k, m in models.items()
    }

    def step(k: str) -> None:
        probe(models[k](input_ids=ids).last_hidden_state).backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)

    for k in models:
        step(k)
    res: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.process_time()
            step(k)
            res[k].append(time.process_time() - t0)
    ratios = {k: [a / b for a, b in zip(v, res["base"], strict=True)] for k, v in res.items()}
    print(json.dumps({**ratios, "base_s": res["base"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commits", nargs="+")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.rounds)
        return
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    found: dict[str, dict[str, list[float]]] = {c: {} for c in a.commits}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for c in a.commits:
            d = Path(tmp) / c
            d.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", c, "tensadapt"], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(d)], input=archive, check=True)
            trees[c] = d
        for _ in range(a.reps):
            for c in a.commits:
                env = {**os.environ, "PYTHONPATH": str(trees[c]), "OMP_NUM_THREADS": "1"}
                out = subprocess.run(
                    [sys.executable, __file__, "--child", "--rounds", str(a.rounds), "x"],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                    cwd=tmp,
                ).stdout
                for k, v in json.loads(out.strip().splitlines()[-1]).items():
                    found[c].setdefault(k, []).extend(v)
    load1 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average before / after: {load0} / {load1}")
    print("| version | " + " | ".join(f"{s} ÷ frozen base" for s in SPECS) + " | frozen base s |")
    print("| --- |" + " --- |" * (len(SPECS) + 1))
    for c in a.commits:
        cells = [
            f"{statistics.median(found[c][s]):.3f} ({min(found[c][s]):.2f}–{max(found[c][s]):.2f})"
            for s in SPECS
        ]
        base_s = statistics.median(found[c]["base_s"])
        print(f"| {c} | " + " | ".join(cells) + f" | {base_s:.3f} |")


if __name__ == "__main__":
    main()
