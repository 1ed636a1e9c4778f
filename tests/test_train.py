"""Training, sweeps and the data checks, on a tiny model and tiny files written here.

Tests that train a model are marked ``slow`` (``pytest -m "not slow"`` leaves them out; ``make
test`` runs everything)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import tensadapt.train.outdir as tr_outdir
import tensadapt.train.sweeps as sweeps_mod
import tensadapt.train.trainer as trainer_mod
from tensadapt.cli import main
from tensadapt.model import get_adapter
from tensadapt.train import (
    DataError,
    DataOptions,
    OptionError,
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    monkeypatch.setattr(
        trainer_mod, "build_base_model", lambda *a, **k: pytest.fail("model was built")
    )
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    real = sweeps_mod.train
    monkeypatch.setattr(
        sweeps_mod, "train", lambda spec, *a, **k: calls.append(spec.name) or real(spec, *a, **k)
    )
    res2 = sweep(specs, prepared, tmp_path, seeds=[0], opts=FAST, log=None)
    assert (res2.trained, res2.skipped) == (1, 1)
    assert calls == [None] and len(res2.rows) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_seed_controls_initialisation(prepared):
    torch.manual_seed(123)
    a = train(TUCKER, prepared, FAST, log=None)
    b = train(TUCKER, prepared, TrainOptions(**{**FAST.__dict__, "seed": 1}), log=None)
    assert a["train_loss"] != b["train_loss"]


class _PoisonGradients(TrainerCallback):
    """Writes NaN into every trainable gradient just before optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.at:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


@pytest.mark.slow
def test_nonfinite_factors_stop_training_with_a_named_error(prepared, tmp_path):
    from tensadapt.errors import NonFiniteError
    from tensadapt.numerics import DivergenceCallback, FiniteCheckCallback

    cbs = trainer_mod.training_callbacks(FAST, prepared, "t")
    assert any(isinstance(cb, FiniteCheckCallback) for cb in cbs)
    assert any(isinstance(cb, DivergenceCallback) for cb in cbs)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="at step") as err:
        train(TUCKER, prepared, FAST, out=out, log=None, callbacks=[_PoisonGradients(at=2)])
    assert err.value.step == 2 and err.value.names
    # nothing a sweep would trust: no adapter, no metrics; failed.json says why; lock released
    assert sorted(p.name for p in out.iterdir()) == ["failed.json"]
    assert json.loads((out / "failed.json").read_text())["error"] == "NonFiniteError"


# -- data that used to be read wrongly or crash (issue 12) -----------------------------------------

