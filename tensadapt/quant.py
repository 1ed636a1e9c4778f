"""NF4 storage of frozen weights (QDoTA's residual, QLoRA's base) through bitsandbytes.

:class:`NF4Linear` replaces :attr:`AdaptedLinear.base <tensadapt.nn.AdaptedLinear>`: it keeps the
weight as 4-bit NormalFloat codes (two per byte) with one float32 ``absmax`` per block of 64
(``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4", blocksize=64)``) and dequantises it
in the activations' dtype on every forward, so only the packed copy stays in memory.

Merging (``merge`` on the wrapper) materialises a dense weight = dequantised + update, which the
forward then uses; ``unmerge`` drops it, so the NF4 codes are restored exactly. ``merge_and_unload``
turns the module into a plain dense ``nn.Linear`` / ``Conv1D`` (:meth:`NF4Linear.to_dense_module`).

Error bound: NF4 rounds ``w / absmax`` to the nearest of 16 levels, so every element is off by at
most ``absmax_block · max_gap / 2`` (max_gap = 1 − 0.7230 between the two largest levels):
:meth:`NF4Linear.error_bound`. For an output ``y = x·W`` that gives ``|Δy| ≤ |x|·bound``.

Memory (:func:`nf4_bytes`): ``numel / 2`` bytes of codes + 4 bytes of absmax per 64 elements,
0.5625 bytes per weight (0.28 × fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: block size of the absmax scaling (the bitsandbytes / QLoRA default)
BLOCKSIZE = 64
#: bytes of one float32 absmax per block
ABSMAX_BYTES = 4


def nf4_bytes(numel: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes an NF4 copy of ``numel`` weights takes: packed codes plus float32 absmax per block."""
    return (numel + 1) // 2 + ABSMAX_BYTES * math.ceil(numel / blocksize)


def _bnb() -> Any:
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    return bnbf


