"""Tests of tensadapt.spec: every malformed spec is reported with its path, all problems at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tensadapt.errors import Problem, SpecError
from tensadapt.factorizations import BUILTINS
from tensadapt.plugins import factorization_registry
from tensadapt.spec import (
    MODE_ALIASES,
    MODES,
    AdapterSpec,
    TrainingSpec,
    axis_names,
    json_schema,
    load_spec,
    spec_to_yaml,
    validate_files,
)

BUILTIN_NAMES = [cls.name for cls in BUILTINS]

# (id, YAML text, expected problem path, fragment of its message)
MALFORMED: list[tuple[str, str, str, str]] = [
    ("unknown-key", "rnak: 8", "rnak", "unknown key 'rnak' (did you mean 'rank'?)"),
    ("unknown-key-far", "colour: red", "colour", "valid keys: name, targets"),
    ("rank-zero", "rank: 0", "rank", "must be >= 1, got 0"),
    ("rank-negative", "rank: -4", "rank", "must be >= 1, got -4"),
    ("rank-float", "rank: 8.5", "rank", "integer >= 1"),
    ("rank-string", "rank: eight", "rank", "integer >= 1"),
    ("rank-bool", "rank: true", "rank", "integer >= 1"),
    ("rank-map-value-zero", "factorization: tucker\nrank: {in: 0, default: 4}", "rank.in", ">= 1"),
    (
        "rank-map-key-not-axis",
        "factorization: tucker\nrank: {in: 8, out: 8, qkv: 2}",
        "rank.qkv",
        "not a rank key of 'tucker' with modes []; valid keys: in, out, default",
    ),
    (
        "rank-map-alias-key",
        "factorization: tucker\nmodes: [layers]\nrank: {layers: 2, default: 4}",
        "rank.layers",
        "did you mean 'depth'?",
    ),
    (
        "rank-map-missing-axis",
        "factorization: tucker\nmodes: [qkv]\nrank: {in: 8, out: 8}",
        "rank",
        "no rank for 'qkv' and no 'default'",
    ),
    (
        "rank-map-tt-last-axis",
        "factorization: tt\nrank: {in: 4, out: 4}",
        "rank.out",
        "valid keys: in, default",
    ),
    ("rank-map-cp", "factorization: cp\nrank: {in: 4}", "rank", "takes a single integer rank"),
    ("rank-map-lora", "rank: {default: 4}", "rank", "'lora' takes a single integer rank"),
    ("rank-map-empty", "factorization: tucker\nrank: {}", "rank", "empty mapping"),
    (
        "factorization-unknown",
        "factorization: tensor",
        "factorization",
        "lora, cp, tucker, tt, mpo",
    ),
    ("factorization-typo", "factorization: tuker", "factorization", "did you mean 'tucker'?"),
    ("mode-unknown", "modes: [heads, rows]", "modes.1", "unknown mode 'rows'"),
    ("mode-dup-alias", "modes: [heads, att]", "modes.1", "already listed as 'heads' at index 0"),
    ("mode-dup-alias-layers", "modes: [depth, qkv, layers]", "modes.2", "mode 'depth'"),
    ("mode-dup-plain", "modes: [qkv, qkv]", "modes.1", "already listed"),
    ("modes-not-list", "modes: qkv", "modes", "write [qkv]"),
    ("target-unknown", "targets: [q, query]", "targets.1", "unknown projection 'query'"),
    ("target-hint", "targets: [q_proj]", "targets.0", "did you mean 'q'?"),
    ("targets-empty", "targets: []", "targets", "at least one projection"),
    ("target-duplicate", "targets: [q, k, q]", "targets.2", "listed twice"),
    ("target-not-string", "targets: [q, 3]", "targets.1", "projection name"),
    ("dropout-one", "dropout: 1.0", "dropout", "must be < 1"),
    ("dropout-negative", "dropout: -0.1", "dropout", "must be >= 0"),
    ("dropout-bool", "dropout: yes", "dropout", "must be a number"),
    ("dropout-string", "dropout: high", "dropout", "must be a number"),
    ("alpha-zero", "alpha: 0", "alpha", "must be > 0"),
    ("alpha-negative", "alpha: -16", "alpha", "must be > 0"),
    ("alpha-inf", "alpha: .inf", "alpha", "finite"),
    (
        "init-unsupported",
        "factorization: mpo\ninit: svd\nresidual: frozen",
        "init",
        "not supported by factorization 'mpo'; it supports: zeros, mpo",
    ),
    ("init-svd-no-residual", "init: svd", "init", "frozen residual"),
    ("residual-zeros-init", "residual: frozen", "residual", "init is 'zeros'"),
    ("residual-unknown", "residual: yes", "residual", "one of 'none', 'frozen' or 'nf4'"),
    ("base-nf4-residual", "init: svd\nresidual: frozen\nbase: nf4", "base", "residual: nf4"),
    ("base-unknown", "base: int8", "base", "one of 'fp' or 'nf4'"),
    ("layers-negative", "layers: [0, -1]", "layers.1", "must be >= 0, got -1"),
    ("layers-duplicate", "layers: [2, 1, 2]", "layers.2", "layer 2 is listed twice"),
    ("layers-some", "layers: some", "layers", "'all' or a list"),
    ("layers-empty", "layers: []", "layers", "adapts no layer"),
    ("layers-float", "layers: [1.5]", "layers.0", "layer index"),
    (
        "options-mpo-unknown",
        "factorization: mpo\noptions: {n_core: 3}",
        "options.n_core",
        "did you mean 'n_cores'?",
    ),
    (
        "options-mpo-type",
        "factorization: mpo\noptions: {n_cores: three}",
        "options.n_cores",
        "must be an integer",
    ),
    ("options-mpo-range", "factorization: mpo\noptions: {n_cores: 0}", "options.n_cores", ">= 1"),
    ("options-lora", "options: {r: 3}", "options.r", "'lora' takes no options"),
    ("options-not-mapping", "options: [1, 2]", "options", "must be a mapping"),
    ("modules-not-list", "modules_to_save: classifier", "modules_to_save", "write [classifier]"),
    ("modules-dup", "modules_to_save: [a, a]", "modules_to_save.1", "listed twice"),
    ("name-not-string", "name: [a]", "name", "must be a string"),
    ("top-level-list", "- q\n- k", "", "must be a mapping"),
    ("top-level-scalar", "8", "", "must be a mapping"),
    ("yaml-syntax", "rank: 8\ntargets: [q, k\n", "", "line 3, column 1"),
    ("yaml-tab", "rank: 8\n\ttargets: [q]\n", "", "YAML syntax error at line 2"),
    ("empty-document", "", "", "empty spec"),
    ("comment-only", "# nothing here\n", "", "empty spec"),
    ("duplicate-yaml-key", "rank: 8\nalpha: 1\nrank: 4", "rank", "given twice (lines 1 and 3)"),
    ("non-string-key", "1: 2", "1", "keys must be strings"),
    # strict types: no string-to-number, no bool-as-int
    ("alpha-string", 'alpha: "16"', "alpha", "must be a number, got '16'"),
    ("dropout-string-number", 'dropout: "0.5"', "dropout", "must be a number, got '0.5'"),
    ("rank-string-number", 'rank: "8"', "rank", "integer >= 1"),
    (
        "rank-map-value-bool",
        "factorization: tucker\nrank: {in: true, default: 2}",
        "rank.in",
        "must be an integer, got true",
    ),
    ("layers-bool", "layers: [true]", "layers.0", "layer index"),
    ("name-number", "name: 123", "name", "must be a string, got 123"),
    (
        "options-mpo-bool",
        "factorization: mpo\noptions: {n_cores: true}",
        "options.n_cores",
        "must be an integer, got true",
    ),
    (
        "options-mpo-string-number",
        'factorization: mpo\noptions: {n_cores: "3"}',
        "options.n_cores",
        "must be an integer, got '3'",
    ),
    (
        "options-mpo-float",
        "factorization: mpo\noptions: {in_shape: [4, 4.5, 48]}",
        "options.in_shape.1",
        "must be an integer",
    ),
    # modes, layout and orientation
    (
        "heads-without-attention-target",
        "targets: [up, down]\nmodes: [heads]",
        "modes",
        "mode 'heads' splits the heads of attention projections, but targets [up, down] has none",
    ),
    (
        "strided-without-heads",
        "head_layout: strided\nmodes: [qkv]",
        "head_layout",
        "[qkv] has no 'heads'",
    ),
    (
        "head-layout-unknown",
        "head_layout: interleaved",
        "head_layout",
        "one of 'contiguous' or 'strided'",
    ),
    (
        "orientation-unknown",
        "orientation: transposed",
        "orientation",
        "one of 'head-consistent' or 'lorta'",
    ),
    # initialisers (from the registry, without torch)
    (
        "init-unknown",
        "init: svdd\nresidual: frozen",
        "init",
        "unknown initializer 'svdd' (did you mean 'svd'?)",
    ),
    (
        "init-lorta-on-tucker",
        "factorization: tucker\ninit: lorta",
        "init",
        "not supported by factorization 'tucker'; it supports: zeros, svd, tenslora",
    ),
    (
        "init-lorta-residual",
        "factorization: cp\ninit: lorta\nresidual: frozen",
        "residual",
        "init is 'lorta', which does not start from the pretrained weights",
    ),
    # the training section
    (
        "training-unknown-key",
        "training: {lrr: 0.1}",
        "training.lrr",
        "unknown key 'lrr' (did you mean 'lr'?)",
    ),
    (
        "training-unknown-far",
        "training: {optimizer: adam}",
        "training.optimizer",
        "valid keys: lr, head_lr, schedule",
    ),
    ("training-lr-zero", "training: {lr: 0}", "training.lr", "must be > 0"),
    ("training-lr-string", 'training: {lr: "1e-3"}', "training.lr", "must be a number, got '1e-3'"),
    ("training-head-lr-inf", "training: {head_lr: .inf}", "training.head_lr", "finite"),
    (
        "training-schedule",
        "training: {schedule: step}",
        "training.schedule",
        "one of 'linear', 'cosine' or 'constant'",
    ),
    ("training-warmup-one", "training: {warmup_ratio: 1}", "training.warmup_ratio", "must be < 1"),
    ("training-epochs-zero", "training: {epochs: 0}", "training.epochs", "must be > 0"),
    (
        "training-batch-float",
        "training: {batch_size: 8.0}",
        "training.batch_size",
        "must be an integer, got 8.0",
    ),
    (
        "training-batch-bool",
        "training: {batch_size: true}",
        "training.batch_size",
        "must be an integer, got true",
    ),
    (
        "training-decay-negative",
        "training: {weight_decay: -0.1}",
        "training.weight_decay",
        "must be >= 0",
    ),
    (
        "training-max-length-zero",
        "training: {max_length: 0}",
        "training.max_length",
        "must be >= 1",
    ),
    ("training-not-mapping", "training: 3", "training", "must be a mapping, got 3"),
]


def _problems(text: str) -> tuple[Problem, ...]:
    with pytest.raises(SpecError) as info:
        load_spec(text)
    assert info.value.source == "<string>"
    return info.value.problems


def test_table_is_large() -> None:
    assert len(MALFORMED) >= 25
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(
    ("text", "path", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed(text: str, path: str, fragment: str) -> None:
    problems = _problems(text)
    matching = [p for p in problems if p.path == path]
    assert matching, f"no problem at {path!r}: {problems}"
    assert any(fragment in p.message for p in matching), f"{fragment!r} not in {matching}"


@pytest.mark.parametrize(
    ("text", "path", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_as_dict_same_problem(text: str, path: str, fragment: str) -> None:
    """The same mistakes given as a dict are found too (minus YAML-only ones, and without lines)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    if not isinstance(data, dict) or "given twice" in fragment:
        return
    with pytest.raises(SpecError) as info:
        load_spec(data)
    assert info.value.source == "<dict>"
    assert any(p.path == path and fragment in p.message for p in info.value.problems)
    assert not any("(line " in p.message for p in info.value.problems)


