"""The public conformance kit: every registered factorization passes it (table-driven over the
registry, plugins included), each check catches the bug it is for, and the hypothesis strategies
generate what the rest of tensadapt accepts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fake_plugins import install_examples
from hypothesis import given
from hypothesis import strategies as st

import tensadapt as ta
from tensadapt import plugins
from tensadapt.factorizations.base import Factorization, default_init, make_network, reconstruct
from tensadapt.model import get_adapter
from tensadapt.testing import ConformanceError, check_factorization, ranks, specs, tensor_shapes


@pytest.fixture(scope="module")
def examples():
    """The example plugins (tensor_ring), installed from their source trees when ``make install``
    did not install them."""
    with pytest.MonkeyPatch.context() as mp:
        install_examples(mp)
        yield
    plugins.reset()


#: options a format needs on the tiny synthetic models (width 16)
OPTIONS = {"mpo": {"n_cores": 2}}
ONE_CASE = dict(models=("gpt2",), modes=[("qkv", "depth")])


def _registered() -> list[str]:
    return plugins.factorization_registry().names()


def test_the_table_covers_builtins_and_the_installed_plugin(examples) -> None:
    assert {"lora", "cp", "tucker", "tt", "mpo", "tensor_ring"} <= set(_registered())


@pytest.mark.slow
@pytest.mark.parametrize("name", _registered())
def test_every_registered_factorization_conforms(name: str) -> None:
    cls = type(plugins.factorization_registry().get(name))
    check_factorization(cls, options=OPTIONS.get(name))


# -- each check catches its bug --------------------------------------------------------------------
class Flaky(Factorization):
    """A network whose rank changes from call to call: the plan and the real factors disagree."""

    name = "kit_flaky"
    calls = 0

    def network(self, axes, rank, options):
        Flaky.calls += 1
        r = 2 + Flaky.calls % 2
        return make_network(
            [("A", ("in", "r")), ("B", ("r", *[a.name for a in axes[1:]]))],
            axes,
            {"r": r},
            zero_factor="B",
        )


class Good(Factorization):
    name = "kit_good"

    def network(self, axes, rank, options):
        rest = [a.name for a in axes[1:]]
        return make_network(
            [("A", ("in", "r")), ("B", ("r", *rest))], axes, {"r": 2}, zero_factor="B"
        )


class Missing(Factorization):
    name = "kit_missing"


class SixteenWide(Factorization):
    """Right where the model is 16 wide -- the kit's synthetic models and the loader's probe
    are -- and wrong on any other width: its input factor is sized for 16 inputs whatever the
    tensor's ``in`` axis (a forward on a real model would fail in the contraction)."""

    name = "kit_sixteen"

    def network(self, axes, rank, options):
        net = Good().network(axes, rank, options)
        a = net.factor("A")
        return dataclasses.replace(
            net, factors=(dataclasses.replace(a, shape=(16, 2)), *net.factors[1:])
        )


def test_unregistered_class_is_registered_for_the_checks_only() -> None:
    check_factorization(Good, **ONE_CASE)
    assert "kit_good" not in plugins.factorization_registry()


def test_shape_probe_catches_a_format_right_on_one_width_only() -> None:
    check_factorization(SixteenWide, shapes=0, **ONE_CASE)  # the model checks alone pass it
    with pytest.raises(
        ConformanceError,
        match=r"kit_sixteen on axes in=1, .* at rank .*: shapes: factor A has shape \(16, 2\), "
        r"its legs give \(1, 2\)",
    ):
        check_factorization(SixteenWide, **ONE_CASE)


def test_interface_check() -> None:
    with pytest.raises(
        ConformanceError, match="interface: class Missing does not implement network"
    ):
        check_factorization(Missing)


def test_name_taken_by_another_class() -> None:
    class Impostor(Good):
        name = "lora"

    with pytest.raises(
        ConformanceError, match="'lora' is registered to tensadapt.factorizations.lora.LoRA"
    ):
        check_factorization(Impostor)


def test_count_check() -> None:
    with pytest.raises(ConformanceError, match=r"kit_flaky on gpt2.*: count: tensor"):
        check_factorization(Flaky, **ONE_CASE)


