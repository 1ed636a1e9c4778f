"""Plugins: one :class:`PluginRegistry` -- a pluggy ``PluginManager`` over the entry-point group
``tensadapt`` and the three name tables it fills (factorizations, architectures, initialisers).

The built-ins register through the same hooks as outside plugins (:mod:`._builtin_plugin`), at
once and without torch. Installed plugins are loaded lazily, once, by pluggy itself
(``load_setuptools_entrypoints``, one entry point at a time so that one failure stays one
failure): when a lookup misses among the built-ins (a spec naming ``tensor_ring``, a config whose
``model_type`` no built-in family covers) or when every name is listed (``tensadapt plugins``, the
JSON Schema). So validating a spec that names only built-ins imports no plugin.

Plugins are guests. A plugin that cannot be imported (whatever it raises -- ``SystemExit``
included, ``KeyboardInterrupt`` aside), whose hook raises or returns something other than a list,
that implements a hook tensadapt does not have (pluggy's ``check_pending``), registers a name
already taken, or whose class breaks the interface is reported -- as a :class:`PluginFailure`
naming the plugin, its distribution and version and what failed, and as a :class:`PluginWarning`
-- and that plugin (or that one entry) is left out; the rest keep working. What a plugin prints
while it is imported or its hooks run goes to stderr, never into a command's output. An import
slower than :data:`SLOW_IMPORT_SECONDS` is reported with its time. A plugin factorization's
methods, called later by the spec and the planner, turn any exception into a
:class:`~tensadapt.errors.PluginError` naming the plugin.
``TENSADAPT_DISABLE_PLUGINS=name,...`` and ``tensadapt --disable-plugin NAME`` block plugins by
entry-point or distribution name (pluggy's ``set_blocked``); a blocked plugin is not imported.

Example::

    from tensadapt.plugins import factorization_registry
    factorization_registry().get("tensor_ring")   # RegistryError listing the valid names if absent
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, TypedDict, TypeVar, cast

import pluggy

from . import _builtin_plugin, hookspecs
from .errors import RegistryError, describe
from .hookspecs import HOOKS, PROJECT, hookimpl
from .plugin_checks import (
    as_guest,
    as_initializer,
    factorization_problems,
    family_problems,
    guard,
    network_problems,
)
from .registry import Initializer, Registry

if TYPE_CHECKING:
    from .arch.families import Family
    from .factorizations.base import Factorization

#: Entry-point group a plugin distribution declares its plugin module in.
ENTRY_POINT_GROUP = PROJECT
#: Environment variable: comma-separated plugin (entry-point) or distribution names to leave out.
DISABLE_ENV = "TENSADAPT_DISABLE_PLUGINS"
#: A plugin whose import takes longer than this (seconds) is reported: every command waits for it.
SLOW_IMPORT_SECONDS = 1.0

Kind = Literal["factorization", "architecture", "initializer"]
#: The registry kinds, in the order ``tensadapt plugins`` lists them, with the hook filling each.
KINDS: tuple[tuple[Kind, str], ...] = (
    ("factorization", "tensadapt_register_factorizations"),
    ("architecture", "tensadapt_register_architectures"),
    ("initializer", "tensadapt_register_initializers"),
)
T = TypeVar("T")

__all__ = [
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "PluginFailure",
    "PluginInfo",
    "PluginRegistry",
    "PluginWarning",
    "architecture_registry",
    "current",
    "disable",
    "factorization_problems",
    "factorization_registry",
    "families",
    "family_for",
    "failures",
    "hookimpl",
    "initializer_registry",
    "network_problems",
    "plugin_manager",
    "plugins",
    "report",
    "reset",
    "rows",
]


class Report(TypedDict):
    """What ``tensadapt plugins --json`` prints."""

    entries: list[dict[str, str]]
    plugins: list[dict[str, object]]
    failures: list[dict[str, str]]
    slow: list[dict[str, str]]


class PluginWarning(UserWarning):
    """A plugin (or one of its entries) was left out, or is slow; the message says which and why."""


@dataclass(frozen=True)
class PluginFailure:
    """One thing a plugin did wrong.

    Attributes:
        plugin: the plugin's name (its entry-point name; ``tensadapt`` for the built-ins).
        distribution: the distribution that declared it (``?`` when unknown).
        version: that distribution's version.
        what: what failed, e.g. ``import failed: ModuleNotFoundError: No module named 'x'``.
        entry: the registry entry left out (``factorization 'lora'``), or ``""`` when the whole
            plugin was left out.
    """

    plugin: str
    distribution: str
    version: str
    what: str
    entry: str = ""

    def __str__(self) -> str:
        left = f"{self.entry} left out" if self.entry else "left out"
        return f"{_label(self.plugin, self.distribution, self.version)}: {left}: {self.what}"


@dataclass(frozen=True)
class PluginInfo:
    """One plugin tensadapt knows of: where it comes from and whether it is in use.

    Attributes:
        name: entry-point name (``tensadapt`` for the built-ins).
        distribution, version: the providing distribution.
        value: what the entry point points at (``module`` or ``module:attr``).
        status: ``loaded``, ``disabled`` or ``failed``.
        seconds: how long importing it took (0 when it was not imported).
    """

    name: str
    distribution: str
    version: str
    value: str
    status: Literal["loaded", "disabled", "failed"]
    seconds: float = 0.0


@dataclass
class _Source:
    """A plugin being added: who it is and the object pluggy registered."""

    name: str
    distribution: str
    version: str
    value: str
    obj: object = None
    seconds: float = 0.0
    items: dict[Kind, list[object]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return _label(self.name, self.distribution, self.version)


class PluginRegistry:
    """The one registry: pluggy's manager, the name tables it fills, and what went wrong.

    Args:
        disabled: plugin (entry-point) or distribution names to leave out, besides those in
            ``$TENSADAPT_DISABLE_PLUGINS``.

    Attributes:
        manager: the ``pluggy.PluginManager`` (project and entry-point group ``tensadapt``).
        factorizations, architectures, initializers: the name tables; the built-ins are there
            from the start, the plugins are loaded by the first lookup that misses.
        infos: every plugin seen (loaded, disabled or failed), built-ins first.
        failures: every problem met while loading.
        slow: one line per plugin whose import took longer than :data:`SLOW_IMPORT_SECONDS`.
    """

    def __init__(self, disabled: Iterable[str] = ()) -> None:
        env = os.environ.get(DISABLE_ENV, "").split(",")
        self.disabled = frozenset(_norm(n) for n in [*env, *disabled] if n.strip())
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.factorizations: Registry[Factorization] = Registry("factorization", self.load_plugins)
        self.architectures: Registry[Family] = Registry("architecture", self.load_plugins)
        self.initializers: Registry[Initializer] = Registry("initializer", self.load_plugins)
        self.infos: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self.slow: list[str] = []
        self._plugins_loaded = False
        builtin = _Source(PROJECT, PROJECT, _own_version(), _builtin_plugin.__name__)
        self.manager.register(_builtin_plugin, name=PROJECT)
        builtin.obj = _builtin_plugin
        self._add(builtin)

    def registry(
        self, kind: Kind
    ) -> Registry[Factorization] | Registry[Family] | Registry[Initializer]:
        """The name table of ``kind``."""
        if kind == "factorization":
            return self.factorizations
        return self.architectures if kind == "architecture" else self.initializers

    def family_for(self, model_type: str) -> Family | None:
        """The family covering ``model_type``: built-ins first, then (loading them) plugins'."""
        for attempt in range(2):
            for entry in self.architectures.loaded():
                if model_type in entry.obj.model_types:
                    return entry.obj
            if attempt == 0 and not self._plugins_loaded:
                self.load_plugins()
        return None

    # -- loading ------------------------------------------------------------------------------
    def load_plugins(self) -> None:
        """Import and register every installed plugin not disabled (once; later calls return)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for src, duplicates in _entry_points():
            if _norm(src.name) in self.disabled or _norm(src.distribution) in self.disabled:
                self.manager.set_blocked(src.name)
                self.infos.append(PluginInfo(*_ident(src), "disabled"))
                continue
            for dup in duplicates:
                self._fail(
                    dup, f"another distribution ({src.distribution}) has a plugin {src.name!r}"
                )
            if self.manager.has_plugin(src.name):
                self._fail(src, "another plugin of the same name is already registered")
                continue
            start = time.perf_counter()
            try:
                with as_guest():
                    self.manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=src.name)
            except BaseException as exc:  # a guest's SystemExit must not end the command
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._unregister(src)
                what = "hook validation failed" if _is_validation(exc) else "import failed"
                self._fail(src, f"{what}: {describe(exc)}")
                continue
            src.seconds = time.perf_counter() - start
            src.obj = self.manager.get_plugin(src.name)
            self._set_distribution(src)
            if src.seconds > SLOW_IMPORT_SECONDS:
                note = (
                    f"{src.label}: import took {src.seconds:.2f} s; every command waits for it "
                    f"(leave it out with --disable-plugin {src.name})"
                )
                self.slow.append(note)
                warnings.warn(note, PluginWarning, stacklevel=4)
            self._add(src)

    def _add(self, src: _Source) -> None:
        """Check the registered plugin's hooks, call each, then register its entries."""
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError:
            unknown = sorted(
                name
                for name in vars(self.manager.hook)
                if not name.startswith("_")
                and not getattr(self.manager.hook, name).has_spec()
                and any(
                    i.plugin is src.obj for i in getattr(self.manager.hook, name).get_hookimpls()
                )
            )
            self._unregister(src)
            self._fail(src, f"unknown hook(s) {unknown}; valid hooks: {', '.join(HOOKS)}")
            return
        for kind, hook in KINDS:
            items = self._call(src, hook)
            if items is None:
                self._unregister(src)
                return
            src.items[kind] = items
        for kind, _ in KINDS:
            for item in src.items[kind]:
                self._register(kind, item, src)
        self.infos.append(PluginInfo(*_ident(src), "loaded", round(src.seconds, 3)))

    def _call(self, src: _Source, hook: str) -> list[object] | None:
        """The list ``src``'s implementation of ``hook`` returns (``[]`` when it has none), or
        ``None`` after reporting a failure. Only that plugin's implementation is called."""
        others = [p for p in self.manager.get_plugins() if p is not src.obj]
        caller = self.manager.subset_hook_caller(hook, remove_plugins=others)
        if not caller.get_hookimpls():
            return []
        try:
            with as_guest():
                results = caller()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._fail(src, f"{hook}() raised {describe(exc)}")
            return None
        items = results[0] if results else None
        if not isinstance(items, list | tuple):
            self._fail(src, f"{hook}() returned {type(items).__name__}, expected a list")
            return None
        return list(items)

    def _register(self, kind: Kind, item: object, src: _Source) -> None:
        """Check one item a hook returned and register it, or report it and leave it out."""
        if kind == "factorization":
            label = str(getattr(item, "name", None) or getattr(item, "__name__", repr(item)))
            # a plugin's class is probed before it is trusted; the built-ins are probed by
            # tests/test_testing_kit.py instead of at every start (the probe imports opt_einsum,
            # a fifth of `tensadapt validate`'s start-up)
            problems = factorization_problems(item) if src.name != PROJECT else []
            if problems or not isinstance(item, type):
                self._fail(src, "; ".join(problems), f"factorization {label!r}")
                return
            inst: Factorization = item()
            if src.name != PROJECT:
                guard(inst, f"{src.label}: factorization {label!r}")
            self._put(self.factorizations, kind, label, inst, inst.description, src)
        elif kind == "architecture":
            label, problems = family_problems(item, self.architectures.loaded())
            if problems:
                self._fail(src, "; ".join(problems), f"architecture {label!r}")
                return
            family = cast("Family", item)
            types = ", ".join(family.model_types)
            self._put(self.architectures, kind, label, family, f"model_type {types}", src)
        else:
            label, ini, problems = as_initializer(item)
            if ini is None:
                self._fail(src, "; ".join(problems), f"initializer {label!r}")
                return
            self._put(self.initializers, kind, label, ini, _init_description(ini), src)

    def _put(
        self, table: Registry[T], kind: Kind, name: str, obj: T, description: str, src: _Source
    ) -> None:
        try:
            table.register(name, obj, src.distribution, src.version, description, src.name)
        except RegistryError:
            prev = table.entry(name)
            who = _label(prev.plugin, prev.source, prev.version)
            self._fail(src, f"name already registered by {who}", f"{kind} {name!r}")

    def _fail(self, src: _Source, what: str, entry: str = "") -> None:
        failure = PluginFailure(src.name, src.distribution, src.version, what, entry)
        self.failures.append(failure)
        if not entry and all(p.name != src.name for p in self.infos):
            self.infos.append(PluginInfo(*_ident(src), "failed", round(src.seconds, 3)))
        warnings.warn(str(failure), PluginWarning, stacklevel=4)

    def _unregister(self, src: _Source) -> None:
        if self.manager.has_plugin(src.name):
            self.manager.unregister(name=src.name)

    def _set_distribution(self, src: _Source) -> None:
        """Name and version of the distribution pluggy loaded ``src`` from."""
        for plugin, dist in self.manager.list_plugin_distributions():
            if plugin is src.obj:
                src.distribution, src.version = _dist_name_version(dist)

    # -- views --------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, str]]:
        """One row per registered entry: kind, name, distribution, version, description, plugin."""
        return [{"kind": kind, **row} for kind, _ in KINDS for row in self.registry(kind).rows()]

    def report(self) -> Report:
        """What ``tensadapt plugins --json`` prints: entries, plugins, failures, slow imports."""
        self.load_plugins()
        return {
            "entries": self.rows(),
            "plugins": [asdict(p) for p in self.infos],
            "failures": [{**asdict(f), "message": str(f)} for f in self.failures],
            "slow": [{"message": s} for s in self.slow],
        }


