"""``tensadapt train --save-steps N`` / ``--resume`` (issue 10 item 2): a run SIGKILLed after its
step-6 checkpoint and resumed in a new process ends with the same factors and head as an
uninterrupted run (fp32, <= 1e-6 relative); checkpoints are adapter-sized.

The processes are real ``tensadapt train`` commands. To kill the first run at a known point, its
process is started through a small wrapper that adds one callback: after the step-6 checkpoint is
written it touches a marker file and sleeps; the test SIGKILLs it as soon as the marker exists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tensadapt.cli import main
from tensadapt.train import synthetic_sentiment

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
factorization: tucker
modes: [qkv, depth]
rank: 3
dropout: 0.1
training:
  lr: 5.0e-3
  head_lr: 2.0e-2
  schedule: cosine
  warmup_ratio: 0.2
"""

WRAPPER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    import tensadapt.train.trainer as trainer
    from tensadapt.cli import main

    marker, mode = Path(sys.argv[1]), sys.argv[2]
    real = trainer.training_callbacks

    class Watch(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kw):
            Watch.steps += 1  # optimizer steps this process trained

        def on_save(self, args, state, control, **kw):
            if mode == "stall" and state.global_step == 6:
                marker.touch()
                time.sleep(600)  # killed here

        def on_train_end(self, args, state, control, **kw):
            if mode == "count":
                marker.write_text(str(Watch.steps))

    def callbacks(opts, prepared, desc, extra=()):
        return real(opts, prepared, desc, [*extra, Watch()])

    trainer.training_callbacks = callbacks
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("resume")
    pairs = synthetic_sentiment(60, seed=3)
    tr, dev = d / "train.tsv", d / "dev.tsv"
    for f, rows in ((tr, pairs[:48]), (dev, pairs[48:])):
        f.write_text("label\tsentence\n" + "".join(f"{y}\t{s}\n" for y, s in rows))
    spec = d / "spec.yaml"
    spec.write_text(SPEC)
    return spec, tr, dev


def _argv(files: tuple[Path, Path, Path], out: Path) -> list[str]:
    spec, tr, dev = files
    return [
        "train", str(spec), "--model", "tiny-bert", "--data", str(tr), "--eval", str(dev),
        "--max-length", "24", "--max-steps", "12", "--batch-size", "4", "--seed", "3",
        "--threads", "1", "--no-progress", "--save-steps", "6", "--out", str(out),
    ]  # fmt: skip


def _run(args: list[str], **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )  # type: ignore[call-overload]


@pytest.mark.slow
def test_killed_run_resumed_in_a_new_process_equals_an_uninterrupted_run(
    files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    marker = tmp_path / "saved-6"

    whole = _run([sys.executable, "-m", "tensadapt.cli", *_argv(files, full)])
    first = _run([sys.executable, "-c", WRAPPER, str(marker), "stall", *_argv(files, cut)])
    while not marker.exists():  # the wrapper stalls after checkpoint 6; exiting first is a failure
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    assert whole.wait() == 0, whole.communicate()[0]
    assert not (cut / "metrics.json").exists() and (cut / ".tensadapt.lock").exists()
    ckpt = cut / "checkpoints" / "checkpoint-6"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
    assert {"tokenizer.json", "tensadapt_texts.json"} <= names  # a preset's trained tokenizer
    assert not any(n.startswith(("model.", "pytorch_model")) for n in names)

    # resumed in a new process, into the same --out (the dead process's lock is taken over)
    counted = tmp_path / "steps"
    again = _run(
        [sys.executable, "-c", WRAPPER, str(counted), "count", *_argv(files, cut), "--resume"]
    )
    log = again.communicate()[0]
    assert again.returncode == 0, log
    assert counted.read_text() == "6"  # steps 7..12 only: it continued, it did not start over

    want = load_file(str(full / "adapter.safetensors"))
    got = load_file(str(cut / "adapter.safetensors"))
    assert set(want) == set(got) and any("classifier" in k for k in want)
    for k, w in want.items():
        rel = float((got[k] - w).norm() / w.norm().clamp_min(1e-12))
        assert rel <= 1e-6, f"{k}: {rel:.2e}"
    m_full = json.loads((full / "metrics.json").read_text())
    m_cut = json.loads((cut / "metrics.json").read_text())
    assert m_cut["steps"] == m_full["steps"] == 12
    assert m_cut["resumed_from"].endswith("checkpoint-6")
    assert m_cut["eval_loss"] == pytest.approx(m_full["eval_loss"], rel=1e-5)
    assert m_cut["recipe"]["head_lr"] == 2e-2 and m_cut["recipe"]["schedule"] == "cosine"
    # adapter-sized: the tensors of a checkpoint are the trainable parameters (fp32) and their
    # two Adam moments, not the model (54,434 parameters for tiny-bert, 5.8x the trainable ones)
    last = full / "checkpoints" / "checkpoint-12"
    tensor_bytes = sum((last / f).stat().st_size for f in ("adapter.safetensors", "optimizer.pt"))
    trainable_bytes = 4 * m_full["trainable_params"]
    assert tensor_bytes < 3 * trainable_bytes + 64_000  # + headers, pickled structure
    assert tensor_bytes < 4 * 54_434
    assert {p.name for p in (full / "checkpoints").iterdir()} == {"checkpoint-6", "checkpoint-12"}


def test_resume_and_save_steps_are_checked_before_any_work(
    files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(files, tmp_path / "new")
    assert main([*argv, "--resume"]) == 2
    assert "--resume: no complete checkpoint in" in capsys.readouterr().err
    no_out = argv[: argv.index("--out")]
    assert main([*no_out]) == 2
    assert "--save-steps needs --out" in capsys.readouterr().err
    assert main([*no_out[: no_out.index("--save-steps")], "--resume"]) == 2
    assert "--resume without a directory needs --out" in capsys.readouterr().err
    half = tmp_path / "half" / "checkpoints" / "checkpoint-6"  # cut short: no trainer_state.json
    half.mkdir(parents=True)
    (half / "adapter.safetensors").write_bytes(b"")
    assert main([*argv, "--resume", str(tmp_path / "half")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main([*argv[:-2], "--save-steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--save-steps: must be an integer >= 1" in capsys.readouterr().err
