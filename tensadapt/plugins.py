"""Plugins: a pluggy ``PluginManager`` over the entry-point group ``tensadapt``, and the registries
of factorizations, architectures (model families) and initialisers it fills.

The built-ins are registered through the same hooks as outside plugins (:mod:`._builtin_plugin`,
and :mod:`tensadapt.init` when present). Loading is lazy: nothing from an entry point is imported
at ``import tensadapt``; the first lookup in a registry (validating a spec, planning, ``tensadapt
plugins``) loads every plugin once.

Failure isolation: a plugin that cannot be imported, whose hook raises or returns something other
than a list, that registers a name already taken, or whose class breaks the interface is reported
-- as a :class:`PluginFailure` naming the plugin, its distribution and version and what failed,
and as a :class:`PluginWarning` -- and that plugin (or that one entry) is left out; the rest keep
working. ``TENSADAPT_DISABLE_PLUGINS=name,...`` and ``tensadapt --disable-plugin NAME`` leave
plugins out by entry-point or distribution name.

Example::

    from tensadapt.plugins import factorization_registry
    factorization_registry().get("tensor_ring")   # RegistryError listing the valid names if absent
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pluggy

from . import hookspecs
from .errors import RegistryError, first_line
from .hookspecs import HOOKS, PROJECT, hookimpl
from .registry import Entry, Registry

if TYPE_CHECKING:
    from .arch.families import Family
    from .factorizations.base import Factorization

#: Entry-point group a plugin distribution declares its plugin module in.
ENTRY_POINT_GROUP = PROJECT
#: Environment variable: comma-separated plugin (entry-point) or distribution names to leave out.
DISABLE_ENV = "TENSADAPT_DISABLE_PLUGINS"
#: Modules of tensadapt itself registered as plugins, in order. An absent module is skipped
#: (``tensadapt.init`` registers the initialisers once it exists).
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("tensadapt", "tensadapt._builtin_plugin"),
    ("tensadapt.init", "tensadapt.init"),
)

Kind = Literal["factorization", "architecture", "initializer"]
#: The registry kinds, in the order ``tensadapt plugins`` lists them, with the hook filling each.
KINDS: tuple[tuple[Kind, str], ...] = (
    ("factorization", "tensadapt_register_factorizations"),
    ("architecture", "tensadapt_register_architectures"),
    ("initializer", "tensadapt_register_initializers"),
)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")

__all__ = [
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "PluginFailure",
    "PluginInfo",
    "PluginWarning",
    "architecture_registry",
    "disable",
    "factorization_problems",
    "factorization_registry",
    "families",
    "failures",
    "hookimpl",
    "initializer_registry",
    "plugin_manager",
    "plugins",
    "reset",
    "rows",
]


class PluginWarning(UserWarning):
    """A plugin (or one of its entries) was left out; the message says which and why."""


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
        return (
            f"plugin {self.plugin!r} ({self.distribution} {self.version}".rstrip()
            + f"): {left}: {self.what}"
        )


@dataclass(frozen=True)
class PluginInfo:
    """One plugin tensadapt knows of: where it comes from and whether it is in use.

    Attributes:
        name: entry-point name (``tensadapt`` / the module name for built-ins).
        distribution, version: the providing distribution.
        value: what the entry point points at (``module`` or ``module:attr``).
        status: ``loaded``, ``disabled`` or ``failed``.
    """

    name: str
    distribution: str
    version: str
    value: str
    status: Literal["loaded", "disabled", "failed"]


@dataclass
class _State:
    """Everything one load produced."""

    manager: pluggy.PluginManager
    registries: dict[str, Registry[Any]]
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)


_state: _State | None = None
_disabled: set[str] = set()


# -- public API ------------------------------------------------------------------------------------
def factorization_registry() -> Registry[Factorization]:
    """Factorizations by name (one instance each): the built-ins and every plugin's."""
    return _get().registries["factorization"]


def architecture_registry() -> Registry[Family]:
    """Model families by name: the built-in table and every plugin's."""
    return _get().registries["architecture"]