def test_three_problems_at_once() -> None:
    problems = _problems("rnak: 8\ndropout: 2\nfactorization: nope\n")
    assert [p.path for p in problems] == ["rnak", "dropout", "factorization"]  # in line order
    assert "(line 2)" in problems[1].message


def test_cross_checks_run_when_another_field_is_invalid() -> None:
    problems = _problems(
        "dropout: 2\nresidual: frozen\nfactorization: tucker\nrank: {bogus: 2, default: 1}"
    )
    assert {p.path for p in problems} == {"dropout", "residual", "rank.bogus"}


def test_invalid_field_is_not_reported_twice() -> None:
    # an unknown factorization must not also make init/options/rank look wrong
    problems = _problems(
        "factorization: nope\ninit: mpo\nresidual: frozen\nrank: {in: 2}\noptions: {a: 1}"
    )
    assert [p.path for p in problems] == ["factorization"]


def test_many_problems_in_one_field() -> None:
    problems = _problems("targets: [q, query, q, 7]")
    assert [p.path for p in problems] == ["targets.1", "targets.2", "targets.3"]


def test_error_message_lists_everything() -> None:
    with pytest.raises(SpecError) as info:
        load_spec("rank: 0\nalpha: 0\n", source_name="my.yaml")
    text = str(info.value)
    assert text.startswith("my.yaml: 2 problem(s)")
    assert "rank: must be >= 1, got 0 (line 1)" in text
    assert "alpha: must be > 0" in text