BAD_FILES = [
    # an unquoted comma used to cut the text silently
    ("d.csv", b"sentence,label\ngreat, fun,1\nbad,0\n", ":2: 3 field(s), but the header has 2"),
    # extra TSV fields used to be dropped silently
    ("d.tsv", b"label\tsentence\n1\tgood\textra\n0\tbad\n", ":2: 3 field(s), but the header has 2"),
    ("d.tsv", b"label\tsentence\n1\n0\tbad\n", ":2: 1 field(s), but the header has 2"),
    ("d.csv", b'sentence,label\n"never closed,1\nbad,0\n', ":2: malformed comma-separated row"),
    ("d.tsv", b"label\tlabel\tsentence\n1\t1\ta\n", "'label' appear more than once"),
    # a JSON list/object used to be stringified
    ("d.jsonl", b'{"sentence": ["a", "b"], "label": 1}\n', ":1: the text in field 'sentence' is a JSON array"),
    ("d.jsonl", b'{"sentence": "a", "label": 1}\n{"sentence": {"x": 1}, "label": 0}\n', ":2: the text in field 'sentence' is a JSON object"),
    ("d.jsonl", b'{"sentence": 5, "label": 1}\n', "is a JSON number, expected a string"),
    ("d.jsonl", b'{"sentence": "a", "label": true}\n', "label True"),
    ("d.jsonl", b'{"sentence": "a"}\n{"sentence": "b", "label": 0}\n', ":1: no field 'label'"),
    # crashed with raw ValueError / RecursionError
    ("d.jsonl", b'{"sentence": "a", "label": 1' + b"0" * 5000 + b"}\n", ":1: not a JSON object per line"),
    ("d.jsonl", b"[" * 200_000 + b"\n", ":1: not a JSON object per line"),
    ("d.tsv", "label\tsentence\n\u00b2\tgood\n0\tbad\n".encode(), ":2: label '\u00b2'"),
    # a label that would size a classifier head of billions of parameters
    ("d.tsv", b"label\tsentence\n999999999\tgood\n0\tbad\n", ":2: label '999999999' in column 'label' is too large"),
    ("d.tsv", b"label\tsentence\n" + b"9" * 5000 + b"\tgood\n0\tbad\n", ":2: label '999"),
    ("d.jsonl", b'{"sentence": "a", "label": 1e300}\n', ":1: label 1e+300 in column 'label' is too large"),
    # non-UTF-8 bytes: refused in every format alike, naming the line and the byte
    ("d.tsv", b"label\tsentence\n1\tgood\n0\tba\xe9d\n", ":3: not utf-8 text (invalid continuation byte at byte 26)"),
    ("d.txt", b"hello world\nsome \xff text\n", ":2: not utf-8 text (invalid start byte at byte 17)"),
    ("d.jsonl", b'\xef\xbb\xbf{"sentence": "a\xff", "label": 1}\n', ":1: not utf-8 text (invalid start byte at byte 18)"),
]


@pytest.mark.parametrize(("name", "content", "needle"), BAD_FILES, ids=[f"{i:02d}-{n}" for i, (n, _, _) in enumerate(BAD_FILES)])
def test_malformed_data_files_are_refused_naming_file_and_line(tmp_path, monkeypatch, name, content, needle):
    monkeypatch.setattr(
        trainer_mod, "build_base_model", lambda *a, **k: pytest.fail("model was built")
    )
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare("tiny-bert" if not name.endswith(".txt") else "tiny-gpt2", f)
    assert needle in str(err.value), str(err.value)
    assert str(f) in str(err.value)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".txt"])
def test_a_utf8_bom_is_accepted_in_every_format(tmp_path, suffix):
    rows = {
        ".tsv": "label\tsentence\n1\tgood film\n0\tbad film\n",
        ".csv": "label,sentence\n1,good film\n0,bad film\n",
        ".jsonl": '{"label": 1, "sentence": "good film"}\n{"label": 0, "sentence": "bad film"}\n',
        ".txt": "good film\nbad film\n",
    }[suffix]
    f = tmp_path / f"d{suffix}"
    f.write_bytes(b"\xef\xbb\xbf" + rows.encode())
    td = load_task_data(f, None, DataOptions())
    assert td.train.texts == ["good film", "bad film"]
    assert td.train.labels == (None if suffix == ".txt" else [1, 0])


def test_encoding_option_reads_latin1_files(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_bytes("label\tsentence\n1\tcaf\u00e9 cr\u00e8me\n0\tbad\n".encode("latin-1"))
    with pytest.raises(DataError, match="give it with --encoding"):
        load_task_data(f, None, DataOptions())
    td = load_task_data(f, None, DataOptions(encoding="latin-1"))
    assert td.train.texts == ["caf\u00e9 cr\u00e8me", "bad"]
    with pytest.raises(DataError, match="--encoding: unknown text encoding 'klingon'"):
        DataOptions(encoding="klingon")


def test_quoted_commas_and_quotes_are_read_exactly(tmp_path):
    texts = ['great, fun', 'he said "hi"', "line\nbreak", "tab\there"]
    f = tmp_path / "d.csv"
    with f.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "label"])
        for i, t in enumerate(texts):
            w.writerow([t, i % 2])
    td = load_task_data(f, None, DataOptions())
    assert td.train.texts == texts and td.train.labels == [0, 1, 0, 1]