def initializer_registry() -> Registry[Callable[..., Any]]:
    """Initialisers (callables) by name: :mod:`tensadapt.init`'s and every plugin's."""
    return _get().registries["initializer"]


def families() -> tuple[Family, ...]:
    """Every registered family, built-ins first (what :func:`tensadapt.arch.from_config` uses)."""
    return tuple(e.obj for e in architecture_registry())


def failures() -> list[PluginFailure]:
    """Every problem met while loading plugins (empty when all is well)."""
    return list(_get().failures)


def plugins() -> list[PluginInfo]:
    """Every plugin seen: built-ins, loaded, disabled and failed ones."""
    return list(_get().plugins)


def plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager holding every loaded plugin."""
    return _get().manager


def disabled_names() -> set[str]:
    """Plugin or distribution names left out: ``$TENSADAPT_DISABLE_PLUGINS`` plus :func:`disable`."""
    env = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    return {_norm(n) for n in env | _disabled}


def disable(names: Iterable[str]) -> None:
    """Leave these plugins (entry-point or distribution names) out from the next load on."""
    _disabled.update(names)
    reset()


def reset(disabled: Iterable[str] | None = None) -> None:
    """Forget the loaded plugins; the next registry lookup loads them again.

    Args:
        disabled: when given, replaces the names :func:`disable` collected (``()`` re-enables
            all but those in ``$TENSADAPT_DISABLE_PLUGINS``).
    """
    global _state
    if disabled is not None:
        _disabled.clear()
        _disabled.update(disabled)
    _state = None


def rows() -> list[dict[str, str]]:
    """One row per registered entry: kind, name, distribution, version, description."""
    st = _get()
    out = []
    for kind, _ in KINDS:
        for e in st.registries[kind]:
            out.append(
                {
                    "kind": kind,
                    "name": e.name,
                    "distribution": e.source,
                    "version": e.version,
                    "description": e.description,
                    "plugin": e.plugin,
                }
            )
    return out


def report() -> dict[str, Any]:
    """What ``tensadapt plugins --json`` prints: entries, plugins and failures."""
    st = _get()
    return {
        "entries": rows(),
        "plugins": [asdict(p) for p in st.plugins],
        "failures": [{**asdict(f), "message": str(f)} for f in st.failures],
    }


# -- checks on what plugins return -----------------------------------------------------------------
def factorization_problems(cls: Any) -> list[str]:
    """What is wrong with ``cls`` as a factorization class (empty when it conforms).

    Checks the interface (a :class:`~tensadapt.factorizations.base.Factorization` subclass with a
    name, ``network``, ``rank_keys``, ``check``, a pydantic ``options_model``, ``inits``,
    ``description``, constructible without arguments), then builds the network of a tiny
    ``in=16, out=8`` tensor at rank 2 (when ``check`` accepts it) and checks its legs and shapes.
    """
    from pydantic import BaseModel

    from .factorizations.base import Axis, Factorization, Network, reconstruct

    if not isinstance(cls, type):
        return [f"expected a class, got {type(cls).__name__} {cls!r}"]
    label = cls.__qualname__
    required = ("network", "rank_keys", "check", "parse_options", "n_params")
    missing = [m for m in required if not callable(getattr(cls, m, None))]
    if missing:
        return [f"class {label} is missing method(s) {', '.join(missing)}"]
    if not issubclass(cls, Factorization):
        return [f"class {label} is not a subclass of tensadapt.factorizations.Factorization"]
    if cls.network is Factorization.network:
        return [f"class {label} does not implement network(axes, rank, options)"]
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"class {label} has no valid 'name' (got {name!r})")
    om = getattr(cls, "options_model", None)
    if not (isinstance(om, type) and issubclass(om, BaseModel)):
        problems.append(f"class {label}: options_model must be a pydantic model class, got {om!r}")
    inits = getattr(cls, "inits", None)
    if not isinstance(inits, tuple | list) or not all(isinstance(i, str) for i in inits):
        problems.append(f"class {label}: inits must be a tuple of names, got {inits!r}")
    if not isinstance(getattr(cls, "description", None), str):
        problems.append(f"class {label}: description must be a string")
    if problems:
        return problems
    try:
        inst = cls()
    except Exception as exc:
        return [f"class {label} cannot be constructed without arguments: {_exc(exc)}"]
    axes = (Axis("in", 16), Axis("out", 8))
    try:
        options = inst.options_model()
        if inst.check(axes, 2, options):
            return []
        net = inst.network(axes, 2, options)
    except Exception as exc:
        return [f"class {label}: network() on a 16x8 tensor at rank 2 raised {_exc(exc)}"]
    if not isinstance(net, Network):
        return [f"class {label}: network() returned {type(net).__name__}, expected a Network"]
    if {a for a, _ in net.axis_legs} != {"in", "out"}:
        return [f"class {label}: network() axes {[a for a, _ in net.axis_legs]} != ['in', 'out']"]
    if net.zero_factor not in {f.name for f in net.factors}:
        return [f"class {label}: zero_factor {net.zero_factor!r} is not one of its factors"]
    try:
        import torch

        full = reconstruct(net, {f.name: torch.ones(f.shape) for f in net.factors})
    except Exception as exc:
        return [f"class {label}: its network does not contract: {_exc(exc)}"]
    if tuple(full.shape) != (16, 8):
        return [f"class {label}: reconstruction has shape {tuple(full.shape)}, expected (16, 8)"]
    return []


def _family_problems(obj: Any, reg: Registry[Family]) -> tuple[str, list[str]]:
    from .arch.base import PROJECTIONS
    from .arch.families import Family

    if not isinstance(obj, Family):
        return repr(obj), [f"expected a tensadapt.arch.Family, got {type(obj).__name__}"]
    problems = []
    if not obj.model_types:
        problems.append("covers no model_type")
    if not obj.layouts:
        problems.append("has no layout")
    for layout in obj.layouts:
        bad = [p for p in layout.paths if p not in PROJECTIONS]
        if bad:
            problems.append(f"layout names unknown projection(s) {bad}; valid: {PROJECTIONS}")
    for other in reg:
        taken = sorted(set(obj.model_types) & set(other.obj.model_types))
        if taken and other.name != obj.name:
            problems.append(
                f"model_type(s) {taken} already covered by family {other.name!r} "
                f"({other.source} {other.version})".replace(" )", ")")
            )
    return obj.name, problems


def _initializer_name(obj: Any) -> tuple[str, list[str]]:
    if not callable(obj):
        return repr(obj), [f"expected a callable, got {type(obj).__name__}"]
    name = getattr(obj, "name", None) or getattr(obj, "__name__", None)
    if not isinstance(name, str) or not _NAME.match(name):
        return repr(obj), [f"has no valid name (got {name!r})"]
    return name, []


# -- loading ---------------------------------------------------------------------------------------
@dataclass
class _Source:
    name: str
    distribution: str
    version: str
    value: str
    obj: Any = None


def _get() -> _State:
    global _state
    if _state is None:
        _state = _load()
    return _state


def _entry_points() -> list[Any]:
    """The ``tensadapt`` entry points installed, by name (duplicates of one path dropped)."""
    seen: dict[tuple[str, str], Any] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault((ep.name, ep.value), ep)
    return sorted(seen.values(), key=lambda ep: ep.name)


def _dist_of(ep: Any) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", ""
    try:
        return str(dist.metadata["Name"] or dist.name), str(dist.version or "")
    except Exception:  # a broken METADATA file must not stop the others
        return str(getattr(dist, "name", "?")), ""


def _own_version() -> str:
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return ""


def _load() -> _State:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    st = _State(
        manager=pm,
        registries={kind: Registry(kind) for kind, _ in KINDS},
    )
    version = _own_version()
    sources: list[_Source] = []
    for plugin_name, mod in BUILTIN_PLUGINS:
        src = _Source(plugin_name, PROJECT, version, mod)
        try:
            src.obj = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # optional built-in module not there (yet)
                continue
            _fail(st, src, f"import failed: {_exc(exc)}")
            continue
        except Exception as exc:
            _fail(st, src, f"import failed: {_exc(exc)}")
            continue
        sources.append(src)

    off = disabled_names()
    for ep in _entry_points():
        dist, ver = _dist_of(ep)
        src = _Source(str(ep.name), dist, ver, str(ep.value))
        if _norm(src.name) in off or _norm(dist) in off:
            st.plugins.append(PluginInfo(src.name, dist, ver, src.value, "disabled"))
            continue
        try:
            src.obj = ep.load()
        except BaseException as exc:  # SystemExit from a plugin's import must not kill us
            if isinstance(exc, KeyboardInterrupt):
                raise
            _fail(st, src, f"import failed: {_exc(exc)}")
            continue
        sources.append(src)

    registered: list[_Source] = []
    for src in sources:
        if pm.is_registered(src.obj) or pm.has_plugin(src.name):
            _fail(st, src, "another plugin of the same name or object is already registered")
            continue
        unknown = sorted(
            n
            for n in dir(src.obj)
            if n.startswith(f"{PROJECT}_") and n not in HOOKS and callable(getattr(src.obj, n))
        )
        if unknown:
            _fail(st, src, f"unknown hook(s) {unknown}; valid hooks: {', '.join(HOOKS)}")
            continue
        try:
            pm.register(src.obj, name=src.name)
        except Exception as exc:
            _fail(st, src, f"hook validation failed: {_exc(exc)}")
            continue
        registered.append(src)

    for kind, hook in KINDS:
        caller = getattr(pm.hook, hook)
        impls = {impl.plugin_name: impl for impl in caller.get_hookimpls()}
        for src in registered:
            impl = impls.get(src.name)
            if impl is None:
                continue
            try:
                items = impl.function()
            except Exception as exc:
                _fail(st, src, f"{hook}() raised {_exc(exc)}")
                continue
            if not isinstance(items, list | tuple):
                _fail(st, src, f"{hook}() returned {type(items).__name__}, expected a list")
                continue
            for item in items:
                _register(st, kind, item, src)

    seen = {p.name for p in st.plugins}
    for src in registered:
        if src.name not in seen:
            st.plugins.append(
                PluginInfo(src.name, src.distribution, src.version, src.value, "loaded")
            )
    return st


def _register(st: _State, kind: Kind, item: Any, src: _Source) -> None:
    reg = st.registries[kind]
    description = ""
    if kind == "factorization":
        label = str(getattr(item, "name", None) or getattr(item, "__name__", repr(item)))
        problems = factorization_problems(item)
        obj: Any = None if problems else item()
        description = str(getattr(item, "description", "") or "")
    elif kind == "architecture":
        label, problems = _family_problems(item, reg)
        obj = item
        description = "model_type " + ", ".join(map(str, getattr(item, "model_types", ())))
    else:
        label, problems = _initializer_name(item)
        obj = item
        doc = getattr(item, "__doc__", None)
        description = str(getattr(item, "description", "") or _first_line(doc))
    entry = f"{kind} {label!r}"
    if problems:
        _fail(st, src, "; ".join(problems), entry)
        return
    try:
        reg.register(label, obj, src.distribution, src.version, description, src.name)
    except RegistryError as exc:
        prev: Entry[Any] = reg.entry(label)
        _fail(
            st,
            src,
            f"name already registered by plugin {prev.plugin!r} "
            f"({prev.source} {prev.version})".replace(" )", ")"),
            entry,
        )
        del exc


def _fail(st: _State, src: _Source, what: str, entry: str = "") -> None:
    failure = PluginFailure(src.name, src.distribution, src.version, what, entry)
    st.failures.append(failure)
    if not entry and all(p.name != src.name for p in st.plugins):
        st.plugins.append(PluginInfo(src.name, src.distribution, src.version, src.value, "failed"))
    warnings.warn(str(failure), PluginWarning, stacklevel=3)


def _exc(exc: BaseException) -> str:
    text = first_line(exc, 300)
    return f"{type(exc).__name__}: {text}" if str(exc).strip() else text


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def _norm(name: str) -> str:
    """Distribution-style normalisation: case and ``-``/``_``/``.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def names(kind: Kind) -> Sequence[str]:
    """Registered names of one kind (``factorization``, ``architecture``, ``initializer``)."""
    return _get().registries[kind].names()