# -- valid specs ---------------------------------------------------------------------------------

VALID: list[str] = [
    "{}",
    "rank: 16\nalpha: 32\ndropout: 0.05\ntargets: [v, q]",
    "factorization: cp\nmodes: [heads, qkv, depth]\ntargets: [q, k, v, o]\nrank: 8",
    "factorization: tucker\nmodes: [qkv, layers]\nrank: {in: 8, out: 8, qkv: 3, depth: 4}",
    "factorization: tucker\nmodes: [att]\nrank: {default: 4, heads: 2}",
    "factorization: tt\nmodes: [qkv, depth]\nrank: {in: 8, out: 8, qkv: 3}",
    "factorization: mpo\ninit: mpo\nresidual: frozen\nrank: 8\noptions: {n_cores: 5}",
    "factorization: mpo\ninit: mpo\nresidual: nf4\noptions: {in_shape: [4, 4, 48], out_shape: [4, 4, 48], n_cores: 3}",
    "init: svd\nresidual: frozen\nname: pissa-like",
    "base: nf4\ntargets: [q, k, v, o, up, gate, down]\nmodules_to_save: [classifier]",
    "layers: [11, 0, 5]\nname: '123'",
    "alpha: null\noptions: null",
    "orientation: lorta\nhead_layout: strided\nfactorization: cp\nmodes: [heads, qkv, depth]\n"
    "targets: [q, k, v, o]\nrank: 4",
    "factorization: cp\ninit: lorta\nmodes: [heads, qkv, depth]\ntargets: [q, k, v, o]\nalpha: 1",
    "factorization: tucker\ninit: tenslora\nmodes: [qkv, depth]\nrank: {default: 4}",
    "factorization: cp\ninit: tenslora\nmodes: [heads, qkv]",
    "targets: [q, up]\nmodes: [heads]",
    "training: {lr: 0.0005, head_lr: 0.01, schedule: cosine, warmup_ratio: 0.06, epochs: 3, "
    "batch_size: 32, weight_decay: 0.01, max_length: 128}",
    "training: {epochs: 0.5, lr: 1}",
    "training: {}",
    "training: null",
]


