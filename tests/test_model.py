"""The model object (issue 10): the verbs PEFT users know, the HF ``save_pretrained`` boundary, and
new heads. Table-driven over factorizations × mode subsets × families where it applies."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, hidden, model_inputs
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import tensadapt as ta
from tensadapt.errors import PlanError, TensadaptError
from tensadapt.model import NewModulesWarning, TensadaptModel, adapted_modules, new_modules
from tensadapt.nn import AdaptedLinear, SavedModule

CASES = [
    ("tiny-bert", "lora", []),
    ("tiny-bert", "cp", ["heads", "qkv", "depth"]),
    ("tiny-gpt2", "tucker", ["qkv", "depth"]),
    ("tiny-gpt2", "tt", ["heads"]),
    ("tiny-llama", "cp", ["heads", "qkv", "depth"]),
    ("tiny-llama", "mpo", ["depth"]),
]


def spec(fact: str, modes: list[str], rank: int = 3, **kw: Any) -> dict[str, Any]:
    return {
        "factorization": fact,
        "modes": modes,
        "targets": ["q", "k", "v", "o"],
        "rank": rank,
        **kw,
    }


def randomized(model: TensadaptModel, name: str | None = None, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter(name).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize(("preset", "fact", "modes"), CASES)
def test_save_pretrained_from_pretrained_round_trip(preset, fact, modes, tmp_path: Path) -> None:
    base = build_model(preset)
    inputs = model_inputs(base)
    with torch.no_grad():
        base_out = hidden(base, inputs)
    model = TensadaptModel(base, spec(fact, modes), seed=0)
    randomized(model)
    with torch.no_grad():
        adapted = hidden(model, inputs)
    assert (adapted - base_out).abs().max() > 1e-4
    out = model.save_pretrained(tmp_path / "ad")
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert files == ["adapter.safetensors", "adapter_config.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["spec"]["factorization"] == fact and "base_model_name_or_path" in config
    assert "tensors" in config and "targets" in config and "plan" not in config

    again = TensadaptModel.from_pretrained(build_model(preset), out)
    assert not any(p.requires_grad for p in again.parameters())  # inference by default
    with torch.no_grad():
        torch.testing.assert_close(hidden(again, inputs), adapted, rtol=0, atol=0)
        with again.disable_adapter():
            torch.testing.assert_close(hidden(again, inputs), base_out, rtol=0, atol=0)
    merged = again.merge_and_unload()
    assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(hidden(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_from_pretrained_with_a_path_loads_the_recorded_class(tmp_path: Path) -> None:
    _save_tiny_bert(tmp_path / "base", num_labels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewModulesWarning)
        clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    model = TensadaptModel(clf, spec("cp", ["qkv"]), seed=0)
    randomized(model)
    x = {"input_ids": torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))}
    model.eval()
    with torch.no_grad():
        want = model(**x).logits
    model.save_pretrained(tmp_path / "ad")
    again = TensadaptModel.from_pretrained(str(tmp_path / "base"), tmp_path / "ad")
    assert type(again.base_model).__name__ == "BertForSequenceClassification"
    assert again.config.num_labels == 3
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, want, rtol=0, atol=0)


def test_hf_save_pretrained_refuses_and_says_what_to_call(tmp_path: Path) -> None:
    base = build_model("tiny-bert")
    model = TensadaptModel(base, spec("lora", []), seed=0)
    for obj in (base, model.base_model):
        with pytest.raises(
            TensadaptError, match=r"TensadaptModel\.save_pretrained.*merge_and_unload"
        ):
            obj.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    legacy = build_model("tiny-bert")
    ta.inject(legacy, spec("cp", ["qkv"]))
    with pytest.raises(TensadaptError, match="would write the wrapped weights"):
        legacy.save_pretrained(tmp_path / "hf2")


@pytest.mark.parametrize(("preset", "fact", "modes"), CASES[:3])
def test_merge_and_unload_then_hf_round_trip_reproduces_outputs(
    preset, fact, modes, tmp_path: Path
) -> None:
    """The HF-standard save of the merged model through a real from_pretrained."""
    base = build_model(preset)
    inputs = model_inputs(base)
    model = TensadaptModel(base, spec(fact, modes), seed=0)
    randomized(model)
    with torch.no_grad():
        adapted = hidden(model, inputs)
    plain = model.merge_and_unload()
    plain.save_pretrained(tmp_path / "merged")
    back = AutoModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hidden(back, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_named_adapters_switch_delete_and_train_only_the_active_one(tmp_path: Path) -> None:
    base = build_model("tiny-llama")
    inputs = model_inputs(base)
    with torch.no_grad():
        base_out = hidden(base, inputs)
    model = TensadaptModel(base, spec("lora", []), "a", seed=0)
    randomized(model, "a", seed=1)
    model.add_adapter("b", spec("cp", ["heads", "qkv", "depth"]), seed=0)
    randomized(model, "b", seed=2)
    assert model.adapter_names == ["a", "b"] and model.active_adapter == "a"
    with torch.no_grad():
        out_a = hidden(model, inputs)
        model.set_adapter("b")
        out_b = hidden(model, inputs)
    assert (out_a - out_b).abs().max() > 1e-4
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.adapter("b").parameters()}

    model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "a" / "adapter.safetensors").is_file()
    assert (tmp_path / "both" / "b" / "adapter.safetensors").is_file()
    other = TensadaptModel.from_pretrained(build_model("tiny-llama"), tmp_path / "both" / "a", "a")
    other.load_adapter(tmp_path / "both" / "b", "b")
    other.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(hidden(other, inputs), out_b, rtol=0, atol=0)

    model.merge_adapter()
    with pytest.raises(PlanError, match="merged into the weights"):
        model.set_adapter("a")
    model.unmerge_adapter()
    model.delete_adapter("b")
    assert model.adapter_names == ["a"] and model.active_adapter == "a"
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, inputs), out_a, rtol=1e-5, atol=1e-5)
    model.delete_adapter("a")
    assert not adapted_modules(model.base_model)
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, inputs), base_out, rtol=1e-5, atol=1e-5)


def test_disable_adapter_while_merged_gives_the_base_and_merges_back() -> None:
    base = build_model("tiny-bert")
    inputs = model_inputs(base)
    with torch.no_grad():
        base_out = hidden(base, inputs)
    model = TensadaptModel(base, spec("tucker", ["qkv", "depth"]), seed=0)
    randomized(model)
    with torch.no_grad():
        adapted = hidden(model, inputs)
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(hidden(model, inputs), base_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden(model, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_print_trainable_parameters(capsys) -> None:
    model = TensadaptModel(build_model("tiny-bert"), spec("cp", ["heads", "qkv", "depth"]))
    model.print_trainable_parameters()
    text = capsys.readouterr().out
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == model.plan().n_params
    assert f"trainable params: {trainable:,} || all params: {total:,}" in text


# -- new heads -------------------------------------------------------------------------------------
def _save_tiny_bert(path: Path, **config: Any) -> None:
    """A 2-layer, 32-wide BERT with seeded random weights, saved as a local model directory."""
    cfg = AutoConfig.for_model(
        "bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        **config,
    )
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(path)


def _classifier(tmp_path: Path, num_labels: int = 3) -> torch.nn.Module:
    _save_tiny_bert(tmp_path / "base")
    return AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=num_labels
    )


def test_fresh_head_is_detected_trained_and_saved(tmp_path: Path) -> None:
    clf = _classifier(tmp_path)
    assert new_modules(clf) == ["classifier"]
    with pytest.warns(NewModulesWarning, match="classifier: newly initialised"):
        model = TensadaptModel(clf, spec("lora", []), seed=0)
    assert model.plan().spec.modules_to_save == ("classifier",)
    assert isinstance(model.base_model.classifier, SavedModule)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.copies.default" in n for n in names)

    # train a few steps: the head's copy moves, the original stays
    x = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    model.eval()
    orig = model.base_model.classifier.original.weight
    trained = model.base_model.classifier.copies["default"].weight
    assert not torch.equal(orig, trained)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "ad")
    again = TensadaptModel.from_pretrained(_classifier(tmp_path), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, logits, rtol=0, atol=0)


def test_no_warning_when_the_spec_names_the_head(tmp_path: Path) -> None:
    clf = _classifier(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewModulesWarning)
        TensadaptModel(clf, {**spec("lora", []), "modules_to_save": ["classifier"]})


def test_loaded_heads_are_not_new(tmp_path: Path) -> None:
    clf = _classifier(tmp_path)
    clf.save_pretrained(tmp_path / "clf")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert new_modules(back) == []


def test_readme_python_example_trains_and_reloads_identically(tmp_path: Path) -> None:
    """The README's "In Python" flow, on a tiny local classifier: train, save, reload."""
    clf = _classifier(tmp_path, num_labels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewModulesWarning)
        model = TensadaptModel(clf, "specs/tenslora-qkv-depth.yaml", seed=0)
    x = torch.randint(0, 100, (8, 6), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(10):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "adapter")
    again = TensadaptModel.from_pretrained(str(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, want, rtol=0, atol=0)