class NF4Linear(nn.Module):
    """A frozen Linear (``weight [out, in]``) or GPT-2 Conv1D (``weight [in, out]``) whose weight is
    held in NF4.

    Buffers:
        packed: ``uint8 [ceil(numel / 2), 1]``, two 4-bit codes per byte (bitsandbytes' layout).
        absmax: ``float32 [ceil(numel / blocksize)]``, one scale per block of the flattened weight.
        code: ``float32 [16]``, the NF4 levels.
    Args:
        weight: the weight to store, in the module's layout.
        bias: ``[out]`` or ``None`` (kept as a frozen parameter, unquantised).
        layout: ``linear`` or ``conv1d``.
        blocksize: elements per absmax block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: str = "linear",
        blocksize: int = BLOCKSIZE,
    ) -> None:
        super().__init__()
        if layout not in ("linear", "conv1d"):
            raise ValueError(f"layout must be 'linear' or 'conv1d', not {layout!r}")
        bnbf = _bnb()
        w = weight.detach().contiguous()
        packed, state = bnbf.quantize_4bit(w.reshape(-1), quant_type="nf4", blocksize=blocksize)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        self.blocksize = blocksize
        self.layout = layout
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_module(cls, module: nn.Module, weight: torch.Tensor | None = None) -> NF4Linear:
        """NF4 copy of a Linear/Conv1D (or of ``weight`` in its place, e.g. a residual)."""
        w = module.weight if weight is None else weight
        assert isinstance(w, torch.Tensor)
        layout = "linear" if isinstance(module, nn.Linear) else "conv1d"
        bias = getattr(module, "bias", None)
        return cls(w, bias if isinstance(bias, torch.Tensor) else None, layout)

    def _state(self) -> Any:
        from bitsandbytes.functional import QuantState

        return QuantState(
            absmax=self.absmax,
            shape=torch.Size([math.prod(self.shape)]),
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored weight, dense, in the module's layout and ``dtype`` (default: original)."""
        # dequantised flat: bitsandbytes 0.50's CPU kernel mis-places blocks for 2-D shapes whose
        # rows are not a multiple of the block size (quantising is fine either way)
        w = _bnb().dequantize_4bit(self.packed, self._state()).reshape(self.shape)
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def error_bound(self) -> torch.Tensor:
        """Per-element bound of ``|dequantize() − w|``, same shape as the weight (float32)."""
        half_gap = float((self.code[1:] - self.code[:-1]).max()) / 2
        per = self.absmax.float().repeat_interleave(self.blocksize)[: math.prod(self.shape)]
        # + a few ulps for the float arithmetic of w / absmax and back
        return (per * (half_gap + 1e-6)).reshape(self.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight: the merged one when materialised, else a fresh dequantised copy."""
        return self._dense if self._dense is not None else self.dequantize()

    @property
    def nbytes(self) -> int:
        return int(self.packed.numel() * self.packed.element_size()) + int(
            self.absmax.numel() * self.absmax.element_size()
        )

    def materialize(self) -> torch.Tensor:
        """Hold a dense weight (for merging); forwards use it until :meth:`release`."""
        if self._dense is None:
            self._dense = self.dequantize()
        return self._dense

    def release(self) -> None:
        """Drop the dense weight: back to the exact NF4 codes."""
        self._dense = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``, computed in ``x.dtype``."""
        w = self._dense if self._dense is not None else self.dequantize()
        w = w.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if self.layout == "linear":
            return nn.functional.linear(x, w, b)
        y = x @ w
        return y + b if b is not None else y

    def to_dense_module(self) -> nn.Module:
        """A plain module with the current dense weight (merged, if materialised)."""
        w = self.weight.detach().clone()
        m: nn.Module
        if self.layout == "linear":
            m = nn.Linear(self.shape[1], self.shape[0], bias=self.bias is not None)
            m.to(device=w.device, dtype=w.dtype)
            m.weight.data = w
        else:
            from transformers.pytorch_utils import Conv1D

            m = Conv1D(self.shape[1], self.shape[0])
            m.to(device=w.device, dtype=w.dtype)
            m.weight.data = w
        if self.bias is not None:
            mb = m.bias
            assert isinstance(mb, torch.Tensor)
            mb.data = self.bias.detach().clone()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, layout={self.layout}, nf4 blocksize={self.blocksize}"


# -- memory accounting (used by the planner; no weights needed) ---------------------------------
DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes an adapted model holds for its targeted matrices, before anything is loaded.

    Attributes:
        weight_dtype: dtype assumed for the base weights (the model's, else the config's, else
            float32 as ``from_config`` builds).
        trainable_bytes: the factors (float32).
        base_bytes: the targeted matrices as the model stores them before adapting.
        residual_bytes: the frozen residual ``W0 − ΔW(init)`` as stored (0 without a residual).
        residual_fp16_bytes: the same residual in fp16, for comparison (0 without a residual).
        frozen_bytes: what the targeted matrices take after adapting (residual, NF4 base or the
            unchanged fp base).
        storage: ``fp`` or ``nf4`` for those frozen matrices.
    """

    weight_dtype: str
    trainable_bytes: int
    base_bytes: int
    residual_bytes: int
    residual_fp16_bytes: int
    frozen_bytes: int
    storage: str

    def lines(self) -> list[str]:
        gib = lambda n: f"{n / 2**30:,.3f} GiB" if n >= 2**27 else f"{n / 2**20:,.3f} MiB"  # noqa: E731
        out = [
            f"memory: trainable {gib(self.trainable_bytes)} (float32); targeted base weights "
            f"{gib(self.base_bytes)} ({self.weight_dtype})"
        ]
        if self.storage == "nf4" and self.residual_fp16_bytes:
            out.append(
                f"frozen residual: {gib(self.residual_bytes)} ({self.storage}; in fp16 it would be "
                f"{gib(self.residual_fp16_bytes)}, ratio "
                f"{self.residual_bytes / self.residual_fp16_bytes:.4f})"
            )
        elif self.residual_bytes:
            out.append(f"frozen residual: {gib(self.residual_bytes)} ({self.weight_dtype})")
        else:
            kind = "nf4" if self.storage == "nf4" else self.weight_dtype
            out.append(f"frozen targeted base weights: {gib(self.frozen_bytes)} ({kind})")
        return out


def memory_plan(
    numels: list[int], n_params: int, residual: str, base: str, weight_dtype: str
) -> MemoryPlan:
    """Memory of the targeted matrices (``numels``: elements of each) under a spec's storage."""
    dbytes = DTYPE_BYTES.get(weight_dtype.removeprefix("torch."), 4)
    fp = int(sum(numels) * dbytes)
    q = sum(nf4_bytes(n) for n in numels)
    if residual != "none":
        stored = q if residual == "nf4" else fp
        return MemoryPlan(weight_dtype, 4 * n_params, fp, stored, 2 * sum(numels), stored, residual)
    stored = q if base == "nf4" else fp
    return MemoryPlan(weight_dtype, 4 * n_params, fp, 0, 0, stored, base)


__all__ = ["BLOCKSIZE", "MemoryPlan", "NF4Linear", "memory_plan", "nf4_bytes"]