@pytest.mark.parametrize("text", VALID)
def test_valid_round_trip(text: str) -> None:
    spec = load_spec(text)
    dumped = spec_to_yaml(spec)
    again = load_spec(dumped)
    assert again == spec
    assert hash(again) == hash(spec)
    assert set(yaml.safe_load(dumped)) == set(AdapterSpec.model_fields)  # every default written
    assert load_spec(spec.to_dict()) == spec
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()


def test_defaults() -> None:
    spec = load_spec("{}")
    assert spec.targets == ("q", "k", "v")
    assert spec.modes == ()
    assert spec.factorization == "lora"
    assert spec.rank == 8
    assert spec.alpha is None and spec.scaling == 1.0
    assert spec.dropout == 0.0
    assert (spec.init, spec.residual, spec.base) == ("zeros", "none", "fp")
    assert spec.layers == "all"
    assert spec.modules_to_save == ()
    assert spec.options == {}
    assert spec.name is None
    assert (spec.orientation, spec.head_layout, spec.training) == (
        "head-consistent",
        "contiguous",
        None,
    )
    assert spec == AdapterSpec()


def test_training_section() -> None:
    spec = load_spec("training: {lr: 2e-3, schedule: cosine, batch_size: 16}")
    assert spec.training == TrainingSpec(lr=2e-3, schedule="cosine", batch_size=16)
    assert spec.training is not None and spec.training.head_lr is None
    assert yaml.safe_load(spec_to_yaml(spec))["training"] == {
        "lr": 0.002,
        "head_lr": None,
        "schedule": "cosine",
        "warmup_ratio": None,
        "epochs": None,
        "batch_size": 16,
        "weight_decay": None,
        "head_weight_decay": None,
        "max_length": None,
    }
    assert load_spec("training: {lr: 1}").training.lr == 1.0  # type: ignore[union-attr]
    # YAML 1.2 exponents without a dot are numbers (PyYAML's YAML 1.1 would read '2e-3' as text)
    assert load_spec("training: {lr: 2e-3, head_lr: 1E+1}").training == TrainingSpec(
        lr=0.002, head_lr=10.0
    )
    with pytest.raises(SpecError, match="name: must be a string, got 100000.0"):
        load_spec("name: 1e5")  # a number, as in YAML 1.2 (quote it for a name)
    assert load_spec("{}").training is None