def _entry_points() -> list[tuple[_Source, list[_Source]]]:
    """Installed ``tensadapt`` entry points by name: one source each, with any other
    distribution declaring the same name (left out, reported). The same distribution seen twice
    on ``sys.path`` counts once."""
    by_name: dict[str, list[_Source]] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            src = _Source(str(ep.name), *_dist_name_version(dist), str(ep.value))
            same = by_name.setdefault(src.name, [])
            if all(_ident(s) != _ident(src) for s in same):
                same.append(src)
    return [(srcs[0], srcs[1:]) for _, srcs in sorted(by_name.items())]


def _dist_name_version(dist: object) -> tuple[str, str]:
    try:
        meta = getattr(dist, "metadata", {})
        return str(meta["Name"] or getattr(dist, "name", "?")), str(getattr(dist, "version", ""))
    except Exception:  # a broken METADATA file must not stop the others
        return str(getattr(dist, "name", "?")), ""


def _ident(src: _Source) -> tuple[str, str, str, str]:
    return (src.name, src.distribution, src.version, src.value)


def _is_validation(exc: BaseException) -> bool:
    return isinstance(exc, pluggy.PluginValidationError)


def _init_description(ini: Initializer) -> str:
    """The initialiser's line in ``tensadapt plugins``: what it is, for which formats, and
    whether it starts from the pretrained weights."""
    formats = ", ".join(ini.factorizations) if ini.factorizations is not None else "every format"
    start = "pretrained, needs a residual" if ini.pretrained else "no residual"
    return f"{ini.description} [{formats}; {start}]".strip()


