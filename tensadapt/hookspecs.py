"""Every hook tensadapt calls, in one module (the reference for plugin authors).

A plugin is a module (or any object) with functions named like these hooks and decorated with
:data:`hookimpl`, made known to tensadapt by an entry point in the group ``tensadapt``::

    # pyproject.toml of the plugin's distribution
    [project.entry-points.tensadapt]
    tensor_ring = "tensadapt_tensor_ring"

Each hook takes no arguments and returns a *list* (datasette style); tensadapt calls every
plugin's implementation separately (pluggy's ``subset_hook_caller``), so one plugin that raises,
returns a duplicate name or a class that breaks the interface is reported (plugin name,
distribution, version, what failed) and left out while the others keep working. A function named
``tensadapt_*`` that is not one of these hooks is reported too (pluggy's ``check_pending``). The
built-in factorizations, families and initialisers are registered through these same hooks
(:mod:`tensadapt._builtin_plugin`).

Nothing here imports torch or transformers: loading the hook specification is free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .arch.families import Family
    from .factorizations.base import Factorization
    from .registry import InitFunction, Initializer

#: The pluggy project name and the entry-point group plugins declare.
PROJECT = "tensadapt"

#: Decorates a hook specification (used in this module only).
hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorates a plugin's hook implementation: ``@hookimpl def tensadapt_register_...():``.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tensadapt_register_factorizations() -> list[type[Factorization]]:
    """Factorizations (decompositions of one update tensor) this plugin provides.

    Returns:
        a list of :class:`~tensadapt.factorizations.base.Factorization` subclasses. Each is
        registered under its ``name`` class attribute, the name specs use
        (``factorization: tensor_ring``). A class must set a non-empty ``name``, implement
        ``network(axes, rank, options) -> Network``, be constructible without arguments, and keep
        ``rank_keys``, ``check``, ``options_model`` (a pydantic model), ``inits`` and
        ``description`` usable; tensadapt checks this on a tiny tensor at load time. Parameter
        counts, reconstruction, the default zero-update init and the forward contraction are
        derived from the network, so a class provides nothing else. Check it with
        :func:`tensadapt.testing.check_factorization`.

    A name already taken (by a built-in or by another plugin loaded earlier) is rejected and
    reported; the plugin's other entries stay registered.
    """
    return []  # a specification: pluggy calls the plugins' implementations, never this body


@hookspec
def tensadapt_register_architectures() -> list[Family]:
    """Model families (architecture adapters) this plugin provides.

    Returns:
        a list of :class:`~tensadapt.arch.families.Family` entries: the family ``name``, the
        ``transformers`` ``model_type`` values it covers, the config attribute names of the layer
        count, width, heads and kv-heads, and one or more :class:`~tensadapt.arch.families.Layout`
        giving each projection's module path template (``{l}`` = layer index). They are used by
        :func:`tensadapt.arch.from_config` / :func:`~tensadapt.arch.from_model` and therefore by
        ``plan``, ``inject`` and ``load_adapter``.

    A family whose name or one of whose ``model_type`` values is already covered is rejected and
    reported.
    """
    return []  # a specification: pluggy calls the plugins' implementations, never this body


@hookspec
def tensadapt_register_initializers() -> list[Initializer | InitFunction]:
    """Initialisers (how an adapter's factors start) this plugin provides.

    Returns:
        a list of :class:`~tensadapt.registry.Initializer` records, or of plain callables. An
        ``Initializer`` declares ``name`` (the name specs use: ``init: my_init``),
        ``description``, ``pretrained`` (it starts from the pretrained weights, so the spec needs
        a ``residual``), ``factorizations`` (the formats it supports; ``None`` = all) and
        ``function`` (a callable, or ``"module:attr"`` imported on first use). A plain callable
        is read the same way from its attributes: ``name`` (else ``__name__``), ``description``
        (else its docstring's first line), ``pretrained`` (default ``True``, what initialisers
        were before the attribute existed) and ``factorizations`` (default ``None``).

        The call signature is ``(factorization_name, network, full, generator) ->
        {factor name: tensor}``: ``full`` is the stacked pretrained tensor ``[axis sizes...]``
        divided by the update's scaling (see :func:`tensadapt.init.svd`), ``None`` for an
        initialiser that is not ``pretrained``. A name already taken is rejected and reported.
    """
    return []  # a specification: pluggy calls the plugins' implementations, never this body


#: The names of every hook, in definition order (the documentation test reads this).
HOOKS: tuple[str, ...] = tuple(n for n in dict(globals()) if n.startswith(f"{PROJECT}_"))
