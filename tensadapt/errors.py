"""Errors raised by tensadapt. Each one names what is wrong and where."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem in a spec: where (a YAML path such as ``rank.qkv``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<spec>'}: {self.message}"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its class name
    when it has no message: what to quote of a library's error inside a tensadapt error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (just the type when there is no message): how a
    library's or a plugin's exception is quoted inside a tensadapt error."""
    text = first_line(exc, limit)
    return f"{type(exc).__name__}: {text}" if str(exc).strip() else text


class TensadaptError(Exception):
    """Base class of every error tensadapt raises on purpose."""


class SpecError(TensadaptError, ValueError):
    """A spec is invalid. Carries *every* problem found, each with its YAML path.

    Args:
        problems: all problems found in the spec.
        source: the file (or ``<string>``/``<dict>``) the spec came from.
    """

    def __init__(self, problems: Sequence[Problem], source: str = "<spec>") -> None:
        self.problems = tuple(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in spec:\n{lines}")


class PlanError(TensadaptError, ValueError):
    """A valid spec cannot be planned against this architecture (e.g. a target it lacks)."""


class RegistryError(TensadaptError, KeyError):
    """A name is not registered, or is registered twice. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(TensadaptError, RuntimeError):
    """A plugin failed while tensadapt used it (an exception from one of its factorization's
    methods, say); the message names the plugin, its distribution and version, and what failed."""


class ArchitectureError(TensadaptError, ValueError):
    """A model family cannot be adapted; the message says what was found."""


class AdapterMismatchError(TensadaptError, ValueError):
    """A saved adapter does not fit the model (or file) it is loaded into; names the mismatch."""


class ExportError(TensadaptError, ValueError):
    """An adapter cannot be exported in the requested form; the message says why and what to do."""


class NonFiniteError(TensadaptError, FloatingPointError):
    """A factor (or its gradient) holds NaN or inf during training; names the tensor and the step.

    Attributes:
        step: the training step at which it was found (``None`` when unknown).
        names: the offending tensors, e.g. ``["q_k_v.U_in", "q_k_v.U_in.grad"]``.
    """

    def __init__(self, message: str, step: int | None = None, names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.step = step
        self.names = names


class DivergenceError(TensadaptError, FloatingPointError):
    """The training loss exploded (finite, but far above where it started); names step and loss.

    Attributes:
        step: the optimizer step whose loss crossed the limit.
        loss: that loss.
        limit: the limit it crossed (see :class:`tensadapt.numerics.DivergenceCallback`).
    """

    def __init__(self, message: str, step: int, loss: float, limit: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.limit = limit


class MissingDependencyError(TensadaptError, ImportError):
    """An optional package a feature needs is not installed; the message gives the pip line.

    Attributes:
        package: the missing import name (e.g. ``datasets``).
        extra: the tensadapt extra that installs it (e.g. ``hf``).
    """

    def __init__(self, message: str, package: str, extra: str) -> None:
        super().__init__(message)
        self.package = package
        self.extra = extra
