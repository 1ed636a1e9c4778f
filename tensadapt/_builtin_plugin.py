"""tensadapt's own plugin: the built-in factorizations, model families and initialisers, registered
through the same hooks as any outside plugin (see :mod:`tensadapt.hookspecs`).

Registering them imports no torch: the factorizations and families are plain classes and tables,
and the initialisers are declared as data whose functions (in :mod:`tensadapt.init`) are imported
on first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .hookspecs import hookimpl
from .registry import Initializer

if TYPE_CHECKING:
    import torch

    from .arch.families import Family
    from .factorizations.base import Factorization, Network


def zeros(
    factorization: str,
    network: Network,
    full: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The default init: the network's zero factor is 0, so the update is exactly 0 at step 0
    (:func:`~tensadapt.factorizations.base.default_init`)."""
    from .factorizations.base import default_init

    return default_init(network, generator=generator)


#: The built-in initialisers, in the order ``tensadapt plugins`` lists them.
BUILTIN_INITIALIZERS: tuple[Initializer, ...] = (
    Initializer(
        "zeros",
        "a zero update: the model is unchanged at step 0 (the default)",
        pretrained=False,
        factorizations=None,
        function=zeros,
    ),
    Initializer(
        "svd",
        "pretrained weights by SVD / HOSVD-HOOI / CP-ALS / TT-SVD",
        pretrained=True,
        factorizations=("lora", "cp", "tucker", "tt"),
        function="tensadapt.init:svd",
    ),
    Initializer(
        "mpo",
        "pretrained weights by DoTA's MPO (TT-matrix SVD)",
        pretrained=True,
        factorizations=("mpo",),
        function="tensadapt.init:mpo",
    ),
    Initializer(
        "lorta",
        "the LoRTA authors' init: A ~ U(±1/√r), C_h, C_m, C_l ~ U(±√(6/r)), B = 0",
        pretrained=False,
        factorizations=("cp",),
        function="tensadapt.init:lorta",
    ),
    Initializer(
        "tenslora",
        "the TensLoRA authors' init: Tucker core 0 with orthogonal factors; CP input factor 0",
        pretrained=False,
        factorizations=("tucker", "cp"),
        function="tensadapt.init:tenslora",
    ),
)


@hookimpl
def tensadapt_register_factorizations() -> list[type[Factorization]]:
    """``lora``, ``cp``, ``tucker``, ``tt``, ``mpo``."""
    from .factorizations import BUILTINS

    return list(BUILTINS)


@hookimpl
def tensadapt_register_architectures() -> list[Family]:
    """The family table of :mod:`tensadapt.arch.families` (BERT, GPT-2, LLaMA, ViT, ...)."""
    from .arch.families import BUILTIN_FAMILIES

    return list(BUILTIN_FAMILIES)


@hookimpl
def tensadapt_register_initializers() -> list[Initializer]:
    """``zeros``, ``svd``, ``mpo``, ``lorta``, ``tenslora`` (:data:`BUILTIN_INITIALIZERS`)."""
    return list(BUILTIN_INITIALIZERS)
