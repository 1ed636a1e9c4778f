"""``tensadapt demo``: the README's main job (a plan table, an enumerate table, a short run)."""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from ..spec import load_spec
from .data import DataOptions
from .encode import prepare
from .options import TrainOptions
from .trainer import train

_POSITIVE = [
    "a wonderful , moving film",
    "great acting and a clever story",
    "i loved every minute of it",
    "funny , warm and beautifully made",
    "an excellent and touching performance",
    "the best film of the year",
    "a delightful surprise",
    "smart , charming and fun",
]
_NEGATIVE = [
    "a boring , tedious mess",
    "terrible acting and a dull story",
    "i hated every minute of it",
    "flat , cold and badly made",
    "an awful and lifeless performance",
    "the worst film of the year",
    "a painful disappointment",
    "stupid , dreary and slow",
]


def synthetic_sentiment(n: int, seed: int = 0) -> list[tuple[int, str]]:
    """``n`` ``(label, sentence)`` pairs from small positive/negative phrase banks (demo fallback)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        bank = _POSITIVE if label else _NEGATIVE
        out.append((label, f"{rng.choice(bank)} , {rng.choice(bank)}"))
    rng.shuffle(out)
    return out


def shared_data_dir() -> Path:
    """``../shared/data`` relative to the repository root (where the SST-2 TSVs live)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def run_demo(steps: int = 60, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """The main job: a plan table, a short enumerate table, then a short training run.

    A ``minilm``-shaped BERT with random weights (from its preset config), a WordPiece tokenizer
    trained on the fly, Tucker qkv+depth, on SST-2 from ``../shared/data/sst2`` when present
    (else a built-in synthetic sentiment set). No downloads; about a minute on 2 CPU cores.
    """
    from ..enumerate import enumerate_configs, format_table
    from ..planner import plan

    t0 = time.perf_counter()
    spec = load_spec(
        {
            "name": "tenslora-qkv-depth",
            "factorization": "tucker",
            "targets": ["q", "k", "v"],
            "modes": ["qkv", "depth"],
            "rank": {"in": 8, "out": 8, "qkv": 3, "depth": 6},
            "alpha": 16,
        }
    )
    print("== 1. plan: TensLoRA Tucker over [qkv, depth] on minilm (config only, no weights)\n")
    print(plan(spec, "minilm"))
    print("\n== 2. enumerate: every mode subset for CP and Tucker at rank 8 (isorank)\n")
    e = enumerate_configs("minilm", rank=8, factorizations=["lora", "cp", "tucker"])
    print(format_table(e, limit=12))
    sst2 = shared_data_dir() / "sst2"
    with tempfile.TemporaryDirectory(prefix="tensadapt-demo-") as tmp:
        if (sst2 / "train.tsv").exists() and (sst2 / "dev.tsv").exists():
            train_path, dev_path = sst2 / "train.tsv", sst2 / "dev.tsv"
            where = f"SST-2 from {sst2}"
            n_train, n_dev = 2000, 872
            expect = (
                "random-weight model: expect little above chance; a pretrained model learns far "
                "more: see benchmarks/sst2_experiment.py"
            )
        else:
            pairs = synthetic_sentiment(1200, seed)
            train_path, dev_path = Path(tmp) / "train.tsv", Path(tmp) / "dev.tsv"
            for pth, part in ((train_path, pairs[:1000]), (dev_path, pairs[1000:])):
                pth.write_text("label\tsentence\n" + "".join(f"{lab}\t{s}\n" for lab, s in part))
            where = "a built-in synthetic sentiment set (SST-2 not found)"
            n_train, n_dev = 1000, 200
            expect = (
                "the synthetic set is easy: each sentence is two phrases from its label's small "
                "phrase bank; on SST-2 a random-weight model gets little above chance"
            )
        print(
            f"\n== 3. train: minilm preset (random weights) + Tucker qkv+depth, {steps} steps on "
            f"{where}\n"
        )
        prepared = prepare(
            "minilm",
            train_path,
            dev_path,
            DataOptions(max_length=48, max_train=n_train, max_eval=n_dev),
        )
        print(f"tokenizer: {prepared.tokenizer_source}")
        metrics = train(
            spec,
            prepared,
            TrainOptions(
                max_steps=steps,
                batch_size=32,
                lr=3e-3,
                seed=seed,
                threads=threads,
                warmup_ratio=0.1,
            ),
            out=Path(tmp) / "adapter",
        )
    print(
        f"\ndev accuracy {metrics.get('eval_accuracy', math.nan):.4f} on {metrics.get('n_eval', 0)}"
        f" sentences after {metrics['steps']} steps ({expect})."
        f"\ndemo finished in {time.perf_counter() - t0:.0f} s"
    )
    return metrics