def test_problems_in_training_and_elsewhere_all_at_once() -> None:
    problems = _problems(
        "alpha: '16'\ntraining:\n  lr: -1\n  lrr: 2\nmodes: [heads]\ntargets: [up]"
    )
    assert [(p.path, p.message.rsplit(" (line", 1)[1]) for p in problems] == [
        ("alpha", " 1)"),
        ("training.lr", " 3)"),
        ("training.lrr", " 4)"),
        ("modes", " 5)"),
    ]


@pytest.mark.parametrize(
    ("modes", "canonical"),
    [
        (["att"], ("heads",)),
        (["attention", "qkv"], ("heads", "qkv")),
        (["layers"], ("depth",)),
        (["layers", "qkv", "att"], ("heads", "qkv", "depth")),
        (["depth", "heads"], ("heads", "depth")),
    ],
)
def test_modes_aliases_normalise(modes: list[str], canonical: tuple[str, ...]) -> None:
    spec = load_spec({"modes": modes})
    assert spec.modes == canonical
    assert yaml.safe_load(spec_to_yaml(spec))["modes"] == list(canonical)


def test_targets_and_layers_canonical_order() -> None:
    spec = load_spec("targets: [down, v, q]\nlayers: [3, 1, 2]")
    assert spec.targets == ("q", "v", "down")
    assert spec.layers == (1, 2, 3)