def test_zero_init_check(monkeypatch) -> None:
    def noisy(network, in_axis="in", generator=None):
        return {f.name: torch.randn(f.shape) * 0.1 for f in network.factors}

    monkeypatch.setattr("tensadapt.nn.default_init", noisy)
    with pytest.raises(
        ConformanceError, match="zero-update init: tensor .* reconstructs to non-zero"
    ):
        check_factorization(Good, **ONE_CASE)


def test_gradient_check(monkeypatch) -> None:
    real = ta.inject

    def inject_with_dead_factor(model, spec, **kw):
        real(model, spec, **kw)
        for pd in get_adapter(model).factors.values():
            pd["A"].register_hook(torch.zeros_like)  # no gradient ever reaches A
        return model

    monkeypatch.setattr(ta, "inject", inject_with_dead_factor)
    with pytest.raises(ConformanceError, match=r"gradients: factor .*\.A gets no gradient"):
        check_factorization(Good, **ONE_CASE)


def test_forward_check(monkeypatch) -> None:
    real = ta.nn.AdaptedLinear.forward

    def off_by_one_percent(self, x):
        y0 = self.base(x)
        return y0 + (real(self, x) - y0) * 1.01

    monkeypatch.setattr(ta.nn.AdaptedLinear, "forward", off_by_one_percent)
    with pytest.raises(ConformanceError, match="forward == reconstruction: module .*c_attn"):
        check_factorization(Good, **ONE_CASE)


def test_merge_check(monkeypatch) -> None:
    monkeypatch.setattr(ta.nn.AdaptedLinear, "_apply_delta", lambda self, name, sign: None)
    with pytest.raises(ConformanceError, match="merge: merged output differs"):
        check_factorization(Good, **ONE_CASE)


def test_unmerge_check(monkeypatch) -> None:
    monkeypatch.setattr(ta.nn.AdaptedLinear, "unmerge", lambda self: None)
    with pytest.raises(ConformanceError, match="unmerge: module .* base weight not restored"):
        check_factorization(Good, **ONE_CASE)


def test_save_load_check(monkeypatch) -> None:
    monkeypatch.setattr(
        "tensadapt.io.load_adapter_state", lambda model, state, source="", adapter_name=None: None
    )
    with pytest.raises(ConformanceError, match=r"save/load: factor .* differs after loading"):
        check_factorization(Good, **ONE_CASE)


# -- strategies ------------------------------------------------------------------------------------
@given(data=st.data())
def test_networks_over_random_shapes_and_ranks(data) -> None:
    """For every registered format: the count is the factor sizes, the default init reconstructs
    to exactly zero, and the reconstruction has the tensor's shape."""
    reg = plugins.factorization_registry()
    name = data.draw(st.sampled_from(reg.names()), label="factorization")
    fact = reg.get(name)
    axes = data.draw(tensor_shapes(), label="axes")
    rank = data.draw(ranks(fact.rank_keys([a.name for a in axes])), label="rank")
    options = fact.parse_options(OPTIONS.get(name))
    if fact.check(axes, rank, options):
        return
    net = fact.network(axes, rank, options)
    init = default_init(net, generator=torch.Generator().manual_seed(0))
    assert net.n_params == sum(t.numel() for t in init.values())
    assert {n: tuple(t.shape) for n, t in init.items()} == {f.name: f.shape for f in net.factors}
    full = reconstruct(net, init)
    assert tuple(full.shape) == tuple(a.size for a in axes)
    assert full.abs().max().item() == 0.0
    assert math.prod(full.shape) == math.prod(a.size for a in axes)


@given(spec=specs())
def test_generated_specs_are_valid(spec) -> None:
    loaded = ta.load_spec(spec)
    assert loaded.factorization == spec["factorization"]
    assert loaded.factorization in plugins.factorization_registry()


@given(spec=specs(factorizations=["tensor_ring", "cp"]))
def test_generated_specs_plan_on_a_real_architecture(examples, spec) -> None:
    p = ta.plan(spec, "tiny-bert")
    assert p.n_params == sum(t.n_params for t in p.tensors) > 0
