"""Built-in factorizations. Each format is one small file; all share :mod:`.base`."""

from __future__ import annotations

from .base import Axis, Factorization, FactorSpec, Network, default_init, reconstruct
from .cp import CP
from .lora import LoRA
from .mpo import MPO
from .tt import TensorTrain
from .tucker import Tucker

BUILTINS: tuple[type[Factorization], ...] = (LoRA, CP, Tucker, TensorTrain, MPO)

__all__ = [
    "BUILTINS",
    "CP",
    "MPO",
    "Axis",
    "FactorSpec",
    "Factorization",
    "LoRA",
    "Network",
    "TensorTrain",
    "Tucker",
    "default_init",
    "reconstruct",
]
