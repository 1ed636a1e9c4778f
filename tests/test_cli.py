"""The command line: malformed specs give exit 2 with a message naming the field, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
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


# -- the command table, flags range-checked by the parser, pipes, imports (issues 10, 12, 14) -----

from tensadapt.cli import COMMANDS, EXIT_BROKEN_PIPE, build_parser  # noqa: E402


def test_the_parser_is_built_from_the_one_command_table(capsys) -> None:
    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names))
    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    assert list(sub.choices) == names
    for c in COMMANDS:
        assert main([c.name, "--help"]) == 0
        assert c.description.split()[0] in capsys.readouterr().out


def _spec_and_data(tmp_path: Path) -> tuple[str, str]:
    spec = tmp_path / "s.yaml"
    spec.write_text("factorization: cp\nmodes: [qkv, depth]\nrank: 2\n")
    data = tmp_path / "d.tsv"
    data.write_text("label\tsentence\n0\tbad\n1\tgood\n")
    return str(spec), str(data)


# (flags after `train SPEC --model tiny-bert --data DATA`, the flag the message must name)
BAD_TRAIN_FLAGS = [
    (["--grad-accum", "0"], "--grad-accum"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--max-length", "-5"], "--max-length"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--epochs", "inf"], "--epochs"),
    (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "2.5"], "--max-steps"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "1e6"], "--lr"),
    (["--lr", "1e400"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--seed", "9" * 5000], "--seed"),
    (["--max-train", "0"], "--max-train"),
    (["--max-eval", "-2"], "--max-eval"),
    (["--encoding", "klingon"], "--encoding"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--task", "regression"], "--task"),
]


@pytest.mark.parametrize(("flags", "flag"), BAD_TRAIN_FLAGS, ids=[" ".join(f)[:30] for f, _ in BAD_TRAIN_FLAGS])
def test_train_flags_are_range_checked_by_the_parser(tmp_path, capsys, flags, flag) -> None:
    spec, data = _spec_and_data(tmp_path)
    assert main(["train", spec, "--model", "tiny-bert", "--data", data, *flags]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["sweep", "--model", "tiny-bert", "--data", "d.tsv", "--out", "o", "--seeds", "0"], "--seeds"),
        (["sweep", "--model", "tiny-bert", "--data", "d.tsv", "--out", "o", "--rank", "0"], "--rank"),
        (["sweep", "--model", "tiny-bert", "--data", "d.tsv", "--out", "o", "--grad-accum", "-1"], "--grad-accum"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--threads", "-1"], "--threads"),
        (["demo", "--seed", "-5"], "--seed"),
        (["enumerate", "--rank", "0"], "--rank"),
        (["enumerate", "--params", "-10"], "--params"),
        (["export", "ad", "--to", "merged", "--out", "o", "--model", "m", "--seed", "-1"], "--seed"),
        (["export", "ad", "--to", "peft-lora", "--out", "o", "--model", "m", "--rank", "0"], "--rank"),
    ],
)
def test_other_commands_flags_are_range_checked(capsys, argv, flag) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err, err


def test_a_refused_flag_is_a_message_not_a_traceback_from_the_entry_point(tmp_path) -> None:
    spec, data = _spec_and_data(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "tensadapt.cli", "train", spec, "--model", "tiny-bert", "--data", data, "--grad-accum", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "argument --grad-accum: must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_piped_into_head_exits_quietly() -> None:
    """`tensadapt plan ... | head -1`: the reader closes the pipe early (the JSON is ~850 KB, far
    more than a pipe buffers); exit 141 like a Unix tool, no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensadapt.cli", "plan", "specs/lorta.yaml", "--model", "llama2-70b", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "BrokenPipe" not in err, err


HEAVY = ("torch", "transformers")


