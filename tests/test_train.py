"""Training, sweeps and the data checks, on a tiny model and tiny files written here."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import tensadapt.train as tr
from tensadapt.cli import main
from tensadapt.train import (
    DataError,
    DataOptions,
    TrainOptions,
    load_task_data,
    pareto_front,
    prepare,
    sweep,
    synthetic_sentiment,
    train,
)

FAST = TrainOptions(max_steps=5, batch_size=8, eval_batch_size=16, threads=1, progress=False)
TUCKER = {"name": "t-qkv-depth", "factorization": "tucker", "modes": ["qkv", "depth"], "rank": 3}
CP = {"name": "cp-all", "factorization": "cp", "modes": ["heads", "qkv", "depth"], "rank": 3}


def _tsv(path, pairs, header="label\tsentence"):
    path.write_text(header + "\n" + "".join(f"{lab}\t{s}\n" for lab, s in pairs))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    pairs = synthetic_sentiment(72, seed=1)
    return _tsv(d / "train.tsv", pairs[:56]), _tsv(d / "dev.tsv", pairs[56:])


@pytest.fixture(scope="module")
def prepared(data):
    return prepare("tiny-bert", *data, DataOptions(max_length=24))


def test_five_step_train_writes_adapter_spec_and_metrics(prepared, tmp_path):
    out = tmp_path / "run"
    m = train(TUCKER, prepared, FAST, out=out, log=None)
    assert m["steps"] == 5
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["n_eval"] == 16
    # core [3,3,3,3] + U_in, U_out [32,3] + U_qkv [3,3] + U_depth [2,3]
    assert m["adapter_params"] == 3**4 + 2 * 32 * 3 + 3 * 3 + 2 * 3
    assert m["trainable_params"] == m["adapter_params"] + 32 * 2 + 2  # + the classifier head
    assert m["train_tokens"] > 0 and m["tokens_per_s"] > 0
    for f in (
        "adapter.safetensors",
        "adapter_config.json",
        "resolved_spec.yaml",
        "metrics.json",
    ):
        assert (out / f).exists(), f
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5
    assert "classifier" in (out / "resolved_spec.yaml").read_text()
    state = load_file(str(out / "adapter.safetensors"))
    # the zero-initialised output factor has moved: the adapter was trained
    zero = [v for k, v in state.items() if k.endswith("U_out")]
    assert zero and all(v.abs().sum() > 0 for v in zero)
    assert any(k.startswith("modules_to_save.classifier") for k in state)


def test_same_seed_same_result(prepared):
    a = train(TUCKER, prepared, FAST, log=None)
    b = train(TUCKER, prepared, FAST, log=None)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


def test_trained_tokenizer_matches_the_config(prepared):
    tok = prepared.tokenizer
    assert "WordPiece" in prepared.tokenizer_source
    assert len(tok) <= prepared.config.vocab_size
    assert tok.pad_token_id == prepared.config.pad_token_id == 0
    ids = prepared.train[0]["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert max(max(x["input_ids"]) for x in prepared.train) < prepared.config.vocab_size


def test_causal_lm_on_a_text_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(s for _, s in synthetic_sentiment(60)))
    p = prepare("tiny-gpt2", text, text, DataOptions(max_length=16))
    assert p.task == "causal-lm" and "BPE" in p.tokenizer_source
    m = train(CP | {"targets": ["q", "k", "v", "o"]}, p, FAST, log=None)
    assert m["steps"] == 5 and m["eval_perplexity"] > 1


def test_csv_and_jsonl_with_column_options(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('txt,y\n"great, fun",1\nawful,0\n')
    j = tmp_path / "d.jsonl"
    j.write_text('{"txt": "great", "y": 1}\n{"txt": "awful", "y": 0}\n')
    opts = DataOptions(text_column="txt", label_column="y")
    for f in (c, j):
        td = load_task_data(f, f, opts)
        assert td.train.texts[0].startswith("great") and td.train.labels == [1, 0]
        assert td.num_labels == 2


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        ("", "file is empty"),
        ("label\tsentence\n", "no data rows"),
        ("label\ttext\n1\tgood\n", "missing column(s) 'sentence' (--text-column)"),
        ("label\tsentence\n1\tgood\npositive\tbad\n", ":3: label 'positive'"),
        ("label\tsentence\n1\tgood\n-1\tbad\n", "is not an integer"),
        ("label\tsentence\n1.5\tgood\n0\tbad\n", "is not an integer"),
        ("label\tsentence\n1\tgood\n1\tbad\n", "at least two classes"),
        ("label\tsentence\n1\t\n0\tbad\n", "empty text"),
    ],
)
def test_bad_training_data_is_named_before_training(tmp_path, monkeypatch, content, needle):
    monkeypatch.setattr(tr, "build_base_model", lambda *a, **k: pytest.fail("model was built"))
    f = tmp_path / "train.tsv"
    if content is not None:
        f.write_text(content)
    with pytest.raises(DataError) as err:
        prepare("tiny-bert", f)
    assert needle in str(err.value) and str(f) in str(err.value)


def test_bad_eval_labels_and_formats(tmp_path, data):
    dev = _tsv(tmp_path / "dev.tsv", [(0, "fine"), (5, "odd")])
    with pytest.raises(DataError, match="label 5 does not occur"):
        load_task_data(data[0], dev, DataOptions())
    with pytest.raises(DataError, match="unknown format '.xlsx'"):
        load_task_data(_xlsx(tmp_path), None, DataOptions())
    j = tmp_path / "bad.jsonl"
    j.write_text('{"sentence": "a", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_task_data(j, None, DataOptions())


def _xlsx(tmp_path):
    f = tmp_path / "x.xlsx"
    f.write_text("label\tsentence\n1\ta\n")
    return f


def test_cli_train_and_its_exit_codes(data, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("factorization: cp\nmodes: [qkv, depth]\nrank: 2\n")
    out = tmp_path / "out"
    argv = ["train", str(spec), "--model", "tiny-bert", "--data", str(data[0])]
    fast = ["--max-steps", "2", "--batch-size", "8", "--threads", "1", "--no-progress"]
    assert main([*argv, "--eval", str(data[1]), *fast, "--out", str(out), "--json"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    capsys.readouterr()
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\nyes\tgood\n")
    assert main(["train", str(spec), "--model", "tiny-bert", "--data", str(bad), *fast]) == 2
    assert "is not an integer" in capsys.readouterr().err
    assert main(["train", str(spec), "--model", "tiny-bert", "--data", "nope.tsv", *fast]) == 2
    assert "nope.tsv: no such file" in capsys.readouterr().err
    assert main(["train", "missing.yaml", "--model", "tiny-bert", "--data", str(data[0])]) == 2
    assert main(["train", str(spec), "--model", "no-such-preset", "--data", str(data[0])]) == 2


def test_sweep_two_configurations_then_resume(prepared, tmp_path, monkeypatch):
    from tensadapt.spec import load_spec

    specs = [
        ("tucker", load_spec(TUCKER)),
        ("lora", load_spec({"factorization": "lora", "rank": 2})),
    ]
    res = sweep(specs, prepared, tmp_path, seeds=[0], opts=FAST, log=None)
    assert (res.trained, res.skipped) == (2, 0)
    rows = list(csv.DictReader(res.results_csv.open()))
    assert [r["spec"] for r in rows] == ["tucker", "lora"]
    assert {"spec", "params", "seed", "metric", "value", "time_s"} <= set(rows[0])
    assert rows[0]["metric"] == "eval_accuracy" and int(rows[1]["params"]) == 2 * 3 * 2 * (32 + 32)
    assert res.pareto_png is not None and res.pareto_png.read_bytes()[:4] == b"\x89PNG"

    # resume: finished runs are skipped; a run whose metrics.json is missing is trained again
    (tmp_path / "runs" / "lora" / "seed0" / "metrics.json").unlink()
    calls = []
    real = tr.train
    monkeypatch.setattr(
        tr, "train", lambda spec, *a, **k: calls.append(spec.name) or real(spec, *a, **k)
    )
    res2 = sweep(specs, prepared, tmp_path, seeds=[0], opts=FAST, log=None)
    assert (res2.trained, res2.skipped) == (1, 1)
    assert calls == [None] and len(res2.rows) == 2


def test_cli_sweep_with_specs_dir_resumes(data, tmp_path, capsys):
    d = tmp_path / "specs"
    d.mkdir()
    (d / "a.yaml").write_text("factorization: cp\nmodes: [qkv, depth]\nrank: 2\n")
    out = tmp_path / "sw"
    argv = ["sweep", "--model", "tiny-bert", "--data", str(data[0]), "--eval", str(data[1])]
    rest = [
        "--specs",
        str(d),
        "--seeds",
        "2",
        "--max-steps",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main([*argv, *rest]) == 0
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2
    capsys.readouterr()
    assert main([*argv, *rest]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 2
    assert main([*argv, *rest, "--rank", "4"]) == 2  # --specs and enumerate options exclude


def test_pareto_front():
    s = [
        {"spec": "a", "params": 10, "mean": 0.80},
        {"spec": "b", "params": 100, "mean": 0.85},
        {"spec": "c", "params": 50, "mean": 0.79},  # dominated by a
        {"spec": "d", "params": 1000, "mean": 0.85},  # dominated by b (same mean, more params)
    ]
    assert pareto_front(s) == ["a", "b"]
    assert pareto_front(s, higher_is_better=False) == ["a", "c"]


def test_seed_controls_initialisation(prepared):
    torch.manual_seed(123)
    a = train(TUCKER, prepared, FAST, log=None)
    b = train(TUCKER, prepared, TrainOptions(**{**FAST.__dict__, "seed": 1}), log=None)
    assert a["train_loss"] != b["train_loss"]


def test_nonfinite_factors_stop_training_with_a_named_error(prepared):
    from tensadapt.errors import NonFiniteError
    from tensadapt.numerics import FiniteCheckCallback

    assert any(isinstance(cb, FiniteCheckCallback) for cb in tr._extra_callbacks())
    blowup = TrainOptions(**{**FAST.__dict__, "lr": 1e30, "max_steps": 3})
    with pytest.raises(NonFiniteError, match="at step"):
        train(TUCKER, prepared, blowup, log=None)
