"""Export to PEFT LoRA and to merged weights: what PEFT / ``from_pretrained`` load gives the same
logits as the tensadapt-adapted model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, model_inputs, randomize

import tensadapt as ta
from tensadapt.cli import main
from tensadapt.errors import ExportError
from tensadapt.export import exact_lowrank, export_merged, export_peft_lora
from tensadapt.model import get_adapter

peft = pytest.importorskip("peft")
SPECS = ROOT / "specs"


def build_cls(preset: str, seed: int = 0) -> torch.nn.Module:
    """A tiny base model with a task head (the head's init is seeded too)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tensadapt.arch import preset_config

    torch.manual_seed(seed)
    cfg = preset_config(preset)
    auto = AutoModelForCausalLM if preset == "tiny-gpt2" else AutoModelForSequenceClassification
    return auto.from_config(cfg).eval()


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def train_steps(model: torch.nn.Module, steps: int = 3, seed: int = 5) -> None:
    """A few AdamW steps on random tokens, so every factor (the zero-initialised one included)
    moves away from its init."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        batch = model_inputs(
            model, batch=4, seq=9, seed=int(torch.randint(0, 999, (1,), generator=g))
        )
        out = model(**batch)
        loss = out.logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def peft_roundtrip(model: torch.nn.Module, preset: str, out: Path, **kw: object) -> torch.Tensor:
    """Export, load on a fresh copy of the same base with PEFT, return its logits."""
    report = export_peft_lora(model, out, **kw)  # type: ignore[arg-type]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = build_cls(preset)
    loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    inputs = model_inputs(model, batch=2, seq=7, seed=11)
    return report, logits(loaded, inputs), logits(model, inputs)


@pytest.mark.parametrize(
    ("spec", "ranks"),
    [
        (SPECS / "lorta.yaml", {8}),  # cp over (in, head_dim, heads, qkvo, depth)
        (SPECS / "tenslora-qkv-depth.yaml", {8}),  # tucker over (in, out, qkv, depth)
    ],
    ids=["lorta-cp", "tenslora-qkv-depth-tucker"],
)
def test_acceptance_trained_bert_peft_same_logits(
    spec: Path, ranks: set[int], tmp_path: Path
) -> None:
    """Acceptance: CP and Tucker adapters trained a few steps on a tiny BERT classifier, exported,
    loaded with ``peft.PeftModel.from_pretrained``: same logits to 1e-5."""
    model = build_cls("tiny-bert")
    data = ta.load_spec(spec).to_dict()
    data["modules_to_save"] = ["classifier"]
    ta.inject(model, data, seed=0)
    before = logits(model, model_inputs(model, seed=11))
    train_steps(model)
    report, got, want = peft_roundtrip(model, "tiny-bert", tmp_path / "peft")
    assert (want - before).abs().max() > 1e-3, "training did not change the adapter"
    assert report.exact and report.max_rel_error == 0.0
    assert set(report.module_ranks.values()) == ranks
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["classifier"]
    assert all(".attention." in n for n in cfg["target_modules"])


@pytest.mark.parametrize(
    ("spec", "rank"),
    [
        ({"factorization": "lora", "targets": ["q", "k", "v", "o"], "rank": 2}, 6),  # block-diag
        ({"factorization": "lora", "targets": ["q", "v"], "rank": 2}, 4),  # k block stays zero
        (SPECS / "lorta.yaml", 8),  # CP: q, k, v share U_in -> one shared A
        (SPECS / "tt-qkv-depth.yaml", 8),  # TT: the cut next to the in core, shared by q, k, v
    ],
    ids=["lora-qkvo", "lora-qv", "lorta", "tt"],
)
def test_gpt2_fused_c_attn_combined_lora(spec: object, rank: int, tmp_path: Path) -> None:
    """GPT-2's c_attn holds q, k, v: one combined, exact LoRA per c_attn (Conv1D, fan_in_fan_out)."""
    model = build_cls("tiny-gpt2")
    ta.inject(model, spec)  # type: ignore[arg-type]
    randomize(model)
    report, got, want = peft_roundtrip(model, "tiny-gpt2", tmp_path / "g")
    assert report.exact
    c_attn = {n: r for n, r in report.module_ranks.items() if n.endswith("c_attn")}
    assert c_attn and set(c_attn.values()) == {rank}
    cfg = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # per-target ranks where they differ: c_proj (o) has rank 2 next to c_attn's 6
    others = {n: r for n, r in report.module_ranks.items() if r != cfg["r"]}
    assert cfg["rank_pattern"] == others == cfg["alpha_pattern"]
    if "o" in getattr(spec, "get", lambda k, d=None: ())("targets", ()):
        assert others and all(n.endswith("c_proj") and r == 2 for n, r in others.items())


def test_mpo_refused_without_rank_then_truncated_svd_reports_error(tmp_path: Path) -> None:
    model = build_cls("tiny-bert")
    ta.inject(
        model, {"factorization": "mpo", "targets": ["q", "v"], "rank": 3, "options": {"n_cores": 2}}
    )
    randomize(model, scale=0.5)
    ad = get_adapter(model)
    assert all(exact_lowrank(ad, t) is None for t in ad.plan.targets)
    with pytest.raises(
        ExportError, match=r"target q\.0: a 'mpo' update is not exactly low rank.*rank=R"
    ):
        export_peft_lora(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # truncated: the reported error is the real one
    report = export_peft_lora(model, tmp_path / "r2", rank=2)
    assert not report.exact and 0 < report.max_rel_error < 1
    assert "truncated SVD: max relative error" in str(report)
    t = ad.plan.targets[0]
    s = ad.delta_slice(t).detach().double()
    sv = torch.linalg.svdvals(s)
    want_err = float((sv[2:].square().sum() / sv.square().sum()).sqrt())
    got_err = next(x.rel_error for x in report.targets if x.key == t.key)
    assert got_err == pytest.approx(want_err, rel=1e-6)
    # at full rank (the width) the SVD is exact: PEFT reproduces the logits
    width = ad.plan.architecture["hidden_size"]
    report_full, got, want = peft_roundtrip(model, "tiny-bert", tmp_path / "full", rank=width)
    assert report_full.max_rel_error < 1e-6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rank_cap_truncates_exact_formats(tmp_path: Path) -> None:
    model = build_cls("tiny-bert")
    ta.inject(model, SPECS / "tenslora-qkv-depth.yaml")
    randomize(model)
    report = export_peft_lora(model, tmp_path / "c", rank=3)
    assert set(report.module_ranks.values()) == {3} and not report.exact
    with pytest.raises(ExportError, match="rank must be >= 1"):
        export_peft_lora(model, tmp_path / "c", rank=0)


def test_residual_adapters_refused(tmp_path: Path) -> None:
    from tensadapt.export import _check_exportable

    class Fake:
        class plan:  # noqa: N801 - a stand-in for a Plan
            spec = ta.load_spec({"factorization": "lora", "init": "svd", "residual": "frozen"})

    with pytest.raises(ExportError, match="'frozen' residual.*--to merged"):
        _check_exportable(Fake())  # type: ignore[arg-type]


def test_merged_export_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = build_cls("tiny-bert")
    ta.inject(
        model, {**ta.load_spec(SPECS / "lorta.yaml").to_dict(), "modules_to_save": ["classifier"]}
    )
    randomize(model)
    inputs = model_inputs(model, seed=4)
    want = logits(model, inputs)
    out = export_merged(model, tmp_path / "merged")
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(loaded, inputs), want, rtol=1e-5, atol=1e-5)
    assert not any("tensadapt" in k for k in loaded.state_dict())
    # the original model keeps its adapter (a copy was merged)
    assert get_adapter(model) is not None
    torch.testing.assert_close(logits(model, inputs), want)


def test_cli_export_both_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tensadapt export`` rebuilds the base (preset + seed), loads the adapter and exports."""
    from transformers import AutoModelForSequenceClassification

    model = build_cls("tiny-bert", seed=0)
    ta.inject(
        model, {**ta.load_spec(SPECS / "lorta.yaml").to_dict(), "modules_to_save": ["classifier"]}
    )
    randomize(model)
    ta.save_adapter(model, tmp_path / "ad")
    inputs = model_inputs(model, seed=4)
    want = logits(model, inputs)
    common = [
        "--model",
        "tiny-bert",
        "--seed",
        "0",
        "--model-class",
        "AutoModelForSequenceClassification",
    ]
    rc = main(
        ["export", str(tmp_path / "ad"), "--to", "peft-lora", "--out", str(tmp_path / "p"), *common]
    )
    assert rc == 0, capsys.readouterr().err
    assert "exact" in capsys.readouterr().out
    loaded = peft.PeftModel.from_pretrained(build_cls("tiny-bert", seed=0), str(tmp_path / "p"))
    torch.testing.assert_close(logits(loaded.eval(), inputs), want, rtol=1e-5, atol=1e-5)
    rc = main(
        ["export", str(tmp_path / "ad"), "--to", "merged", "--out", str(tmp_path / "m"), *common]
    )
    assert rc == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(logits(merged, inputs), want, rtol=1e-5, atol=1e-5)
