"""tensadapt's own plugin: the built-in factorizations and model families, registered through the
same hooks as any outside plugin (see :mod:`tensadapt.hookspecs`). The built-in initialisers are
registered by :mod:`tensadapt.init` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .arch.families import Family
    from .factorizations.base import Factorization


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
