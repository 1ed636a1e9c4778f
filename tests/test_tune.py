"""``sweep --tune-lr``: per-configuration tuning on a validation part of the training data, shared
by several worker processes through one Optuna storage (issue 11 item 5).

Tests that train are marked ``slow``; the two-process test starts two real ``tensadapt sweep``
processes on one sweep directory."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("optuna")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import tensadapt.train.sweeps as sweeps_mod  # noqa: E402
from tensadapt.cli import main  # noqa: E402
from tensadapt.errors import DivergenceError  # noqa: E402
from tensadapt.spec import load_spec  # noqa: E402
from tensadapt.train import DataOptions, TrainOptions, prepare, sweep, synthetic_sentiment  # noqa: E402
from tensadapt.train.plots import _label  # noqa: E402
from tensadapt.train.tuning import (  # noqa: E402
    JOURNAL_FILE,
    TuneError,
    TuneOptions,
    open_storage,
    validation_split,
    with_scale,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = TrainOptions(max_steps=4, batch_size=8, eval_batch_size=32, threads=1, progress=False)
SPECS = [
    ("lora", load_spec({"factorization": "lora", "rank": 2})),
    ("cp", load_spec({"factorization": "cp", "modes": ["qkv", "depth"], "rank": 2})),
]


def _tsv(path: Path, pairs: list[tuple[int, str]]) -> Path:
    path.write_text("label\tsentence\n" + "".join(f"{lab}\t{s}\n" for lab, s in pairs))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tune-data")
    pairs = synthetic_sentiment(80, seed=2)
    return _tsv(d / "train.tsv", pairs[:60]), _tsv(d / "dev.tsv", pairs[60:])


@pytest.fixture(scope="module")
def prepared(data: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    return prepare("tiny-bert", *data, DataOptions(max_length=24))


def _key(ex: dict) -> tuple:  # type: ignore[type-arg]
    return (tuple(ex["input_ids"]), ex["labels"])


def _study(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(None, root))


# -- fast ----------------------------------------------------------------------------------------
def test_validation_split_is_stratified_disjoint_and_seeded(prepared) -> None:  # type: ignore[no-untyped-def]
    a = validation_split(prepared, 0.25, seed=3)
    assert a.eval is not None and prepared.eval is not None
    assert len(a.train) + len(a.eval) == len(prepared.train)
    train_ids = Counter(map(_key, prepared.train))
    assert Counter(map(_key, a.train)) + Counter(map(_key, a.eval)) == train_ids
    # per class: round(0.25 * n_c) held out
    for label in (0, 1):
        n_c = sum(ex["labels"] == label for ex in prepared.train)
        assert sum(ex["labels"] == label for ex in a.eval) == round(0.25 * n_c)
    # never the dev set: the held-out texts are training texts
    assert a.data.eval is not None and a.data.eval.source.endswith("train.tsv (held out)")
    assert Counter(a.data.train.texts) + Counter(a.data.eval.texts) == Counter(
        prepared.data.train.texts
    )
    b = validation_split(prepared, 0.25, seed=3)
    c = validation_split(prepared, 0.25, seed=4)
    assert [_key(x) for x in a.eval] == [_key(x) for x in b.eval]
    assert sorted(map(_key, a.eval)) != sorted(map(_key, c.eval))
    assert prepared.eval is not a.eval and len(prepared.train) == 60  # the input is unchanged


def test_validation_split_needs_data(prepared) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from tensadapt.train.data import Split, TaskData

    one = Split("t.tsv", prepared.data.train.texts[:1], prepared.data.train.labels[:1])
    tiny = replace(prepared, data=TaskData("classification", one, None, 2))
    with pytest.raises(TuneError, match="--val-fraction"):
        validation_split(tiny, 0.1, seed=0)


def test_with_scale_sets_alpha_to_scale_times_the_largest_rank() -> None:
    spec = load_spec(
        {"factorization": "tucker", "modes": ["qkv"], "rank": {"default": 4, "qkv": 2}}
    )
    s = with_scale(spec, 0.5)
    assert s.alpha == 2.0 and s.scaling == pytest.approx(0.5)
    assert with_scale(load_spec({"factorization": "lora", "rank": 8}), 3.0).scaling == 3.0


def test_tune_options_are_range_checked() -> None:
    with pytest.raises(TuneError, match=r"trials \(--trials\)"):
        TuneOptions(trials=0)
    with pytest.raises(TuneError, match="--lr-min .* below --lr-max"):
        TuneOptions(lr_min=1e-2, lr_max=1e-3)
    with pytest.raises(TuneError, match=r"val_fraction \(--val-fraction\)"):
        TuneOptions(val_fraction=0.8)
    with pytest.raises(TuneError, match="--tune-metric"):
        TuneOptions(metric="f1")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tune-lr", "--trials", "0"], "--trials: must be an integer >= 1"),
        (["--tune-lr", "--val-fraction", "0.9"], "--val-fraction: must be a number > 0"),
        (["--tune-lr", "--lr-min", "2"], "--lr-min: must be a number > 0 and <= 1"),
        (["--trials", "5"], "--trials tune(s) the learning rate: add --tune-lr"),
        (["--tune-scale"], "--tune-scale tune(s) the learning rate: add --tune-lr"),
        (["--tune-lr", "--lr-min", "0.1", "--lr-max", "0.01"], "must be below --lr-max"),
    ],
)
def test_cli_tuning_flags_are_checked_before_any_work(
    data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, needle
) -> None:  # type: ignore[no-untyped-def]
    argv = ["sweep", "--model", "tiny-bert", "--data", str(data[0]), "--rank", "2"]
    assert main([*argv, *flags, "--out", str(tmp_path / "sw")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_cli_without_optuna_names_the_extra(
    data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "optuna" else real(n, *a)
    )
    argv = ["sweep", "--model", "tiny-bert", "--data", str(data[0]), "--rank", "2", "--tune-lr"]
    assert main([*argv, "--out", str(tmp_path / "sw")]) == 2
    assert "pip install 'tensadapt[tune]'" in capsys.readouterr().err


def test_a_bad_storage_url_is_named(tmp_path: Path) -> None:
    with pytest.raises(TuneError, match="--storage nosuchdb://x"):
        open_storage("nosuchdb://x", tmp_path)
    open_storage(None, tmp_path)
    assert (tmp_path / JOURNAL_FILE).is_file()


def test_pareto_labels_carry_the_learning_rate() -> None:
    s = {"spec": "cp", "lr": 0.00123, "scale": 2.0}
    assert _label(s, show_scale=False) == "cp (lr 0.0012)"
    assert _label(s, show_scale=True) == "cp (lr 0.0012, scale 2)"
    assert _label({"spec": "old", "lr": "", "scale": ""}, show_scale=False) == "old"


# -- in-process sweeps ---------------------------------------------------------------------------
def _spy(monkeypatch: pytest.MonkeyPatch, fail_above: float | None = None) -> list[dict]:  # type: ignore[type-arg]
    """Record every training the sweep starts (trial or final run); optionally make runs at a
    learning rate above ``fail_above`` diverge."""
    calls: list[dict] = []  # type: ignore[type-arg]
    real = sweeps_mod.train

    def spy(spec, prepared, opts, out=None, log=None, **kw):  # type: ignore[no-untyped-def]
        calls.append(
            {
                "lr": opts.lr,
                "scale": spec.scaling,
                "seed": opts.seed,
                "final": out is not None,
                "train": list(map(_key, prepared.train)),
                "eval": list(map(_key, prepared.eval or [])),
                "eval_ids": {id(ex) for ex in prepared.eval or []},
                "eval_source": prepared.data.eval.source if prepared.data.eval else None,
            }
        )
        if fail_above is not None and opts.lr > fail_above:
            raise DivergenceError("loss exploded", step=1, loss=1e9, limit=1.0)
        return real(spec, prepared, opts, out=out, log=log, **kw)

    monkeypatch.setattr(sweeps_mod, "train", spy)
    return calls


@pytest.mark.slow
def test_tuned_sweep_trains_every_seed_at_the_best_trial_then_resumes(
    prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    calls = _spy(monkeypatch)
    tune = TuneOptions(trials=3, val_fraction=0.25, tune_scale=True, lr_min=1e-4, lr_max=1e-1)
    res = sweep(SPECS, prepared, tmp_path, seeds=[0, 1], opts=FAST, log=None, tune=tune)
    assert (res.trained, res.skipped, res.failed) == (4, 0, [])
    trials = [c for c in calls if not c["final"]]
    finals = [c for c in calls if c["final"]]
    assert len(trials) == 2 * 3 and len(finals) == 2 * 2
    dev = {id(ex) for ex in prepared.eval}  # (the synthetic texts repeat: compare objects)
    full = list(map(_key, prepared.train))
    for c in trials:  # trials: train part + validation part of the training data, never dev
        assert len(c["train"]) + len(c["eval"]) == len(full)
        assert sorted(c["train"] + c["eval"]) == sorted(full)
        assert not c["eval_ids"] & dev and c["eval_source"].endswith("train.tsv (held out)")
    for c in finals:  # final runs: the whole training data, evaluated on dev
        assert c["train"] == full and c["eval_ids"] == dev
        assert c["eval_source"].endswith("dev.tsv")

    rows = list(csv.DictReader(res.results_csv.open()))
    for name, _ in SPECS:
        study = _study(tmp_path, name)
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert len(done) == 3
        best = max(done, key=lambda t: (t.value, -t.user_attrs["val_loss"], -t.number))
        for r in (r for r in rows if r["spec"] == name):
            assert float(r["lr"]) == pytest.approx(best.params["lr"], rel=1e-12)
            assert float(r["scale"]) == pytest.approx(best.params["scale"], rel=1e-9)
        m = json.loads((tmp_path / "runs" / name / "seed1" / "metrics.json").read_text())
        assert m["tuning"]["trial"] == best.number and m["lr"] == best.params["lr"]
        assert m["n_train"] == len(full)
    tuning = list(csv.DictReader((tmp_path / "tuning.csv").open()))
    assert len(tuning) == 6 and {r["state"] for r in tuning} == {"complete"}
    assert all(float(r["time_s"]) > 0 for r in tuning)

    calls.clear()
    again = sweep(SPECS, prepared, tmp_path, seeds=[0, 1], opts=FAST, log=None, tune=tune)
    assert calls == [] and (again.trained, again.skipped) == (0, 4)
    with pytest.raises(TuneError, match="another setup .*val_fraction"):
        sweep(SPECS, prepared, tmp_path, seeds=[0], opts=FAST, log=None, tune=TuneOptions(trials=3))


@pytest.mark.slow
def test_diverged_trials_are_ranked_last_and_all_diverged_fails_the_config(
    prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    _spy(monkeypatch, fail_above=3e-3)
    tune = TuneOptions(trials=5, val_fraction=0.25, lr_min=1e-4, lr_max=1e-1)
    res = sweep(SPECS[:1], prepared, tmp_path / "a", seeds=[0], opts=FAST, log=None, tune=tune)
    study = _study(tmp_path / "a", "lora")
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.PRUNED] >= 1 and states[TrialState.COMPLETE] >= 1
    assert states[TrialState.PRUNED] + states[TrialState.COMPLETE] == 5
    assert res.trained == 1 and float(res.rows[0]["lr"]) <= 3e-3
    rows = list(csv.DictReader((tmp_path / "a" / "tuning.csv").open()))
    assert "diverged" in {r["state"] for r in rows}

    _spy(monkeypatch, fail_above=0.0)  # every learning rate diverges
    res = sweep(SPECS[:1], prepared, tmp_path / "b", seeds=[0, 1], opts=FAST, log=None, tune=tune)
    assert res.trained == 0 and len(res.failed) == 2
    assert "every one of its 5 tuning trials diverged" in res.failed[0][1]


@pytest.mark.slow
def test_a_trial_left_running_by_a_dead_worker_is_replaced(
    prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs on this host
    tune = TuneOptions(trials=2, val_fraction=0.25)
    storage = open_storage(None, tmp_path)
    study = optuna.create_study(study_name="lora", storage=storage, direction="maximize")
    orphan = study.ask()
    orphan.suggest_float("lr", tune.lr_min, tune.lr_max, log=True)
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    calls = _spy(monkeypatch)
    res = sweep(SPECS[:1], prepared, tmp_path, seeds=[0], opts=FAST, log=None, tune=tune)
    assert res.trained == 1
    trials = _study(tmp_path, "lora").trials
    assert trials[0].state == TrialState.FAIL  # the orphan, never trained here
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2
    assert sum(not c["final"] for c in calls) == 2


# -- two real worker processes -----------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import tensadapt.train.sweeps as sweeps
    from tensadapt.cli import main

    barrier = Path(sys.argv[1])
    real = sweeps.run_trial
    state = {"first": True}

    def run_trial(*a, **k):
        # both workers reach their first trial before either trains one: they compete from the start
        if state["first"]:
            state["first"] = False
            (barrier / str(os.getpid())).touch()
            t0 = time.time()
            while len(list(barrier.iterdir())) < 2 and time.time() - t0 < 300:
                time.sleep(0.05)
        return real(*a, **k)

    sweeps.run_trial = run_trial
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_two_worker_processes_share_the_studies_and_runs(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "lora.yaml").write_text("factorization: lora\nrank: 2\n")
    (specs / "cp.yaml").write_text("factorization: cp\nmodes: [qkv, depth]\nrank: 2\n")
    out, barrier = tmp_path / "sweep", tmp_path / "barrier"
    barrier.mkdir()
    n_trials, seeds = 4, 2
    argv = [
        "sweep", "--model", "tiny-bert", "--data", str(data[0]), "--eval", str(data[1]),
        "--max-length", "24", "--specs", str(specs), "--seeds", str(seeds), "--max-steps", "4",
        "--batch-size", "8", "--threads", "1", "--no-progress", "--tune-lr",
        "--trials", str(n_trials), "--val-fraction", "0.25", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(barrier), *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)

    def trials_of(text: str) -> list[tuple[str, int]]:
        return [
            (ln.split()[0], int(ln.split()[2].rstrip(":")))
            for ln in text.splitlines()
            if " trial " in ln and "validation" in ln
        ]

    def runs_of(text: str) -> list[str]:
        return [ln.split("] ")[1].split(":")[0] for ln in text.splitlines() if ": training (" in ln]

    per_worker = [trials_of(o) for o in outs]
    assert all(per_worker), f"a worker ran no trial:\n{outs[0]}\n{outs[1]}"
    every = per_worker[0] + per_worker[1]
    for name in ("lora", "cp"):  # each trial number trained once, in one worker
        assert sorted(n for c, n in every if c == name) == list(range(n_trials))
    trained = runs_of(outs[0]) + runs_of(outs[1])
    assert sorted(trained) == sorted(f"{c} seed {s}" for c in ("lora", "cp") for s in range(seeds))
    for name in ("lora", "cp"):
        study = _study(out, name)
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert sorted(t.number for t in done) == list(range(n_trials))
        workers = {t.user_attrs["worker"] for t in done}
        extra = [t for t in study.trials if t.state != TrialState.COMPLETE]
        assert all(t.user_attrs.get("surplus") for t in extra)  # closed unrun, if a race made any
        lrs = {
            json.loads((out / "runs" / name / f"seed{s}" / "metrics.json").read_text())["lr"]
            for s in range(seeds)
        }
        assert len(lrs) == 1 and lrs.pop() in {t.params["lr"] for t in done}
        assert workers  # recorded per trial (host:pid)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * seeds
