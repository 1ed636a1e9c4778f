"""Name registries for factorizations, architectures and initialisers.

A registry rejects duplicate names and lists the valid names in every lookup error (as opt_einsum's
``get_path_fn`` does). The registries are filled lazily, on first lookup, by :mod:`tensadapt.plugins`
through the same pluggy hooks outside plugins use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import RegistryError

T = TypeVar("T")


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
    """Objects by name. ``kind`` names what is registered in error messages."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._loader = loader
        self._loaded = loader is None

    def _ensure(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._loader is not None
            self._loader()

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
        self._ensure()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._ensure()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._ensure()
        return iter(list(self._entries.values()))

    def reset(self) -> None:
        """Forget everything and load again on next use (for tests and ``--disable-plugin``)."""
        self._entries.clear()
        self._loaded = self._loader is None


def _who(source: str, version: str) -> str:
    return f"{source} {version}".strip()
