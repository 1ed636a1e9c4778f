"""Trainer checkpoints and exact resume (issue 10 item 2): an :class:`AdapterTrainer` run stopped
at step k and resumed from its checkpoint ends with the same factors and head as an uninterrupted
run (fp32, ≤ 1e-6 relative); checkpoints hold the adapter, not the model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    TrainerCallback,
    TrainingArguments,
)

from tensadapt.errors import AdapterMismatchError
from tensadapt.model import NewModulesWarning, TensadaptModel
from tensadapt.trainer import AdapterTrainer

pytestmark = pytest.mark.slow

SPECS = {
    "cp-heads-qkv-depth": {
        "factorization": "cp",
        "modes": ["heads", "qkv", "depth"],
        "targets": ["q", "k", "v", "o"],
        "rank": 4,
        "dropout": 0.1,
    },
    "tucker-qkv-depth": {"factorization": "tucker", "modes": ["qkv", "depth"], "rank": 3},
}


class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] % 2).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def model_for(spec: dict[str, Any], seed: int) -> TensadaptModel:
    cfg = AutoConfig.for_model(
        "bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        num_labels=2,
    )
    torch.manual_seed(0)  # the same base weights every time
    base = AutoModelForSequenceClassification.from_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewModulesWarning)
        return TensadaptModel(base, spec, seed=seed)


def args(out: Path, **kw: Any) -> TrainingArguments:
    base = {
        "output_dir": str(out),
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "save_strategy": "steps",
        "save_steps": 6,
        "seed": 0,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_strategy": "no",
    }
    return TrainingArguments(**{**base, **kw})


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True
        return control


def trained(model: TensadaptModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(SPECS))
def test_stopped_and_resumed_run_equals_uninterrupted(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]
    full = model_for(spec, seed=1)
    AdapterTrainer(model=full, args=args(tmp_path / "full"), train_dataset=Data()).train()
    want = trained(full)

    first = model_for(spec, seed=1)
    AdapterTrainer(
        model=first, args=args(tmp_path / "run"), train_dataset=Data(), callbacks=[StopAt(6)]
    ).train()
    ckpt = tmp_path / "run" / "checkpoint-6"
    assert (ckpt / "adapter.safetensors").is_file()

    resumed = model_for(spec, seed=99)  # another init: the checkpoint must overwrite it
    AdapterTrainer(model=resumed, args=args(tmp_path / "run"), train_dataset=Data()).train(
        resume_from_checkpoint=True
    )
    got = trained(resumed)
    assert got.keys() == want.keys()
    for k in want:
        err = float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30))
        assert err <= 1e-6, (k, err)


def test_checkpoints_are_adapter_sized(tmp_path: Path) -> None:
    model = model_for(SPECS["tucker-qkv-depth"], seed=1)
    AdapterTrainer(
        model=model, args=args(tmp_path / "run", max_steps=6), train_dataset=Data()
    ).train()
    ckpt = tmp_path / "run" / "checkpoint-6"
    names = {p.name for p in ckpt.iterdir()}
    assert "model.safetensors" not in names and "adapter.safetensors" in names
    trainable_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    adapter_file = (ckpt / "adapter.safetensors").stat().st_size
    assert adapter_file < trainable_bytes + 32_768  # tensors + the committed config
    optimizer = (ckpt / "optimizer.pt").stat().st_size
    assert optimizer < 2 * trainable_bytes + 32_768  # AdamW: two moments per trainable value
    assert adapter_file < model_bytes / 5


def test_resume_refuses_another_adapter(tmp_path: Path) -> None:
    model = model_for(SPECS["tucker-qkv-depth"], seed=1)
    AdapterTrainer(
        model=model, args=args(tmp_path / "run", max_steps=6), train_dataset=Data()
    ).train()
    other = model_for(SPECS["cp-heads-qkv-depth"], seed=1)
    with pytest.raises(AdapterMismatchError, match="spec differs"):
        AdapterTrainer(model=other, args=args(tmp_path / "run"), train_dataset=Data()).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6")
        )
