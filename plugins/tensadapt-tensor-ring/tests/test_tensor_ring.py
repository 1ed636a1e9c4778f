"""The plugin's own tests: tensadapt's conformance kit, plus the ring's parameter count."""

from __future__ import annotations

import pytest
import torch
from tensadapt_tensor_ring import TensorRing

from tensadapt.factorizations.base import Axis, reconstruct
from tensadapt.testing import check_factorization


def test_conformance() -> None:
    check_factorization(TensorRing)


def test_parameter_count_and_closing_bond() -> None:
    axes = (Axis("in", 6), Axis("out", 5), Axis("qkv", 3))
    net = TensorRing().network(axes, {"in": 2, "out": 3, "qkv": 4}, TensorRing.options_model())
    # bonds: b0 (in|out) = 2, b1 (out|qkv) = 3, b2 (qkv|in, closing) = 4
    assert [f.shape for f in net.factors] == [(4, 6, 2), (2, 5, 3), (3, 3, 4)]
    assert net.n_params == 4 * 6 * 2 + 2 * 5 * 3 + 3 * 3 * 4


def test_reconstruction_is_the_trace_of_core_products() -> None:
    axes = (Axis("in", 3), Axis("out", 4), Axis("depth", 2))
    net = TensorRing().network(axes, 2, TensorRing.options_model())
    g = torch.Generator().manual_seed(0)
    cores = {f.name: torch.randn(f.shape, generator=g, dtype=torch.float64) for f in net.factors}
    full = reconstruct(net, cores)
    i, j, k = 2, 1, 1
    mat = cores["G_in"][:, i, :] @ cores["G_out"][:, j, :] @ cores["G_depth"][:, k, :]
    torch.testing.assert_close(full[i, j, k], torch.trace(mat))


@pytest.mark.parametrize("rank", [1, 3])
def test_registered_through_the_entry_point(rank: int) -> None:
    from tensadapt.spec import get_factorization, load_spec

    assert isinstance(get_factorization("tensor_ring"), TensorRing)
    spec = load_spec({"factorization": "tensor_ring", "modes": ["qkv"], "rank": rank})
    assert spec.factorization == "tensor_ring"