def test_a_fifo_or_device_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "pipe.tsv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_task_data(fifo, None, DataOptions())  # would block forever if it were opened
    with pytest.raises(DataError, match="not a regular file"):
        load_task_data("/dev/zero", None, DataOptions(task="classification"))


def test_data_options_are_range_checked():
    from tensadapt.train import OptionError

    for kwargs, needle in [
        ({"max_length": 0}, "max_length (--max-length) must be an integer >= 1"),
        ({"max_train": -3}, "max_train (--max-train)"),
        ({"text_column": "x", "label_column": "x"}, "must differ"),
        ({"task": "regression"}, "--task must be one of"),
    ]:
        with pytest.raises(DataError, match=re.escape(needle)):
            DataOptions(**kwargs)
    for kwargs, needle in [
        ({"grad_accum": 0}, "grad_accum (--grad-accum) must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size (--batch-size)"),
        ({"epochs": 0}, "epochs (--epochs) must be a number > 0"),
        ({"max_steps": 0}, "max_steps (--max-steps)"),
        ({"lr": 0.0}, "lr (--lr) must be a number > 0"),
        ({"lr": 1e6}, "a learning rate above 1 only diverges"),
        ({"lr": float("nan")}, "must be a finite number"),
        ({"threads": -1}, "threads (--threads)"),
        ({"seed": 2**32}, "seed (--seed)"),
        ({"max_steps": 5.5}, "max_steps (--max-steps) must be an integer"),
        ({"batch_size": True}, "batch_size (--batch-size)"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
    ]:
        with pytest.raises(OptionError, match=re.escape(needle)):
            TrainOptions(**kwargs)


def test_max_length_that_leaves_no_room_for_text(data):
    with pytest.raises(DataError, match="--max-length 2: leaves no room for text"):
        prepare("tiny-bert", data[0], None, DataOptions(max_length=2))


# -- output directories: checked and claimed before anything is built ------------------------------


def test_out_is_checked_before_the_model_is_built(prepared, tmp_path, monkeypatch):
    from tensadapt.train import OutputDirError

    monkeypatch.setattr(
        trainer_mod, "build_base_model", lambda *a, **k: pytest.fail("model was built")
    )
    a_file = tmp_path / "file"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not overwrite")
    for out, needle in [
        (a_file, "exists and is not a directory"),
        (a_file / "sub", "is not a directory"),
        (foreign, "not an earlier output of this command (it holds thesis.tex)"),
    ]:
        with pytest.raises(OutputDirError, match=re.escape(needle)):
            train(TUCKER, prepared, FAST, out=out, log=None)
    assert (foreign / "thesis.tex").read_text() == "do not overwrite"


def test_out_in_an_unwritable_directory(tmp_path, monkeypatch):
    from tensadapt.train import OutputDirError, check_output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    # the permission check itself is the OS's (root passes any mode bit): answer "no" for ro
    real = os.access
    monkeypatch.setattr(tr_outdir.os, "access", lambda p, mode: Path(p) != ro and real(p, mode))
    with pytest.raises(OutputDirError, match="is not writable"):
        check_output_dir(ro / "run" / "deeper", tr_outdir.RUN_FILES)
    assert not (ro / "run").exists()


def test_claim_locks_the_directory_and_takes_over_a_stale_lock(tmp_path):
    import subprocess
    import sys

    from tensadapt.train import OutputDirError, claim_output_dir

    d = tmp_path / "run"
    first = claim_output_dir(d, tr_outdir.RUN_FILES)
    with pytest.raises(OutputDirError, match=f"in use by process {os.getpid()}"):
        claim_output_dir(d, tr_outdir.RUN_FILES)
    first.release()
    assert not (d / tr_outdir.LOCK_FILE).exists()
    # an earlier run's files are fine; a lock left by a dead process is taken over
    (d / "metrics.json").write_text("{}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / tr_outdir.LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": __import__("socket").gethostname()}))
    with claim_output_dir(d, tr_outdir.RUN_FILES) as c:
        assert json.loads(c.lock.read_text())["pid"] == os.getpid()
    assert not (d / tr_outdir.LOCK_FILE).exists()


