"""Enumeration: the acceptance figures, isoparameter budgets and caps, YAML output, CLI exits."""

from __future__ import annotations

import json

import pytest
import yaml

from tensadapt.cli import main
from tensadapt.enumerate import (
    MODE_SUBSETS,
    EnumerateError,
    allocate_ranks,
    enumerate_configs,
    rank_caps,
)
from tensadapt.planner import plan
from tensadapt.spec import get_factorization, load_spec, validate_files


@pytest.fixture(scope="module")
def roberta_isorank():
    return enumerate_configs("roberta-base", rank=8, factorizations=["lora", "cp", "tucker", "tt"])


def _row(e, name):
    return next(r for r in e.rows if r.name == name)


def test_acceptance_tucker_qkv_depth_16504(roberta_isorank, capsys):
    assert _row(roberta_isorank, "tucker-qkv-depth").n_params == 16_504
    assert main(["enumerate", "--model", "roberta-base", "--rank", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    got = {(tuple(r["modes"]), r["factorization"]): r for r in rows}
    assert got[(("qkv", "depth"), "tucker")]["n_params"] == 16_504
    # a row for each of the 8 mode subsets x {cp, tucker, tt}, lora where it differs
    for modes in MODE_SUBSETS:
        for fact in ("cp", "tucker", "tt"):
            assert (modes, fact) in got, (modes, fact)
        assert ((modes, "lora") in got) == ("heads" not in modes)


def test_acceptance_lorta_6880(capsys):
    e = enumerate_configs(
        "roberta-base", rank=8, targets=["q", "k", "v", "o"], factorizations=["cp"]
    )
    assert _row(e, "cp-heads-qkv-depth").n_params == 6_880
    assert len(e.rows) == 8
    argv = ["enumerate", "--model", "roberta-base", "--rank", "8", "--targets", "q,k,v,o", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    cp = [r for r in rows if r["factorization"] == "cp" and r["modes"] == ["heads", "qkv", "depth"]]
    assert cp[0]["n_params"] == 6_880


def test_isorank_rows_match_the_planner_and_flag_ranks_over_axes(roberta_isorank):
    e = roberta_isorank
    assert e.lora_params == 36 * 8 * (768 + 768)
    for r in e.rows:
        assert r.n_params == plan(r.spec, "roberta-base").n_params
        assert r.ratio_to_lora == pytest.approx(r.n_params / e.lora_params)
        assert r.model_percent == pytest.approx(100 * r.n_params / e.model_params)
    assert _row(e, "tucker-qkv-depth").over_axis == ("qkv:8>3",)
    assert _row(e, "tucker-depth").over_axis == ()
    assert _row(e, "cp-qkv-depth").over_axis == ()  # a CP rank is not an axis rank
    assert _row(e, "lora-none").is_lora


def test_cap_ranks_caps_every_axis_rank():
    e = enumerate_configs("roberta-base", rank=8, cap_ranks=True, factorizations=["tucker"])
    row = _row(e, "tucker-qkv-depth")
    assert row.rank == {"in": 8, "out": 8, "qkv": 3, "depth": 8}
    # core 8*8*3*8 + factors 768*8*2 + 3*3 + 12*8
    assert row.n_params == 8 * 8 * 3 * 8 + 768 * 16 + 9 + 96
    assert all(not r.over_axis for r in e.rows)


def _axis_sizes(p):
    sizes: dict[str, int] = {}
    for t in p.tensors:
        for a in t.axes:
            sizes[a.name] = min(sizes.get(a.name, a.size), a.size)
    return sizes


@pytest.mark.parametrize(
    "model,targets", [("roberta-base", "q,k,v"), ("llama3-8b", "q,k,v"), ("minilm", "q,k,v,o")]
)
def test_isoparameter_rows_within_budget_ranks_within_axes_and_maximal(model, targets):
    e = enumerate_configs(
        model, budget_of="lora:8", targets=targets.split(","), factorizations=["cp", "tucker", "tt"]
    )
    lora = plan({"factorization": "lora", "targets": targets.split(","), "rank": 8}, model)
    assert e.budget == lora.n_params
    assert len(e.rows) == 24
    for r in e.rows:
        p = plan(r.spec, model)
        assert p.n_params == r.n_params <= e.budget, r.name
        assert r.n_params > 0.75 * e.budget, r.name  # the budget is actually spent
        if isinstance(r.rank, dict):
            sizes = _axis_sizes(p)
            for key, rank in r.rank.items():
                assert rank <= sizes[key], (r.name, key)
            # maximal: no rank below its cap can grow by one within the budget
            fact = get_factorization(r.factorization)
            tensors = [t.axes for t in p.tensors]
            caps = rank_caps(fact, tensors)
            for key, rank in r.rank.items():
                if rank < caps[key]:
                    bigger = sum(fact.n_params(ax, {**r.rank, key: rank + 1}) for ax in tensors)
                    assert bigger > e.budget, (r.name, key)
        else:
            grown = load_spec({**r.spec.to_dict(), "rank": r.rank + 1})
            assert plan(grown, model).n_params > e.budget, r.name


def test_params_budget_skips_rows_that_cannot_fit():
    e = enumerate_configs("roberta-base", budget=2_000, factorizations=["lora", "cp", "tucker"])
    assert all(r.n_params <= 2_000 for r in e.rows)
    assert any(r.name == "cp-heads-qkv-depth" for r in e.rows)
    skipped = dict(e.skipped)
    assert "exceeds the budget" in skipped["lora-none"]


def test_tucker_allocation_rule_levels_then_fills():
    fact = get_factorization("tucker")
    p = plan({"factorization": "tucker", "modes": ["qkv", "depth"], "rank": 1}, "roberta-base")
    tensors = [t.axes for t in p.tensors]
    ranks = allocate_ranks(fact, tensors, 442_368)
    # level 91 (qkv capped at 3, depth at 12) then the remainder grows one rank by one
    assert ranks == {"in": 92, "out": 91, "qkv": 3, "depth": 12}
    assert allocate_ranks(fact, tensors, 10) is None


def test_out_writes_valid_specs(tmp_path, capsys):
    out = tmp_path / "specs"
    argv = ["enumerate", "--model", "minilm", "--budget-of", "lora:4", "--out", str(out)]
    assert main(argv) == 0
    files = sorted(out.glob("*.yaml"))
    assert len(files) >= 20
    assert all(not problems for problems in validate_files(files).values())
    assert main(["validate", "-q", *map(str, files)]) == 0
    text = files[0].read_text()
    assert text.startswith("# ") and "tensadapt plan" in text
    d = yaml.safe_load((out / "tucker-qkv-depth.yaml").read_text())
    assert d["factorization"] == "tucker" and d["modes"] == ["qkv", "depth"]
    top = max(d["rank"].values()) if isinstance(d["rank"], dict) else d["rank"]
    assert d["alpha"] == 2 * top  # the default scale 2


def test_scale_sets_every_specs_alpha(tmp_path):
    """``--scale 1`` (the TensLoRA authors' multiplier): alpha = the largest rank in every spec."""
    out = tmp_path / "s1"
    argv = ["enumerate", "--model", "tiny-bert", "--rank", "3", "--scale", "1", "--out", str(out)]
    assert main(argv) == 0
    files = sorted(out.glob("*.yaml"))
    assert files
    for f in files:
        d = yaml.safe_load(f.read_text())
        r = d["rank"]
        top = max(r.values()) if isinstance(r, dict) else r
        assert d["alpha"] == pytest.approx(top), f.name


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--budget-of", "lora:x"], "lora:R"),
        (["--budget-of", "cp:8"], "lora:R"),
        (["--rank", "8", "--params", "100"], "exclude each other"),
        (["--params", "100", "--budget-of", "lora:8"], "either"),
        (["--params", "100", "--cap-ranks"], "isorank"),
        (["--factorizations", "tuker"], "registered: "),
        (["--targets", "q,x"], "targets"),
        (["--rank", "0"], ">= 1"),
        (["--scale", "0"], "--scale"),
        (["--scale", "nan"], "--scale"),
    ],
)
def test_cli_mistakes_exit_2(argv, needle, capsys):
    assert main(["enumerate", "--model", "tiny-bert", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_model_exits_2(capsys):
    assert main(["enumerate", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_library_errors_are_enumerate_errors():
    with pytest.raises(EnumerateError, match="lora:R"):
        enumerate_configs("tiny-bert", budget_of="lora")