@pytest.mark.parametrize(
    ("modes", "axes"),
    [
        ([], ("in", "out")),
        (["qkv"], ("in", "out", "qkv")),
        (["heads"], ("in", "head_dim", "heads")),
        (["att", "layers"], ("in", "head_dim", "heads", "depth")),
        (["depth", "qkv", "heads"], ("in", "head_dim", "heads", "qkv", "depth")),
    ],
)
def test_axis_names(modes: list[str], axes: tuple[str, ...]) -> None:
    assert axis_names(modes) == axes


@pytest.mark.parametrize(
    ("text", "scaling"),
    [
        ("alpha: 16\nrank: 8", 2.0),
        ("rank: 4", 1.0),
        ("factorization: tucker\nrank: {in: 8, out: 2}\nalpha: 4", 0.5),
    ],
)
def test_scaling(text: str, scaling: float) -> None:
    assert load_spec(text).scaling == scaling


def test_parsed_options() -> None:
    opts = load_spec("factorization: mpo\noptions: {n_cores: 3}").parsed_options()
    assert isinstance(opts, BaseModel)
    assert opts.n_cores == 3  # type: ignore[attr-defined]
    assert load_spec("factorization: mpo").options == {}
    assert load_spec("factorization: mpo").parsed_options().n_cores == 5  # type: ignore[attr-defined]


def test_options_tuples_stored_as_plain_lists() -> None:
    spec = load_spec({"factorization": "mpo", "options": {"in_shape": (4, 4, 48), "n_cores": 3}})
    assert spec.options == {"in_shape": [4, 4, 48], "n_cores": 3}
    assert load_spec(spec_to_yaml(spec)) == spec


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_every_builtin_factorization_accepts_defaults_and_its_inits(name: str) -> None:
    cls = next(c for c in BUILTINS if c.name == name)
    for init in cls.inits:
        residual = "none" if init == "zeros" else "frozen"
        spec = load_spec({"factorization": name, "init": init, "residual": residual})
        assert spec.get_factorization().name == name


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_rank_mapping_keys_follow_the_factorization(name: str) -> None:
    cls = next(c for c in BUILTINS if c.name == name)
    modes = ["heads", "qkv", "depth"]
    keys = cls().rank_keys(axis_names(modes))
    data = {"factorization": name, "modes": modes, "rank": {k: 2 for k in keys} or {"default": 2}}
    if keys:
        assert load_spec(data).rank == {k: 2 for k in keys}
    else:
        with pytest.raises(SpecError, match="single integer rank"):
            load_spec(data)


def test_frozen_and_strict_construction() -> None:
    spec = load_spec("rank: 4")
    with pytest.raises(ValidationError):
        spec.rank = 5  # type: ignore[misc]
    with pytest.raises(ValidationError, match="single integer rank"):
        AdapterSpec(factorization="cp", rank={"in": 2})
    with pytest.raises(ValidationError, match="extra|unknown"):
        AdapterSpec(rnak=3)  # type: ignore[call-arg]


# -- sources -------------------------------------------------------------------------------------


def test_load_from_paths_and_objects(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("# a comment\nfactorization: cp\nrank: 4\n")
    by_path = load_spec(f)
    assert by_path.factorization == "cp"
    assert load_spec(str(f)) == by_path
    assert load_spec(by_path) is by_path
    assert load_spec({"factorization": "cp", "rank": 4}) == by_path
    j = tmp_path / "a.json"
    j.write_text(json.dumps({"factorization": "cp", "rank": 4}))
    assert load_spec(j) == by_path
    yml = tmp_path / "b.yml"
    yml.write_text("factorization: cp\nrank: 4\n")
    assert load_spec(str(yml)) == by_path


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("rank: 0\n")
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert info.value.source == str(f)
    assert info.value.problems == (Problem("rank", "must be >= 1, got 0 (line 1)"),)

    with pytest.raises(SpecError, match="file not found"):
        load_spec(str(tmp_path / "missing.yaml"))
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "missing")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(str(tmp_path))
    bad_json = tmp_path / "c.json"
    bad_json.write_text('{"rank": 4,}')
    with pytest.raises(SpecError, match="JSON syntax error at line 1"):
        load_spec(bad_json)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match="empty spec"):
        load_spec(empty)