def _label(plugin: str, distribution: str, version: str) -> str:
    return f"plugin {plugin!r} ({distribution} {version}".rstrip() + ")"


def _own_version() -> str:
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return ""


def _norm(name: str) -> str:
    """Distribution-style normalisation: case, spaces and ``-``/``_``/``.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


# -- the process-wide registry ---------------------------------------------------------------------
_current: PluginRegistry | None = None


def current() -> PluginRegistry:
    """The process-wide :class:`PluginRegistry` (made on first use)."""
    global _current
    if _current is None:
        _current = PluginRegistry()
    return _current


def reset(disabled: Iterable[str] | None = None) -> None:
    """Forget the registry; the next use builds a new one (and loads the plugins again).

    Args:
        disabled: names to leave out from now on; ``None`` keeps those :func:`disable` gave,
            ``()`` re-enables all but those in ``$TENSADAPT_DISABLE_PLUGINS``.
    """
    global _current
    keep = _extra_disabled() if disabled is None else frozenset(disabled)
    _current = PluginRegistry(keep) if keep else None


def disable(names: Iterable[str]) -> None:
    """Leave these plugins (entry-point or distribution names) out from now on."""
    reset(disabled=[*_extra_disabled(), *names])


def _extra_disabled() -> frozenset[str]:
    env = {_norm(n) for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    return frozenset() if _current is None else _current.disabled - env


def factorization_registry() -> Registry[Factorization]:
    """Factorizations by name (one instance each): the built-ins and every plugin's."""
    return current().factorizations


