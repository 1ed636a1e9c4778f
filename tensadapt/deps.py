"""Optional dependencies: which tensadapt extra installs each, and one check that names it.

The training stack (torch, transformers, accelerate, tokenizers, matplotlib) is a core
dependency; what only some inputs need is an extra:

=================  ==========  ======================================================
package            extra       needed for
=================  ==========  ======================================================
``datasets``       ``hf``      ``--data hf:NAME`` (Hugging Face hub datasets)
``bitsandbytes``   ``quant``   ``base: nf4`` / ``residual: nf4`` specs (QLoRA, QDoTA)
``optuna``         ``tune``    ``sweep --tune-lr`` (per-configuration tuning)
=================  ==========  ======================================================
"""

from __future__ import annotations

import importlib.util

from .errors import MissingDependencyError

#: import name -> the extra of ``pyproject.toml`` that installs it
EXTRAS: dict[str, str] = {"datasets": "hf", "bitsandbytes": "quant", "optuna": "tune"}


def pip_line(extra: str) -> str:
    """The exact command that installs an extra, e.g. ``pip install 'tensadapt[hf]'``."""
    return f"pip install 'tensadapt[{extra}]'"


def require(package: str, feature: str) -> None:
    """Raise :class:`MissingDependencyError` when ``package`` cannot be imported.

    Only looks the package up (``importlib.util.find_spec``); nothing is imported.

    Args:
        package: an import name listed in :data:`EXTRAS`.
        feature: what needs it, for the message (e.g. ``"--data hf:imdb"``).
    Raises:
        MissingDependencyError: the message names the feature and gives :func:`pip_line`.
    """
    extra = EXTRAS[package]
    if importlib.util.find_spec(package) is None:
        raise MissingDependencyError(
            f"{feature} needs the optional package {package!r}, which is not installed; "
            f"install it with: {pip_line(extra)}",
            package=package,
            extra=extra,
        )
