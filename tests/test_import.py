"""The LoRTA authors' checkpoints in (issue 11 item 2): an adapter saved by their PEFT tuner
converts into a tensadapt adapter that reproduces their logits (``expected.safetensors``, written
by their code), and exports on to a standard PEFT LoRA that reproduces them too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from safetensors.torch import load_file

from tensadapt.errors import AdapterMismatchError
from tensadapt.importers.lorta_peft import import_checkpoint
from tensadapt.model import TensadaptModel

REF = SHARED / "reference" / "lorta-peft"
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"needs the reference data in {REF}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def base_model() -> torch.nn.Module:
    from transformers import RobertaForSequenceClassification

    return RobertaForSequenceClassification.from_pretrained(REF / "base").eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_checkpoint(
        REF / "lorta_adapter", base_model(), tmp_path_factory.mktemp("imp") / "ad"
    )


def test_imported_adapter_gives_the_authors_logits(imported: Path) -> None:
    expected = load_file(str(REF / "expected.safetensors"))
    config = json.loads((imported / "adapter_config.json").read_text())
    assert config["spec"]["orientation"] == "lorta" and config["spec"]["factorization"] == "cp"
    model = TensadaptModel.from_pretrained(base_model(), imported)
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    assert rel(logits, expected["logits"]) <= 1e-5
    # and every module's update equals the authors' delta weight
    ad = model.adapter()
    names = {t.key: t for t in ad.plan.targets}
    for key, dw in expected.items():
        if not key.startswith("delta_weight."):
            continue
        module = key.removeprefix("delta_weight.")
        layer = int(module.split("layer.")[1].split(".")[0])
        proj = {"query": "q", "key": "k", "value": "v", "dense": "o"}[module.rsplit(".", 1)[-1]]
        got = ad.delta_weight(names[f"{proj}.{layer}"]).detach()
        assert rel(got, dw) <= 1e-6, key


def test_imported_adapter_from_a_path_and_on_to_peft(imported: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from tensadapt.export import export_peft_lora

    expected = load_file(str(REF / "expected.safetensors"))
    model = TensadaptModel.from_pretrained(str(REF / "base"), imported)
    export_peft_lora(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        logits = loaded(input_ids=expected["ids"]).logits
    assert rel(logits, expected["logits"]) <= 1e-5


def test_import_from_the_base_path(tmp_path: Path) -> None:
    expected = load_file(str(REF / "expected.safetensors"))
    out = import_checkpoint(REF / "lorta_adapter", str(REF / "base"), tmp_path / "ad")
    model = TensadaptModel.from_pretrained(str(REF / "base"), out)
    with torch.no_grad():
        assert rel(model(input_ids=expected["ids"]).logits, expected["logits"]) <= 1e-5


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
        (
            lambda d: (d / "adapter_config.json").write_text(
                (d / "adapter_config.json").read_text().replace('"LORTA"', '"LORA"')
            ),
            "peft_type 'LORA', expected 'LORTA'",
        ),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"junk"), "cannot be read"),
    ],
)
def test_foreign_or_broken_checkpoints_are_named(damage, match: str, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(REF / "lorta_adapter", d)
    damage(d)
    with pytest.raises(AdapterMismatchError, match=match):
        import_checkpoint(d, base_model(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    from conftest import build_model

    with pytest.raises(AdapterMismatchError, match="another model"):
        import_checkpoint(REF / "lorta_adapter", build_model("tiny-bert"), tmp_path / "out")


def test_cli_import_reproduces_the_authors_logits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tensadapt import lorta-peft`` as a user types it: the written adapter gives their logits."""
    from tensadapt.cli import main

    out = tmp_path / "ad"
    argv = ["import", "lorta-peft", str(REF / "lorta_adapter"), "--model", str(REF / "base")]
    assert main([*argv, "--out", str(out)]) == 0
    assert "orientation lorta" in capsys.readouterr().out
    expected = load_file(str(REF / "expected.safetensors"))
    model = TensadaptModel.from_pretrained(str(REF / "base"), out)
    with torch.no_grad():
        assert rel(model(input_ids=expected["ids"]).logits, expected["logits"]) <= 1e-5
    # a second import into the same directory is refused; nothing there changes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*argv, "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_import_bad_input_exits_2_with_the_file_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensadapt.cli import main

    d = tmp_path / "ckpt"
    shutil.copytree(REF / "lorta_adapter", d)
    (d / "adapter_model.safetensors").write_bytes(b"junk")
    base = ["--model", str(REF / "base"), "--out", str(tmp_path / "o")]
    assert main(["import", "lorta-peft", str(d), *base]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and "Traceback" not in err
    assert main(["import", "lorta-peft", str(tmp_path / "missing"), *base]) == 2
    assert "no such adapter directory" in capsys.readouterr().err
    assert main(["import", "lora-peft", str(d), *base]) == 2  # unknown format: argparse names it
    assert "invalid choice" in capsys.readouterr().err
    assert main(["import", "lorta-peft", str(REF / "lorta_adapter"), "--model", "tiny-bert",
                 "--out", str(tmp_path / "o2")]) == 2  # fmt: skip
    assert "another model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
