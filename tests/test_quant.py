"""NF4Linear: storage, error bound, forward in the activations' dtype, merge helpers, bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensadapt.quant import NF4Linear, memory_plan, nf4_bytes


@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 100),
    scale=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_nf4_error_within_elementwise_bound(rows: int, cols: int, scale: float, seed: int) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q = NF4Linear(w, None)
    d = q.dequantize(torch.float32)
    assert d.shape == w.shape
    assert bool(((d - w).abs() <= q.error_bound()).all())
    assert q.nbytes == nf4_bytes(rows * cols)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dequantized_dense(layout: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    b = torch.randn(24 if layout == "linear" else 40, generator=g)
    q = NF4Linear(w, b, layout)
    x = torch.randn(3, 5, 40 if layout == "linear" else 24, generator=g).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    wd = q.dequantize(torch.float32)
    want = x.float() @ (wd.t() if layout == "linear" else wd) + b
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=5e-2)


def test_materialize_release_and_dense_module() -> None:
    lin = torch.nn.Linear(16, 8)
    q = NF4Linear.from_module(lin)
    codes = q.packed.clone()
    w = q.materialize()
    w += 1.0
    x = torch.randn(2, 16)
    torch.testing.assert_close(q(x), x @ q.weight.t() + lin.bias)
    dense = q.to_dense_module()
    assert isinstance(dense, torch.nn.Linear)
    torch.testing.assert_close(dense(x), q(x))
    q.release()
    assert torch.equal(q.packed, codes)
    torch.testing.assert_close(q.weight, w - 1.0)


def test_bad_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        NF4Linear(torch.randn(4, 4), None, "conv2d")


def test_memory_plan_kinds() -> None:
    numels = [4096 * 4096, 1024 * 4096]
    nf4 = memory_plan(numels, 10, "nf4", "fp", "bfloat16")
    assert nf4.residual_bytes == sum(nf4_bytes(n) for n in numels)
    assert nf4.residual_bytes / nf4.residual_fp16_bytes == pytest.approx(0.28125)
    fr = memory_plan(numels, 10, "frozen", "fp", "bfloat16")
    assert fr.residual_bytes == fr.base_bytes == 2 * sum(numels)
    qlora = memory_plan(numels, 10, "none", "nf4", "float32")
    assert qlora.residual_bytes == 0 and qlora.frozen_bytes == nf4.residual_bytes
    assert qlora.base_bytes == 4 * sum(numels) and qlora.trainable_bytes == 40
