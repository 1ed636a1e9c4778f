"""The command line: malformed specs give exit 2 with a message naming the field, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tensadapt.cli import main

ROOT = Path(__file__).resolve().parents[1]

# (spec text, field the message must name)
MALFORMED = [
    ("rank: 0\n", "rank"),
    ("rank: -3\n", "rank"),
    ("rank: eight\n", "rank"),
    ("rnak: 8\n", "rnak"),
    ("factorization: tuker\n", "factorization"),
    ("modes: [heads, wings]\n", "modes"),
    ("modes: [att, heads]\n", "modes"),
    ("targets: [q, x]\n", "targets"),
    ("targets: []\n", "targets"),
    ("targets: [q, q]\n", "targets"),
    ("dropout: 1.0\n", "dropout"),
    ("dropout: -0.1\n", "dropout"),
    ("alpha: 0\n", "alpha"),
    ("alpha: many\n", "alpha"),
    ("init: svd\n", "init"),
    ("residual: frozen\n", "residual"),
    ("residual: fp8\n", "residual"),
    ("base: nf3\n", "base"),
    ("layers: [0, -1]\n", "layers"),
    ("layers: some\n", "layers"),
    ("factorization: cp\nrank: {in: 4}\n", "rank"),
    ("factorization: tucker\nmodes: [qkv]\nrank: {in: 4, out: 4, depth: 2}\n", "rank"),
    ("factorization: mpo\noptions: {n_cores: many}\n", "options.n_cores"),
    ("factorization: mpo\noptions: {cores: 5}\n", "options"),
    ("modules_to_save: classifier\n", "modules_to_save"),
    ("- rank: 8\n", "spec"),
    ("rank: [8\n", "line"),
]


@pytest.mark.parametrize(("text", "field"), MALFORMED, ids=[f"{i:02d}-{f}" for i, (_, f) in enumerate(MALFORMED)])
def test_validate_malformed_spec_exit_2(tmp_path, capsys, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr()
    msg = out.out + out.err
    assert field in msg, msg
    assert "Traceback" not in msg


def test_validate_reports_every_problem_at_once(tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rank: 0\ndropout: 2\nfactorization: nope\n")
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr().out
    assert "rank" in out and "dropout" in out and "factorization" in out


def test_validate_all_shipped_specs(capsys) -> None:
    specs = sorted(str(p) for p in (ROOT / "specs").glob("*.yaml"))
    assert len(specs) >= 11
    assert main(["validate", *specs]) == 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["validate", "does-not-exist.yaml"], "does-not-exist.yaml"),
        (["plan", "does-not-exist.yaml"], "no such file"),
        (["plan", "specs"], "directory"),
        (["plan", "specs/lorta.yaml", "--model", "no-such-model"], "no-such-model"),
        (["plan", "specs/tenslora-qkv-depth.yaml", "--model", "vit-base", "--json"], None),
    ],
)
def test_cli_paths(monkeypatch, capsys, argv, fragment) -> None:
    monkeypatch.chdir(ROOT)
    rc = main(argv)
    out = capsys.readouterr()
    if fragment is None:
        assert rc == 0
        assert json.loads(out.out)["n_params"] > 0
    else:
        assert rc == 2
        assert fragment in out.out + out.err


def test_plan_prints_table_and_counts(monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "specs/lorta.yaml", "--model", "roberta-base"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 6,880" in out
    assert "U_heads[12, 8]" in out


def test_plan_70b_without_weights(monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "specs/lorta.yaml", "--model", "llama2-70b", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    # q/o (64 heads) and k/v (8 kv-heads) are separate tensors under GQA
    assert {t["name"] for t in d["tensors"]} == {"q_o", "k_v"}


def test_entry_point_no_traceback(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 0\n")
    proc = subprocess.run([sys.executable, "-m", "tensadapt.cli", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "rank" in proc.stdout


def test_schema_is_json(capsys) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "rank" in schema["properties"]


def test_export_rebuilds_the_trained_head(tmp_path, capsys) -> None:
    """A base saved as BertModel, trained with a 3-way classification head: `tensadapt export`
    rebuilds that head from what save_adapter recorded, without --model-class."""
    import torch
    from conftest import build_model
    from transformers import AutoModelForSequenceClassification

    import tensadapt as ta

    base_dir = tmp_path / "base"
    build_model("tiny-bert").save_pretrained(base_dir)  # config.architectures == ["BertModel"]
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    ta.inject(clf, {"factorization": "cp", "modes": ["qkv", "depth"], "rank": 2, "modules_to_save": ["classifier"]}, seed=0)
    ta.save_adapter(clf, tmp_path / "ad")
    rc = main(["export", str(tmp_path / "ad"), "--to", "peft-lora", "--model", str(base_dir), "--out", str(tmp_path / "peft")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
