"""The spine, table-driven over factorizations × all 8 mode subsets × tiny BERT, GPT-2,
LLaMA-with-GQA and ViT: step-0 equality, merge/unmerge, parameter counts, training."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILIES, build_model, hidden, model_inputs, randomize

import tensadapt as ta
from tensadapt.model import adapted_modules, get_adapter

FACTORIZATIONS = ["lora", "cp", "tucker", "tt", "mpo"]
MODE_SUBSETS = [
    list(c) for n in range(4) for c in itertools.combinations(["heads", "qkv", "depth"], n)
]


def _spec(fact: str, modes: list[str], targets, rank=3) -> dict:
    spec = {
        "factorization": fact,
        "modes": modes,
        "targets": list(targets),
        "rank": rank,
        "alpha": 6,
    }
    if fact == "mpo":
        spec["options"] = {"n_cores": 2}
    return spec


CASES = [
    pytest.param(fam, fact, modes, id=f"{fam}-{fact}-{'+'.join(modes) or 'none'}")
    for fam in FAMILIES
    for fact in FACTORIZATIONS
    for modes in MODE_SUBSETS
]


@pytest.mark.parametrize(("family", "fact", "modes"), CASES)
def test_adapter_contract(family: str, fact: str, modes: list[str]) -> None:
    preset, targets = FAMILIES[family]
    model = build_model(preset)
    inputs = model_inputs(model)
    with torch.no_grad():
        base_out = hidden(model, inputs)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    ta.inject(model, _spec(fact, modes, targets), seed=0)
    adapter = get_adapter(model)
    # step 0: exactly the base model
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, inputs), base_out, rtol=0, atol=0)
    # trainable parameters are exactly the plan's count
    assert ta.trainable_parameters(model) == adapter.plan.n_params
    assert sum(p.numel() for p in adapter.parameters()) == adapter.plan.n_params

    # with non-zero factors: merged output equals unmerged, unmerge restores the base weights
    randomize(model)
    with torch.no_grad():
        adapted = hidden(model, inputs)
        assert (adapted - base_out).abs().max() > 1e-4, "update had no effect"
        ta.merge(model)
        torch.testing.assert_close(hidden(model, inputs), adapted, rtol=1e-4, atol=1e-4)
        ta.unmerge(model)
    for name, m in adapted_modules(model):
        key = f"{name}.weight"
        torch.testing.assert_close(m.base.weight, base_weights[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fact", FACTORIZATIONS)
def test_optimizer_step_changes_factors_only(family: str, fact: str) -> None:
    preset, targets = FAMILIES[family]
    model = build_model(preset)
    inputs = model_inputs(model)
    ta.inject(model, _spec(fact, ["qkv", "depth"], targets), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    probe = torch.randn(hidden(model, inputs).shape, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # step 1 moves the zero factor; from step 2 every factor has gradient
        opt.zero_grad()
        (hidden(model, inputs) * probe).sum().backward()  # (LayerNorm makes mean(h²) flat)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), (
        "a factor got no gradient"
    )
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == p.requires_grad, f"{n}: changed={changed} trainable={p.requires_grad}"


def test_merge_and_unload_gives_plain_model() -> None:
    model = build_model("tiny-bert")
    inputs = model_inputs(model)
    ta.inject(model, _spec("cp", ["heads", "qkv", "depth"], ("q", "k", "v", "o")), seed=0)
    randomize(model)
    with torch.no_grad():
        adapted = hidden(model, inputs)
    ta.merge_and_unload(model)
    assert not adapted_modules(model)
    assert not hasattr(model, "tensadapt_adapters")
    assert all(type(m).__name__ != "AdaptedLinear" for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, inputs), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("spec", "model", "expected"),
    [
        (
            {
                "factorization": "cp",
                "modes": ["heads", "qkv", "depth"],
                "targets": ["q", "k", "v", "o"],
                "rank": 8,
            },
            "roberta-base",
            6880,
        ),
        ({"factorization": "tucker", "modes": ["qkv", "depth"], "rank": 8}, "roberta-base", 16504),
        (
            {"factorization": "tucker", "modes": ["att", "qkv", "depth"], "rank": 8},
            "roberta-base",
            39640,
        ),
        ({"factorization": "lora", "rank": 8}, "roberta-base", 12 * 3 * 8 * (768 + 768)),
    ],
    ids=["lorta", "tenslora-qkv-depth", "tenslora-att-qkv-depth", "lora"],
)
def test_paper_parameter_counts(spec, model, expected) -> None:
    assert ta.plan(spec, model).n_params == expected


def test_lorta_formula_over_ranks() -> None:
    # LoRTA: r·(d + d/H + H + 4 + L)
    for r in (1, 4, 16):
        p = ta.plan(
            {
                "factorization": "cp",
                "modes": ["heads", "qkv", "depth"],
                "targets": ["q", "k", "v", "o"],
                "rank": r,
            },
            "roberta-large",
        )
        assert p.n_params == r * (1024 + 64 + 16 + 4 + 24)


def test_gqa_stacks_q_and_kv_separately() -> None:
    p = ta.plan(
        {
            "factorization": "cp",
            "modes": ["heads", "qkv", "depth"],
            "targets": ["q", "k", "v"],
            "rank": 4,
        },
        "llama3-8b",
    )
    shapes = {t.name: {a.name: a.size for a in t.axes} for t in p.tensors}
    assert shapes == {
        "q": {"in": 4096, "head_dim": 128, "heads": 32, "qkv": 1, "depth": 32},
        "k_v": {"in": 4096, "head_dim": 128, "heads": 8, "qkv": 2, "depth": 32},
    }


def test_hf_trainer_trains_adapter(tmp_path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from tensadapt.arch import preset_config

    torch.manual_seed(0)
    cfg = preset_config("tiny-bert")
    cfg.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(cfg)
    ta.inject(
        model,
        {
            "factorization": "tucker",
            "modes": ["qkv", "depth"],
            "rank": 2,
            "modules_to_save": ["classifier"],
        },
        seed=0,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (16, 8), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=ds).train()
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert any("tensadapt_adapter" in n for n in moved) and any("classifier" in n for n in moved)


def test_save_load_roundtrip(tmp_path) -> None:
    model = build_model("tiny-llama")
    inputs = model_inputs(model)
    ta.inject(model, _spec("tt", ["qkv", "depth"], ("q", "k", "v", "o")), seed=0)
    randomize(model)
    with torch.no_grad():
        adapted = hidden(model, inputs)
    ta.save_adapter(model, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir() if not p.name.startswith(".")} == {
        "adapter.safetensors",
        "adapter_config.json",
    }
    fresh = build_model("tiny-llama")
    ta.load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(hidden(fresh, inputs), adapted, rtol=0, atol=0)


def test_load_adapter_refuses_other_model(tmp_path) -> None:
    model = build_model("tiny-bert")
    ta.inject(model, _spec("cp", ["qkv"], ("q", "k", "v")), seed=0)
    ta.save_adapter(model, tmp_path / "ad")
    with pytest.raises(ta.AdapterMismatchError, match="n_layers|hidden_size|family"):
        ta.load_adapter(build_model("tiny-gpt2"), tmp_path / "ad")


def test_failed_load_leaves_model_as_it_was(tmp_path) -> None:
    """A load that fails after the adapter was put on the model (a NaN saved with a valid
    checksum, as a diverged run would save it) rolls the model back exactly."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tensadapt.io import sha256

    model = build_model("tiny-bert")
    inputs = model_inputs(model)
    ta.inject(model, _spec("cp", ["qkv", "depth"], ("q", "k", "v")), seed=0)
    randomize(model)
    ta.save_adapter(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter.safetensors"
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    config = json.loads(meta["config"])
    config["tensors"][key]["sha256"] = sha256(state[key])
    meta["config"] = json.dumps(config)
    meta["config_sha256"] = hashlib.sha256(meta["config"].encode()).hexdigest()
    save_file(state, str(path), metadata=meta)
    (tmp_path / "ad" / "adapter_config.json").write_text(meta["config"])

    fresh = build_model("tiny-bert")
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    flags = {n: p.requires_grad for n, p in fresh.named_parameters()}
    with torch.no_grad():
        out = hidden(fresh, inputs)
    with pytest.raises(ta.AdapterMismatchError, match="NaN"):
        ta.load_adapter(fresh, tmp_path / "ad")
    assert not adapted_modules(fresh) and not hasattr(fresh, "tensadapt_adapters")
    after = dict(fresh.named_parameters())
    assert set(after) == set(before)
    for n, p in after.items():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
    with torch.no_grad():
        torch.testing.assert_close(hidden(fresh, inputs), out, rtol=0, atol=0)
