"""End to end on every family: inject, step-0 equality, merge/unmerge, save/load, PEFT export.

The product families × factorizations × mode subsets × target sets is sampled so the file stays
fast: each case (``tiny_models.CASES``, one per family and layout variant) gets two combinations,
rotating through the factorizations and the mode subsets with the case's index, one targeting the
attention projections and one every projection the family has (cross-attention and experts
included). ``TENSADAPT_FULL_FAMILIES=1`` runs the whole product instead.

Also: the same base weights laid out fused (per-head interleaved, or grouped per kv-head) and
split into separate q/k/v ``nn.Linear`` modules give the same adapted outputs for the same
factors.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import CASES, Case, build, model_inputs, outputs, tiny_config
from torch import nn

import tensadapt as ta
from tensadapt.arch import (
    BUILTIN_FAMILIES,
    EXPERT_PROJECTIONS,
    Family,
    Fused,
    Layout,
    from_config,
)
from tensadapt.model import get_adapter

FACTORIZATIONS = ("lora", "cp", "tucker", "tt", "mpo")
MODES = ("heads", "qkv", "depth")
FULL = os.environ.get("TENSADAPT_FULL_FAMILIES", "") not in ("", "0")


def _subsets(modes: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [c for n in range(len(modes) + 1) for c in itertools.combinations(modes, n)]


def _combos() -> list[Any]:
    params = []
    for i, case in enumerate(CASES):
        moe = "expert_up" in case.projections
        subsets = _subsets(MODES + ("experts",) if moe else MODES)
        if FULL:
            chosen = [
                (fact, modes, targets)
                for fact in FACTORIZATIONS
                for modes in subsets
                for targets in ("attention", "all")
            ]
        else:
            chosen = [
                (FACTORIZATIONS[i % 5], subsets[i % len(subsets)], "attention"),
                (FACTORIZATIONS[(i + 2) % 5], subsets[(3 * i + 5) % len(subsets)], "all"),
            ]
        for fact, modes, targets in chosen:
            label = f"{case.id}-{fact}-{'+'.join(modes) or 'none'}-{targets}"
            params.append(pytest.param(case, fact, list(modes), targets, id=label))
    return params


def _spec(fact: str, modes: list[str], targets: tuple[str, ...]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "factorization": fact,
        "modes": modes,
        "targets": list(targets),
        "rank": 2,
        "alpha": 4,
    }
    if fact == "mpo":
        spec["options"] = {"n_cores": 2}
    return spec


def _randomize(model: nn.Module, scale: float = 0.3, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _zero(model: nn.Module) -> None:
    with torch.no_grad():
        for p in get_adapter(model).parameters():
            p.zero_()


@pytest.mark.parametrize(("case", "fact", "modes", "targets"), _combos())
def test_family_end_to_end(
    case: Case, fact: str, modes: list[str], targets: str, tmp_path: Path
) -> None:
    config = case.config()
    arch = from_config(config)
    chosen = ("q", "k", "v", "o") if targets == "attention" else arch.projections
    model = build(config, head=True)
    inputs = model_inputs(model)
    with torch.no_grad():
        base = outputs(model, inputs)

    ta.inject(model, _spec(fact, modes, chosen), seed=0)
    adapter = get_adapter(model)
    assert {(t.layer, t.proj) for t in adapter.plan.targets} == {
        (s.layer, s.proj) for s in arch.sites if s.proj in chosen
    }
    with torch.no_grad():  # step 0: exactly the base model
        torch.testing.assert_close(outputs(model, inputs), base, rtol=0, atol=0)
    assert ta.trainable_parameters(model) == adapter.plan.n_params

    _randomize(model)
    with torch.no_grad():
        adapted = outputs(model, inputs)
        assert (adapted - base).abs().max() > 1e-4, "the update had no effect"
        ta.merge(model)
        torch.testing.assert_close(outputs(model, inputs), adapted, rtol=1e-4, atol=1e-4)
        ta.unmerge(model)
        torch.testing.assert_close(outputs(model, inputs), adapted, rtol=1e-4, atol=1e-4)

    ta.save_adapter(model, tmp_path / "adapter")
    fresh = build(config, head=True)
    ta.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(outputs(fresh, inputs), adapted, rtol=0, atol=0)

    if fact != "mpo" and not set(chosen) & set(EXPERT_PROJECTIONS):
        peft = pytest.importorskip("peft")
        from tensadapt.export import export_peft_lora

        report = export_peft_lora(model, tmp_path / "peft")
        assert report.exact
        loaded = peft.PeftModel.from_pretrained(build(config, head=True), str(tmp_path / "peft"))
        with torch.no_grad():
            got = outputs(loaded.eval(), inputs)
        torch.testing.assert_close(got, adapted, rtol=1e-4, atol=1e-5)

    _zero(model)  # unmerge gave the base weights back: no update, the base output
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, inputs), base, rtol=1e-5, atol=1e-5)


# --- fused vs split: the same weights, the same factors, the same outputs -------------------------


class SplitQKV(nn.Module):
    """A fused q/k/v module's twin made of three ``nn.Linear``: it computes the same fused
    output, each projection's rows placed where the family's :class:`Fused` says."""

    def __init__(self, fused: nn.Linear, rows: dict[str, list[int]]) -> None:
        super().__init__()
        self.width = fused.out_features
        self.rows = rows
        for proj, idx in rows.items():
            linear = nn.Linear(fused.in_features, len(idx), bias=fused.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(fused.weight[idx])
                if fused.bias is not None:
                    linear.bias.copy_(fused.bias[idx])
            self.add_module(f"{proj}_proj", linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], self.width)
        for proj, idx in self.rows.items():
            y[..., idx] = getattr(self, f"{proj}_proj")(x)
        return y


def _rows(fused: Fused | None) -> list[int]:
    assert fused is not None
    return fused.rows()


def _split_twin(model: nn.Module, config: Any) -> tuple[nn.Module, Family]:
    """A copy of ``model`` whose fused q/k/v modules are :class:`SplitQKV`, and its family."""
    arch = from_config(config)
    twin = copy.deepcopy(model)
    templates: dict[str, str] = {}
    for layer in range(arch.n_layers):
        q = arch.site(layer, "q")
        name = next(n for n, _ in twin.named_modules() if n.endswith(q.module))
        rows = {p: _rows(arch.site(layer, p).fused) for p in ("q", "k", "v")}
        twin.set_submodule(name, SplitQKV(twin.get_submodule(name), rows))
    family = next(f for f in BUILTIN_FAMILIES if config.model_type in f.model_types)
    family = family.for_config(config)  # the sizes as this config reads them
    paths = dict(family.installed_layout().paths)
    for proj in ("q", "k", "v"):
        templates[proj] = f"{paths[proj]}.{proj}_proj"
    split = dataclasses.replace(
        family,
        name=f"{family.name}_split",
        model_types=(f"{config.model_type}_split",),
        layouts=(Layout({**paths, **templates}),),
    )
    twin.config = copy.deepcopy(twin.config)
    twin.config.model_type = f"{config.model_type}_split"
    return twin, split


PAIRS = [
    # column blocks (q | k | v with grouped-query attention): what the executor already reads
    pytest.param("phi3", {}, ["heads", "qkv", "depth"], "cp", id="phi3-blocks-cp"),
    pytest.param("phi3", {}, ["qkv"], "tucker", id="phi3-blocks-tucker"),
    pytest.param("gpt_neox", {}, ["heads", "qkv", "depth"], "cp", id="neox-per-head-cp"),
    pytest.param("gpt_neox", {}, ["qkv"], "tucker", id="neox-per-head-tucker"),
    pytest.param(
        "falcon",
        dict(new_decoder_architecture=True, num_kv_heads=2),
        ["heads", "depth"],
        "tucker",
        id="falcon-grouped-tucker",
    ),
    pytest.param("falcon", dict(multi_query=False), [], "lora", id="falcon-per-head-lora"),
]


@pytest.mark.parametrize(("model_type", "overrides", "modes", "fact"), PAIRS)
def test_fused_and_split_layouts_adapt_alike(
    model_type: str,
    overrides: dict[str, Any],
    modes: list[str],
    fact: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tiny_config(model_type, **overrides)
    fused = build(config)
    split, family = _split_twin(fused, config)
    import tensadapt.plugins as plugins

    registered = plugins.family_for
    monkeypatch.setattr(
        plugins,
        "family_for",
        lambda model_type: family if model_type in family.model_types else registered(model_type),
    )
    inputs = {
        "input_ids": torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    }
    with torch.no_grad():
        torch.testing.assert_close(outputs(split, inputs), outputs(fused, inputs))

    spec = _spec(fact, modes, ("q", "k", "v", "o"))
    for model in (fused, split):
        ta.inject(model, spec, seed=0)
        _randomize(model)
    a, b = get_adapter(fused), get_adapter(split)
    assert a.plan.n_params == b.plan.n_params
    assert [(n, p.shape) for n, p in a.named_parameters()] == [
        (n, p.shape) for n, p in b.named_parameters()
    ]
    with torch.no_grad():
        adapted = outputs(fused, inputs)
        torch.testing.assert_close(outputs(split, inputs), adapted, rtol=1e-5, atol=1e-5)
        assert (adapted - outputs(build(config), inputs)).abs().max() > 1e-4
        ta.merge(fused)
        torch.testing.assert_close(outputs(fused, inputs), adapted, rtol=1e-4, atol=1e-4)