def architecture_registry() -> Registry[Family]:
    """Model families by name: the built-in table and every plugin's."""
    return current().architectures


def initializer_registry() -> Registry[Initializer]:
    """Initialisers by name (:class:`~tensadapt.registry.Initializer`): built-ins and plugins'."""
    return current().initializers


def family_for(model_type: str) -> Family | None:
    """The registered family covering ``model_type`` (plugins are loaded only if no built-in
    family covers it), or ``None``."""
    return current().family_for(model_type)


def families() -> tuple[Family, ...]:
    """Every registered family, built-ins first."""
    return tuple(e.obj for e in architecture_registry())


def failures() -> list[PluginFailure]:
    """Every problem met while loading plugins (empty when all is well)."""
    reg = current()
    reg.load_plugins()
    return list(reg.failures)


def plugins() -> list[PluginInfo]:
    """Every plugin seen: built-ins, loaded, disabled and failed ones."""
    reg = current()
    reg.load_plugins()
    return list(reg.infos)


def plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager holding every loaded plugin."""
    reg = current()
    reg.load_plugins()
    return reg.manager


def rows() -> list[dict[str, str]]:
    """One row per registered entry: kind, name, distribution, version, description, plugin."""
    return current().rows()


def report() -> Report:
    """What ``tensadapt plugins --json`` prints: entries, plugins, failures and slow imports."""
    return current().report()


def names(kind: Kind) -> Sequence[str]:
    """Registered names of one kind (``factorization``, ``architecture``, ``initializer``)."""
    return current().registry(kind).names()