def test_validate_files(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("factorization: tucker\nmodes: [qkv]\nrank: {default: 4}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 0\ndropout: 1\n")
    missing = tmp_path / "nope"  # no extension: still a file, never YAML text
    results = validate_files([good, str(bad), missing, tmp_path])
    assert results[str(good)] == []
    assert [p.path for p in results[str(bad)]] == ["rank", "dropout"]
    assert "file not found" in results[str(missing)][0].message
    assert "is a directory" in results[str(tmp_path)][0].message
    assert list(results) == [str(good), str(bad), str(missing), str(tmp_path)]


# -- no torch, no plugin for a spec of built-ins --------------------------------------------------


def test_spec_of_builtins_imports_no_torch_no_transformers_no_plugin() -> None:
    """``import tensadapt.spec``, ``load_spec`` of built-in names and ``json_schema()`` (which
    lists every plugin, so loads them) never import torch or transformers; only a name the
    built-ins lack imports plugins."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "def seen():\n"
        "    return sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "import tensadapt.spec as s\n"
        "print(seen())\n"
        f"s.load_spec({str(root / 'specs' / 'lorta.yaml')!r})\n"
        "s.load_spec({'factorization': 'mpo', 'init': 'mpo', 'residual': 'frozen'})\n"
        "s.load_spec({'factorization': 'cp', 'init': 'lorta', 'training': {'lr': 1e-3}})\n"
        "print(seen(), sorted(m for m in sys.modules if m.startswith('tensadapt_')))\n"
        "s.json_schema()\n"
        "print(seen())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[]", "[] []", "[]"]


# -- JSON Schema ---------------------------------------------------------------------------------


def test_json_schema() -> None:
    schema = json_schema()
    text = json.dumps(schema)
    assert json.loads(text) == schema
    assert schema["title"] == "tensadapt adapter spec"
    props = schema["properties"]
    assert set(props) == set(AdapterSpec.model_fields)
    for name, field in AdapterSpec.model_fields.items():
        assert field.description and len(field.description) > 20, name
        assert props[name]["description"].startswith(field.description)
    # built-ins first, then installed plugins (the test set-up installs tensadapt-tensor-ring)
    enum = props["factorization"]["enum"]
    assert enum[: len(BUILTIN_NAMES)] == BUILTIN_NAMES
    assert enum == factorization_registry().names()
    assert props["targets"]["items"]["enum"] == [
        *("q", "k", "v", "o", "up", "gate", "down"),
        *("cross_q", "cross_k", "cross_v", "cross_o", "expert_up", "expert_gate", "expert_down"),
    ]
    assert set(props["modes"]["items"]["enum"]) == {*MODES, *MODE_ALIASES}
    assert "n_cores" in props["options"]["description"]
    assert schema.get("additionalProperties") is False


# -- property: nothing but SpecError, and successes round-trip -----------------------------------

_TOKENS = st.sampled_from(
    [
        *BUILTIN_NAMES,
        *MODES,
        *MODE_ALIASES,
        "q",
        "k",
        "v",
        "o",
        "up",
        "down",
        "all",
        "none",
        "frozen",
        "nf4",
        "fp",
        "zeros",
        "svd",
        "mpo",
        "in",
        "out",
        "default",
        "n_cores",
        "in_shape",
    ]
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 12)
    | st.floats(allow_nan=False, width=32)
    | st.text(max_size=6)
    | _TOKENS
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_TOKENS | st.text(max_size=5) | st.integers(0, 3), inner, max_size=3)
    ),
    max_leaves=10,
)
_KEYS = st.sampled_from([*AdapterSpec.model_fields, "rnak", "extra"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_random_specs_raise_only_spec_error(data: dict[str, Any]) -> None:
    try:
        spec = load_spec(data)
    except SpecError as err:
        assert err.problems
        for p in err.problems:
            assert isinstance(p.path, str) and p.message
        return
    assert load_spec(spec_to_yaml(spec)) == spec
    assert spec.scaling > 0


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_random_yaml_text_raises_only_spec_error(data: dict[str, Any]) -> None:
    text = yaml.safe_dump(data)
    try:
        load_spec(text)
    except SpecError as err:
        assert err.problems


_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "name": st.none() | st.text(max_size=8),
    "targets": st.lists(st.sampled_from(["q", "k", "v", "o", "up", "gate", "down"]), max_size=4),
    "modes": st.lists(st.sampled_from([*MODES, *MODE_ALIASES]), max_size=3),
    "factorization": st.sampled_from(BUILTIN_NAMES),
    "rank": st.integers(0, 16)
    | st.dictionaries(
        st.sampled_from(["in", "out", "head_dim", "heads", "qkv", "depth", "default"]),
        st.integers(0, 8),
        max_size=4,
    ),
    "alpha": st.none() | st.floats(-1, 64, allow_nan=False),
    "dropout": st.floats(-0.1, 1.0, allow_nan=False),
    "init": st.sampled_from(["zeros", "svd", "mpo", "lorta", "tenslora"]),
    "orientation": st.sampled_from(["head-consistent", "lorta"]),
    "head_layout": st.sampled_from(["contiguous", "strided"]),
    "training": st.none()
    | st.fixed_dictionaries(
        {},
        optional={
            "lr": st.floats(-1, 1, allow_nan=False),
            "schedule": st.sampled_from(["linear", "cosine", "constant", "step"]),
            "warmup_ratio": st.floats(-0.5, 1.5, allow_nan=False),
            "batch_size": st.integers(-1, 64),
            "epochs": st.floats(0, 3) | st.integers(0, 3),
        },
    ),
    "residual": st.sampled_from(["none", "frozen", "nf4"]),
    "base": st.sampled_from(["fp", "nf4"]),
    "layers": st.just("all") | st.lists(st.integers(-1, 12), max_size=4),
    "modules_to_save": st.lists(st.sampled_from(["classifier", "score", "pooler"]), max_size=2),
    "options": st.just({})
    | st.fixed_dictionaries({}, optional={"n_cores": st.integers(0, 6) | st.booleans()}),
}


@st.composite
def _plausible_specs(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(list(_PLAUSIBLE)), unique=True))
    return {
        k: draw(_PLAUSIBLE[k] | _VALUES if draw(st.integers(0, 9)) == 0 else _PLAUSIBLE[k])
        for k in keys
    }


@settings(max_examples=400, deadline=None)
@given(_plausible_specs())
def test_plausible_specs(data: dict[str, Any]) -> None:
    try:
        spec = load_spec(data)
    except SpecError as err:
        assert err.problems
        paths = {p.path.split(".")[0] for p in err.problems}
        assert paths <= set(AdapterSpec.model_fields), err.problems
        return
    assert load_spec(spec_to_yaml(spec)) == spec
    assert list(spec.modes) == [m for m in MODES if m in spec.modes]
    assert list(spec.targets) == [
        t for t in ("q", "k", "v", "o", "up", "gate", "down") if t in spec.targets
    ]
    init = spec.get_initializer()
    assert init.supports(spec.factorization)
    assert init.pretrained == (spec.residual != "none")


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.y*ml"))


@pytest.mark.skipif(not SHIPPED, reason="no shipped specs")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_specs_are_valid(path: Path) -> None:
    assert validate_files([path]) == {str(path): []}
    spec = load_spec(path)
    assert load_spec(spec_to_yaml(spec)) == spec
    assert path.read_text().startswith("#"), (
        "a shipped spec opens with a comment saying how to run it"
    )
