"""What a plugin hands to tensadapt: checked when it is registered (and by the conformance kit),
guarded when it is used.

Each check -- of a factorization class, a tensor network, a model family, an initialiser -- returns
a list of problems (strings, empty when all is well) instead of raising, so the plugin loader can
report them by plugin name and leave that entry out. :func:`guard` and :func:`as_guest` wrap a
plugin's code when it runs: its exceptions become a :class:`~tensadapt.errors.PluginError` naming
it, its prints go to stderr. Nothing here imports torch: a network is checked by its legs and
shapes, and its contraction by opt_einsum on shapes alone.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from .errors import PluginError, TensadaptError, describe
from .factorizations.base import Axis, Factorization, Network, equation
from .registry import Entry, Initializer

if TYPE_CHECKING:
    from .arch.families import Family

#: What a registered name may look like (a spec writes it as a bare YAML word).
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
#: The tensor the loader builds a new factorization's network for: ``in=16, out=8`` at rank 2.
PROBE_AXES: tuple[Axis, ...] = (Axis("in", 16), Axis("out", 8))
PROBE_RANK = 2
#: The methods of a plugin's factorization whose exceptions become a ``PluginError``.
GUARDED_METHODS: tuple[str, ...] = ("rank_keys", "check", "network", "n_params", "parse_options")


def network_problems(net: object, axes: Sequence[Axis]) -> list[str]:
    """What is wrong with ``net`` as the network of a tensor with these ``axes``.

    Checks: it is a :class:`Network`; its axes are ``axes`` in order; each axis's legs multiply
    to the axis size; every factor's shape is the sizes of its legs; the zero factor is one of
    its factors; and the factors contract to the axis legs (opt_einsum, on shapes only).
    """
    if not isinstance(net, Network):
        return [f"network() returned {type(net).__name__}, expected a Network"]
    names = [a.name for a in axes]
    got = [a for a, _ in net.axis_legs]
    if got != names:
        return [f"network() has axes {got}, expected {names}"]
    sizes = dict(net.leg_sizes)
    problems = []
    for axis in axes:
        legs = net.legs_of(axis.name)
        leg_sizes = [sizes.get(leg) for leg in legs]
        if None in leg_sizes or math.prod(s or 0 for s in leg_sizes) != axis.size:
            problems.append(
                f"axis {axis.name} of size {axis.size} has legs {list(legs)} of sizes {leg_sizes}"
            )
    for f in net.factors:
        want = tuple(sizes.get(leg) for leg in f.legs)
        if tuple(f.shape) != want:
            problems.append(f"factor {f.name} has shape {tuple(f.shape)}, its legs give {want}")
    if net.zero_factor not in {f.name for f in net.factors}:
        problems.append(f"zero_factor {net.zero_factor!r} is not one of its factors")
    if problems:
        return problems
    out_legs = [leg for _, legs in net.axis_legs for leg in legs]
    try:
        eq, _ = equation(net, out_legs)
        import opt_einsum as oe  # only a plugin's network is checked with it

        oe.contract_path(eq, *[f.shape for f in net.factors], shapes=True)
    except Exception as exc:
        return [f"its factors do not contract to the axes: {describe(exc)}"]
    return []


def factorization_problems(cls: object) -> list[str]:
    """What is wrong with ``cls`` as a factorization class (empty when it conforms).

    Checks the interface (a :class:`~tensadapt.factorizations.base.Factorization` subclass with a
    name, ``network``, ``rank_keys``, ``check``, a pydantic ``options_model``, ``inits``,
    ``description``, constructible without arguments), then builds the network of the probe
    tensor (``in=16, out=8`` at rank 2, when ``check`` accepts it) and checks it with
    :func:`network_problems`. The conformance kit probes many more shapes and ranks.
    """
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
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(f"class {label} has no valid 'name' (got {name!r})")
    om = getattr(cls, "options_model", None)
    if not (isinstance(om, type) and issubclass(om, BaseModel)):
        problems.append(f"class {label}: options_model must be a pydantic model class, got {om!r}")
    inits = getattr(cls, "inits", ())  # optional: initialisers declare the formats they start
    if not isinstance(inits, tuple | list) or not all(isinstance(i, str) for i in inits):
        problems.append(f"class {label}: inits must be a tuple of names, got {inits!r}")
    if not isinstance(getattr(cls, "description", None), str):
        problems.append(f"class {label}: description must be a string")
    if problems:
        return problems
    try:
        inst = cls()
        options = inst.options_model()
        if inst.check(PROBE_AXES, PROBE_RANK, options):
            return []
        net = inst.network(PROBE_AXES, PROBE_RANK, options)
    except Exception as exc:
        return [f"class {label}: network() on a 16x8 tensor at rank 2 raised {describe(exc)}"]
    return [f"class {label}: {p}" for p in network_problems(net, PROBE_AXES)]


def family_problems(obj: object, taken: Sequence[Entry[Family]]) -> tuple[str, list[str]]:
    """``(name, problems)`` of ``obj`` as a model family, ``taken`` being the families so far."""
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
    for other in taken:
        clash = sorted(set(obj.model_types) & set(other.obj.model_types))
        if clash and other.name != obj.name:
            problems.append(
                f"model_type(s) {clash} already covered by family {other.name!r} "
                f"({other.source} {other.version})".replace(" )", ")")
            )
    return obj.name, problems


def as_initializer(obj: object) -> tuple[str, Initializer | None, list[str]]:
    """``(name, initializer, problems)`` for an item a plugin's initialiser hook returned.

    An :class:`~tensadapt.registry.Initializer` is taken as is. A plain callable is wrapped: its
    ``name`` attribute (else ``__name__``), its ``description`` (else its docstring's first line),
    ``pretrained`` (default ``True``: older plugins registered pretrained initialisers only) and
    ``factorizations`` (default ``None``, every format).
    """
    if isinstance(obj, Initializer):
        ini = obj
    elif callable(obj):
        name = getattr(obj, "name", None) or getattr(obj, "__name__", None)
        if not isinstance(name, str):
            return repr(obj), None, [f"has no valid name (got {name!r})"]
        doc = (getattr(obj, "__doc__", None) or "").strip()
        formats = getattr(obj, "factorizations", None)
        ini = Initializer(
            name=name,
            description=str(getattr(obj, "description", "") or (doc.splitlines() or [""])[0]),
            pretrained=getattr(obj, "pretrained", True),
            factorizations=tuple(formats) if isinstance(formats, list | tuple) else formats,
            function=obj,
        )
    else:
        return repr(obj), None, [f"expected a callable or an Initializer, got {type(obj).__name__}"]
    problems = []
    if not isinstance(ini.name, str) or not NAME.match(ini.name):
        return repr(obj), None, [f"has no valid name (got {ini.name!r})"]
    if not isinstance(ini.pretrained, bool):
        problems.append(f"'pretrained' must be true or false, got {ini.pretrained!r}")
    formats = ini.factorizations
    if formats is not None and not (
        isinstance(formats, tuple) and all(isinstance(f, str) for f in formats)
    ):
        problems.append(f"'factorizations' must be None or a tuple of names, got {formats!r}")
    if not (callable(ini.function) or isinstance(ini.function, str) and ":" in ini.function):
        problems.append(f"'function' must be a callable or 'module:attr', got {ini.function!r}")
    return ini.name, (None if problems else ini), problems


class _GuestMethod:
    """A plugin factorization's method whose exceptions become a ``PluginError`` naming it.

    Passed through: :class:`~tensadapt.errors.TensadaptError` (an error tensadapt means) and
    pydantic's ``ValidationError`` (bad ``options:``, reported at their spec path).
    """

    def __init__(self, method: Callable[..., object], name: str, who: str) -> None:
        self.method, self.name, self.who = method, name, who

    def __call__(self, *args: object, **kwargs: object) -> object:
        try:
            return self.method(*args, **kwargs)
        except (TensadaptError, ValidationError):
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise PluginError(f"{self.who}: {self.name}() raised {describe(exc)}") from exc


def guard(obj: object, who: str) -> None:
    """Shadow ``obj``'s :data:`GUARDED_METHODS` with :class:`_GuestMethod` wrappers (the object
    keeps its class, so ``isinstance`` and ``type()`` still name the plugin's own class)."""
    for name in GUARDED_METHODS:
        with contextlib.suppress(AttributeError, TypeError):  # __slots__: left as it is
            setattr(obj, name, _GuestMethod(getattr(obj, name), name, who))


@contextlib.contextmanager
def as_guest() -> Iterator[None]:
    """Run plugin code with its prints sent to stderr (stdout belongs to the command)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