def _heavy_imports(argv: list[str]) -> tuple[int, list[str], str]:
    """Run ``main(argv)`` in a fresh interpreter; the heavy top-level modules it imported."""
    code = (
        "import json, sys\n"
        "from tensadapt.cli import main\n"
        f"rc = main({argv!r})\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})\n"
        "print('\\n@@' + json.dumps([rc, heavy]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    rc, heavy = json.loads(proc.stdout.rsplit("@@", 1)[1])
    return rc, heavy, proc.stderr


@pytest.mark.parametrize("argv", [["--help"], *[[c.name, "--help"] for c in COMMANDS]], ids=lambda a: " ".join(a))
def test_help_imports_no_torch(argv) -> None:
    rc, heavy, err = _heavy_imports(argv)
    assert rc == 0, err
    assert heavy == [], f"tensadapt {' '.join(argv)} imported {heavy}"


@pytest.mark.parametrize("argv", [["validate", "specs/lorta.yaml"], ["schema"]], ids=["validate", "schema"])
def test_validate_and_schema_import_no_torch(argv) -> None:
    rc, heavy, err = _heavy_imports(argv)
    assert rc == 0, err
    assert heavy == [], f"tensadapt {' '.join(argv)} imported {heavy}"


def test_commands_marked_torch_free_are_the_spec_commands() -> None:
    assert {c.name for c in COMMANDS if not c.needs_torch} == {"validate", "schema"}


def test_missing_optional_dependencies_name_the_pip_line(tmp_path, capsys, monkeypatch) -> None:
    spec, data = _spec_and_data(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    assert main(["train", spec, "--model", "tiny-bert", "--data", "hf:glue:sst2"]) == 2
    err = capsys.readouterr().err
    assert "--data hf:glue:sst2 needs the optional package 'datasets'" in err
    assert "pip install 'tensadapt[hf]'" in err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(["train", "specs/qdota.yaml", "--model", "tiny-llama", "--data", data]) == 2
    err = capsys.readouterr().err
    assert "needs the optional package 'bitsandbytes'" in err and "pip install 'tensadapt[quant]'" in err


def test_out_flags_that_name_a_file_are_refused_before_work(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    spec, data = _spec_and_data(tmp_path)
    for argv in (
        ["enumerate", "--model", "tiny-bert", "--out", str(a_file)],
        ["export", str(tmp_path), "--to", "merged", "--model", "tiny-bert", "--out", str(a_file)],
        ["sweep", "--model", "tiny-bert", "--data", data, "--specs", str(tmp_path), "--out", str(a_file)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--out {a_file}: exists and is not a directory" in err, (argv, err)


def test_flags_are_never_abbreviated(tmp_path, capsys) -> None:
    """argparse's prefix matching made `sweep --seed 0` mean `--seeds 0`; an unknown flag must be
    refused instead."""
    spec, data = _spec_and_data(tmp_path)
    argv = ["sweep", "--model", "tiny-bert", "--data", data, "--specs", str(tmp_path), "--out", "o"]
    assert main([*argv, "--seed", "3"]) == 2
    assert "unrecognized arguments: --seed 3" in capsys.readouterr().err
    assert main(["train", spec, "--model", "tiny-bert", "--data", data, "--max-st", "3"]) == 2
    assert "unrecognized arguments: --max-st" in capsys.readouterr().err


def test_train_refuses_a_model_without_a_text_task_head_before_any_work(tmp_path, capsys) -> None:
    spec, data = _spec_and_data(tmp_path)
    assert main(["train", spec, "--model", "tiny-vit", "--data", data]) == 2
    err = capsys.readouterr().err
    assert "--model tiny-vit: transformers has no sequence-classification model for a 'vit'" in err


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    """A tiny-bert classifier adapter as `tensadapt train` saves it (1 step)."""
    d = tmp_path_factory.mktemp("ad")
    spec, data = _spec_and_data(d)
    out = d / "run"
    argv = ["train", spec, "--model", "tiny-bert", "--data", data, "--max-steps", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_export_refuses_another_family_and_tampered_config_fields(trained_adapter, tmp_path, capsys) -> None:
    base = ["export", "--to", "merged", "--out", str(tmp_path / "x")]
    assert main([*base, str(trained_adapter), "--model", "tiny-gpt2"]) == 2
    assert "--model tiny-gpt2 is a 'gpt2' model, but the adapter in" in capsys.readouterr().err
    for field, value, needle in [
        ("num_labels", 1_000_000_000, "num_labels 1000000000 is not an integer in 1..10000"),
        ("num_labels", "2", "num_labels '2' is not an integer"),
        ("model_class", "os.system", "model_class 'os.system' is not a class name"),
        ("model_class", ["x"], "model_class ['x'] is not a class name"),
    ]:
        bad = tmp_path / f"bad-{field}-{value!s:.5}"
        shutil.copytree(trained_adapter, bad)
        _recommit(bad, field, value)
        assert main([*base, str(bad), "--model", "tiny-bert"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def _recommit(d, field, value) -> None:
    """Tamper one field of an adapter's committed config, re-signed (a careful attacker)."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    f = d / "adapter.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta["config"] = json.dumps({**json.loads(meta["config"]), field: value})
    meta["config_sha256"] = hashlib.sha256(meta["config"].encode()).hexdigest()
    save_file(load_file(str(f)), str(f), metadata=meta)


def test_an_environment_error_is_one_line_exit_1(tmp_path, capsys, monkeypatch) -> None:
    import dataclasses
    import errno

    import tensadapt.cli as cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))

    table = tuple(dataclasses.replace(c, run=full_disk) if c.name == "plugins" else c for c in COMMANDS)
    monkeypatch.setattr(cli, "COMMANDS", table)
    assert main(["plugins"]) == 1
    assert capsys.readouterr().err == f"tensadapt: error: No space left on device: {tmp_path / 'f'}\n"


def test_a_fifo_given_as_a_spec_is_refused_not_read(tmp_path, capsys, monkeypatch) -> None:
    """Opening a FIFO blocks until a writer comes: every spec argument is checked first."""
    monkeypatch.chdir(ROOT)
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    assert main(["validate", "specs/lorta.yaml", str(fifo)]) == 2
    out = capsys.readouterr().out
    assert "specs/lorta.yaml: ok" in out and f"{fifo}: 1 problem(s)" in out and "not a regular file" in out
    assert main(["plan", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err
    _, data = _spec_and_data(tmp_path)
    argv = ["sweep", "--model", "tiny-bert", "--data", data, "--specs", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "not regular files: spec.yaml" in capsys.readouterr().err


def test_export_of_an_nf4_adapter_without_bitsandbytes_names_the_extra(tmp_path, capsys, monkeypatch) -> None:
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "plan.json").write_text(json.dumps({"format_version": 1, "spec": {"factorization": "mpo", "init": "mpo", "residual": "nf4"}}))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(["export", str(ad), "--to", "merged", "--model", "tiny-llama", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "(an adapter with NF4 weights) needs the optional package 'bitsandbytes'" in err
    assert "pip install 'tensadapt[quant]'" in err