def test_cli_train_refuses_out_before_reading_data(data, tmp_path, capsys, monkeypatch):
    import tensadapt.train.encode as encode_mod

    monkeypatch.setattr(encode_mod, "load_task_data", lambda *a, **k: pytest.fail("data was read"))
    spec = tmp_path / "s.yaml"
    spec.write_text("factorization: cp\nmodes: [qkv, depth]\nrank: 2\n")
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    argv = ["train", str(spec), "--model", "tiny-bert", "--data", str(data[0]), "--out", str(a_file)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {a_file}: exists and is not a directory" in err and "Traceback" not in err


# -- a loss that explodes stops the run, saves nothing a sweep trusts ------------------------------


class _BlowUp(TrainerCallback):
    """Multiplies the classifier's weights by 1e4 after step ``at``: a finite loss explosion."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            with torch.no_grad():
                model.classifier.weight.mul_(1e4)


def test_divergence_callback_definition():
    from types import SimpleNamespace

    from tensadapt.errors import DivergenceError, NonFiniteError
    from tensadapt.numerics import DivergenceCallback

    def feed(cb, losses):
        cb.on_train_begin(None, None, None)
        for step, loss in enumerate(losses, start=1):
            cb.on_log(None, SimpleNamespace(global_step=step), None, logs={"loss": loss})

    cb = DivergenceCallback(factor=10, chance_loss=math.log(2))
    feed(cb, [0.69, 2.0, 6.8, 0.5])  # noisy but below 10 x 0.69
    assert cb.limit == pytest.approx(10 * math.log(2))  # chance loss ln 2 > first loss 0.69
    with pytest.raises(DivergenceError) as err:
        feed(cb, [0.69, 1.0, 7.5])
    assert (err.value.step, err.value.loss) == (3, 7.5) and err.value.limit == cb.limit
    assert "training diverged at step 3: loss 7.5 is above 6.931" in str(err.value)
    # the reference is the larger of the first loss and the chance loss
    cb = DivergenceCallback(factor=10, chance_loss=math.log(2))
    feed(cb, [3.0, 29.0])
    assert cb.limit == pytest.approx(30.0)
    cb = DivergenceCallback(factor=10, chance_loss=math.log(50_000))  # causal LM, first loss 2
    feed(cb, [2.0, 100.0])
    with pytest.raises(NonFiniteError, match="the training loss is inf at step 2"):
        feed(cb, [2.0, math.inf])
    with pytest.raises(ValueError, match="factor must be > 1"):
        DivergenceCallback(factor=1.0)


@pytest.mark.slow
def test_exploding_loss_stops_the_run_and_saves_no_metrics(prepared, tmp_path):
    from tensadapt.errors import DivergenceError

    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match="training diverged at step 3") as err:
        train(TUCKER, prepared, FAST, out=out, log=None, callbacks=[_BlowUp(at=2)])
    assert err.value.loss > err.value.limit >= 10 * math.log(2)
    assert sorted(p.name for p in out.iterdir()) == ["failed.json"]
    # a re-run into the same directory that succeeds replaces failed.json by a finished run
    m = train(TUCKER, prepared, FAST, out=out, log=None)
    assert m["steps"] == 5 and not (out / "failed.json").exists()
    assert (out / "metrics.json").exists() and not (out / tr_outdir.LOCK_FILE).exists()


@pytest.mark.slow
def test_sweep_reports_a_diverged_run_and_does_not_count_it(prepared, tmp_path, monkeypatch):
    from tensadapt.spec import load_spec

    real = trainer_mod.training_callbacks

    def with_blowup(opts, prepared, desc, extra=()):
        return real(opts, prepared, desc, [*extra, _BlowUp(at=2)] if desc == "bad" else extra)

    monkeypatch.setattr(trainer_mod, "training_callbacks", with_blowup)
    specs = [("good", load_spec(TUCKER | {"name": "good"})), ("bad", load_spec(TUCKER | {"name": "bad"}))]
    res = sweep(specs, prepared, tmp_path, seeds=[0], opts=FAST, log=None)
    assert (res.trained, res.skipped) == (1, 0)
    assert [r["spec"] for r in res.rows] == ["good"]
    assert [run for run, _ in res.failed] == ["bad/seed0"] and "diverged" in res.failed[0][1]
    assert not (tmp_path / "runs" / "bad" / "seed0" / "metrics.json").exists()
    # resume: the finished run is skipped, the failed one reported again, not retrained
    res2 = sweep(specs, prepared, tmp_path, seeds=[0], opts=FAST, log=None)
    assert (res2.trained, res2.skipped, len(res2.failed)) == (0, 1, 1)


def test_a_kept_tokenizer_is_reused_and_refused_for_other_texts(data, tmp_path):
    # the tokenizers trainers break frequency ties differently in each process: a sweep keeps its
    # trained tokenizer so that its workers and a resumed sweep tokenise alike
    kept = tmp_path / "tok"
    a = prepare("tiny-bert", *data, DataOptions(max_length=24), tokenizer_dir=kept)
    assert (kept / "tokenizer.json").is_file() and "kept in" not in a.tokenizer_source
    b = prepare("tiny-bert", *data, DataOptions(max_length=24), tokenizer_dir=kept)
    assert f"kept in {kept}" in b.tokenizer_source
    assert [x["input_ids"] for x in b.train] == [x["input_ids"] for x in a.train]
    assert b.config.pad_token_id == a.tokenizer.pad_token_id
    other = _tsv(tmp_path / "other.tsv", [(0, "quite different words"), (1, "entirely new text")])
    with pytest.raises(DataError, match="tokenizer trained on other training texts"):
        prepare("tiny-bert", other, None, DataOptions(max_length=24), tokenizer_dir=kept)
    assert not list(tmp_path.glob(".tok.*.tmp"))


# -- the spec's training: section (issue 11 item 4) -------------------------------------------
RECIPE_SPEC = {
    "factorization": "cp",
    "modes": ["qkv", "depth"],
    "rank": 2,
    "training": {
        "lr": 3e-3,
        "head_lr": 5e-2,
        "schedule": "cosine",
        "warmup_ratio": 0.1,
        "epochs": 2,
        "batch_size": 4,
        "weight_decay": 0.01,
        "max_length": 12,
    },
}


def test_spec_training_section_reaches_training_arguments_and_flags_override_it(tmp_path):
    from tensadapt.spec import load_spec
    from tensadapt.train.recipe import resolve_recipe
    from tensadapt.train.trainer import training_arguments

    spec = load_spec(RECIPE_SPEC)
    r = resolve_recipe(TrainOptions(), spec, tokenised_at=128)
    a = training_arguments(r.opts, str(tmp_path))
    assert (a.learning_rate, a.lr_scheduler_type.value, a.warmup_steps) == (3e-3, "cosine", 0.1)
    assert (a.num_train_epochs, a.per_device_train_batch_size, a.weight_decay) == (2.0, 4, 0.01)
    assert (r.opts.head_lr, r.opts.max_length) == (5e-2, 12)
    assert set(r.source.values()) == {"spec", "default"} and r.source["lr"] == "spec"

    # a flag (an option that is set) overrides one key; the others stay the spec's
    r = resolve_recipe(TrainOptions(lr=1e-4, schedule="constant", max_length=20), spec, 128)
    a = training_arguments(r.opts, str(tmp_path))
    assert (a.learning_rate, a.lr_scheduler_type.value) == (1e-4, "constant_with_warmup")
    assert (a.num_train_epochs, r.opts.head_lr, r.opts.max_length) == (2.0, 5e-2, 20)
    assert r.source["lr"] == r.source["schedule"] == "given" and r.source["epochs"] == "spec"

    # no training section: the defaults; head_lr / head decay follow lr / weight_decay
    r = resolve_recipe(TrainOptions(lr=2e-3), load_spec({"factorization": "lora"}), 64)
    a = training_arguments(r.opts, str(tmp_path))
    assert (a.learning_rate, a.lr_scheduler_type.value, a.warmup_steps) == (2e-3, "linear", 0.06)
    assert (r.opts.head_lr, r.opts.head_weight_decay, r.opts.max_length) == (2e-3, 0.0, 64)

    with pytest.raises(OptionError, match="schedule"):
        TrainOptions(schedule="step")


@pytest.mark.slow
def test_head_lr_reaches_the_heads_param_group_and_metrics_record_the_recipe(prepared, tmp_path):
    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            seen["groups"] = {g["name"]: g for g in optimizer.param_groups}
            seen["head"] = {
                id(p) for n, p in model.named_parameters() if "classifier" in n and p.requires_grad
            }
            seen["adapter"] = {id(p) for p in get_adapter(model).parameters()}

    m = train(RECIPE_SPEC, prepared, FAST, out=tmp_path / "run", log=None, callbacks=[Spy()])
    g = seen["groups"]
    # the peak rates (the scheduler's warm-up has set "lr" to 0 at this point)
    assert g["head"]["initial_lr"] == 5e-2 and g["adapter"]["initial_lr"] == 3e-3
    in_head = {id(p) for k in ("head", "head_no_decay") for p in g[k]["params"]}
    in_adapter = {id(p) for k in ("adapter", "adapter_no_decay") if k in g for p in g[k]["params"]}
    assert in_head == seen["head"] and in_adapter == seen["adapter"]
    assert g["head"]["weight_decay"] == 0.01 and g["head_no_decay"]["weight_decay"] == 0.0
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())["recipe"]
    assert rec == m["recipe"]
    assert (rec["lr"], rec["head_lr"], rec["schedule"], rec["max_length"]) == (
        3e-3, 5e-2, "cosine", 12
    )
    assert rec["source"]["batch_size"] == "given" and rec["source"]["head_lr"] == "spec"
    assert 12 in prepared.variants  # the spec's max_length re-tokenised the data
    assert max(len(x["input_ids"]) for x in prepared.variants[12].train) == 12


@pytest.mark.slow
def test_cli_train_flag_overrides_the_specs_recipe(data, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "factorization: lora\nrank: 2\ntraining:\n  lr: 3.0e-3\n  schedule: cosine\n"
        "  max_length: 16\n  weight_decay: 0.5\n"
    )
    out = tmp_path / "out"
    argv = ["train", str(spec), "--model", "tiny-bert", "--data", str(data[0]), "--out", str(out)]
    fast = ["--max-steps", "2", "--batch-size", "8", "--threads", "1", "--no-progress"]
    assert main([*argv, *fast, "--lr", "1e-4", "--head-weight-decay", "0.1"]) == 0
    rec = json.loads((out / "metrics.json").read_text())["recipe"]
    assert (rec["lr"], rec["schedule"], rec["max_length"]) == (1e-4, "cosine", 16)
    assert (rec["weight_decay"], rec["head_weight_decay"]) == (0.5, 0.1)
    assert rec["source"]["lr"] == "given" and rec["source"]["schedule"] == "spec"
    spec.write_text("factorization: lora\ntraining:\n  weight_decay: 5.0\n")
    capsys.readouterr()
    assert main([*argv[:2], *argv[2:6], *fast]) == 2
    assert "weight_decay (--weight-decay) must be a number >= 0 and <= 1" in capsys.readouterr().err


def test_spec_head_weight_decay_reaches_the_recipe():
    from tensadapt.spec import load_spec
    from tensadapt.train.recipe import resolve_recipe

    spec = load_spec("training: {weight_decay: 0.0, head_weight_decay: 0.1}")
    r = resolve_recipe(TrainOptions(), spec, 128)
    assert (r.opts.weight_decay, r.opts.head_weight_decay) == (0.0, 0.1)
    assert r.source["head_weight_decay"] == "spec"
    assert resolve_recipe(TrainOptions(head_weight_decay=0.2), spec, 128).opts.head_weight_decay == 0.2
