"""Name tables for factorizations, architectures and initialisers, and the initialiser record.

A :class:`Registry` rejects duplicate names and lists the valid names in every lookup error (as
opt_einsum's ``get_path_fn`` does). It can be *partial*: :class:`tensadapt.plugins.PluginRegistry`
fills the built-ins at once and passes ``load_rest``, which imports the installed plugins; a
lookup that misses, or a listing of every name, calls it once. So a spec naming only built-ins is
validated without importing any plugin, and an unknown name is looked for among the plugins
before it is reported.

Nothing here imports torch: an :class:`Initializer` names its function as ``"module:attr"`` and
imports it on first call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import RegistryError

if TYPE_CHECKING:
    import torch

    from .factorizations.base import Network

T = TypeVar("T")

#: What an initialiser returns: factor name -> tensor of that factor's shape.
Factors = Mapping[str, "torch.Tensor"]
InitFunction = Callable[..., Factors]


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object and who provided it.

    Attributes:
        name: the name specs and commands use.
        obj: the registered object (a factorization instance, a family, an initialiser).
        source: the distribution that provided it (``tensadapt`` for built-ins).
        version: that distribution's version.
        description: one line for ``tensadapt plugins``.
        plugin: the plugin (entry-point name) that registered it.
    """

    name: str
    obj: T
    source: str = "tensadapt"
    version: str = ""
    description: str = ""
    plugin: str = "tensadapt"


class Registry(Generic[T]):
    """Objects by name. ``kind`` names what is registered in error messages.

    Args:
        kind: ``factorization``, ``architecture``, ``initializer`` (or anything, in tests).
        load_rest: called once, at the first lookup that misses or the first listing of every
            name, to register what is not there yet (the plugins). ``None``: complete as filled.
    """

    def __init__(self, kind: str, load_rest: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._load_rest = load_rest

    def _complete(self) -> None:
        load, self._load_rest = self._load_rest, None  # once, even if it registers nothing
        if load is not None:
            load()

    def register(
        self,
        name: str,
        obj: T,
        source: str = "tensadapt",
        version: str = "",
        description: str = "",
        plugin: str = "tensadapt",
    ) -> None:
        """Add ``obj`` under ``name``; a name already taken raises :class:`RegistryError`."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            prev = self._entries[name]
            raise RegistryError(
                f"{self.kind} {name!r} from {_who(source, version)} is already registered by "
                f"{_who(prev.source, prev.version)}"
            )
        self._entries[name] = Entry(name, obj, source, version, description, plugin)

    def unregister(self, name: str) -> Entry[T]:
        """Remove ``name`` and return its entry; an unknown name raises listing the valid names."""
        entry = self.entry(name)
        del self._entries[name]
        return entry

    def get(self, name: str) -> T:
        """The object named ``name``; an unknown name raises listing the valid names."""
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        """The :class:`Entry` of ``name``; an unknown name raises listing the valid names."""
        found = self.find(name)
        if found is None:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names()) or '(none)'}"
            )
        return found

    def find(self, name: object) -> Entry[T] | None:
        """The :class:`Entry` of ``name``, or ``None`` (after loading the rest when it misses)."""
        if not isinstance(name, str):
            return None
        if name not in self._entries:
            self._complete()
        return self._entries.get(name)

    def loaded(self) -> list[Entry[T]]:
        """The entries registered so far, without loading the rest (for checks while loading)."""
        return list(self._entries.values())

    def rows(self) -> list[dict[str, str]]:
        """Every entry as text: name, distribution, version, description, plugin."""
        return [
            {
                "name": e.name,
                "distribution": e.source,
                "version": e.version,
                "description": e.description,
                "plugin": e.plugin,
            }
            for e in self
        ]

    def names(self) -> list[str]:
        """Every registered name, in registration order (built-ins first)."""
        self._complete()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return self.find(name) is not None

    def __iter__(self) -> Iterator[Entry[T]]:
        self._complete()
        return iter(list(self._entries.values()))


@dataclass(frozen=True)
class Initializer:
    """How an adapter's factors start: declared as data, its function imported on first call.

    Attributes:
        name: the name specs use (``init: svd``).
        description: one line for ``tensadapt plugins``.
        pretrained: it starts from the pretrained weights, so the spec needs a ``residual``
            (``W0`` minus the initial update is kept frozen); ``False``: it starts from values of
            its own and the function receives ``full=None``.
        factorizations: the formats it initialises; ``None`` = every format.
        function: the function, or ``"module:attr"`` naming it (imported on first call). Its
            signature is ``(factorization_name, network, full, generator) -> {factor: tensor}``,
            ``full`` being the stacked pretrained tensor ``[axis sizes...]`` divided by the
            update's scaling (``None`` when not ``pretrained``).
    """

    name: str
    description: str = ""
    pretrained: bool = True
    factorizations: tuple[str, ...] | None = None
    function: str | InitFunction = ""

    def supports(self, factorization: str) -> bool:
        """Whether this initialiser can start factorization ``factorization``."""
        return self.factorizations is None or factorization in self.factorizations

    def resolve(self) -> InitFunction:
        """The function (imported now when it was given as ``"module:attr"``)."""
        if callable(self.function):
            return self.function
        module, _, attr = self.function.partition(":")
        fn: InitFunction = getattr(importlib.import_module(module), attr)
        return fn

    def __call__(
        self,
        factorization: str,
        network: Network,
        full: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Factors:
        return self.resolve()(factorization, network, full, generator)


def _who(source: str, version: str) -> str:
    return f"{source} {version}".strip()
