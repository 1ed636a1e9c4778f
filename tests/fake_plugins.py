"""Installed plugin distributions, faked for the plugin tests: a distribution with one entry point
in the group ``tensadapt``, seen by ``importlib.metadata.distributions()`` -- which is where pluggy's
``load_setuptools_entrypoints`` and tensadapt look -- for the length of one test.

The two example plugins of this repository (``plugins/``) are used from their installed
distributions when ``make install`` put them there, and otherwise declared the same way from their
source trees, so the tests that need them run after a plain ``pip install -e '.[test]'`` too.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: entry-point name -> (distribution, module) of the example plugins shipped in ``plugins/``.
EXAMPLES: dict[str, tuple[str, str]] = {
    "tensor_ring": ("tensadapt-tensor-ring", "tensadapt_tensor_ring"),
    "gpt_neo": ("tensadapt-gpt-neo", "tensadapt_gpt_neo"),
}


def installed_plugins() -> set[str]:
    """Entry-point names of the ``tensadapt`` plugins installed in this environment."""
    return {ep.name for ep in importlib.metadata.entry_points(group="tensadapt")}


#: The example plugins are installed (``make install``), so a fresh process finds them.
EXAMPLES_INSTALLED = set(EXAMPLES) <= installed_plugins()
needs_installed_examples = pytest.mark.skipif(
    not EXAMPLES_INSTALLED,
    reason="runs a fresh Python process that needs the example plugins installed: "
    "pip install -e plugins/tensadapt-tensor-ring -e plugins/tensadapt-gpt-neo (make install)",
)


@dataclass
class FakeDist:
    """Stands in for an ``importlib.metadata.Distribution`` (what other libraries read of one
    while it is installed too: its names, no files, no requirements)."""

    name: str
    version: str
    entry_points: list[FakeEntryPoint] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    files: None = None
    requires: None = None

    def __post_init__(self) -> None:
        self.metadata = {"Name": self.name}
        self._normalized_name = self.name.replace("-", "_").lower()

    def read_text(self, filename: str) -> None:
        return None


class FakeEntryPoint:
    """An entry point of a fake distribution. ``target``: the plugin object, a module name to
    import, or an exception that loading it raises."""

    group = "tensadapt"

    def __init__(self, name: str, target: object, dist: str, version: str = "1.2.3") -> None:
        self.name, self._target = name, target
        self.value = target if isinstance(target, str) else dist.replace("-", "_")
        self.dist = FakeDist(dist, version, [self])

    def matches(self, **params: object) -> bool:
        return all(getattr(self, k, None) == v for k, v in params.items())

    def load(self) -> object:
        if isinstance(self._target, BaseException):
            raise self._target
        if isinstance(self._target, str):
            return importlib.import_module(self._target)
        return self._target


def install(monkeypatch: pytest.MonkeyPatch, *eps: FakeEntryPoint) -> None:
    """Make ``eps`` look installed for this test (and forget the plugins loaded so far)."""
    from tensadapt import plugins

    real = importlib.metadata.distributions
    dists = [ep.dist for ep in eps]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kw: [*real(**kw), *dists])
    plugins.reset()


def install_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example plugins, as installed: nothing to do when they are; otherwise their source
    trees are put on ``sys.path`` and declared as distributions (version from their pyproject)."""
    missing = set(EXAMPLES) - installed_plugins()
    eps = []
    for name in sorted(missing):
        dist, module = EXAMPLES[name]
        monkeypatch.syspath_prepend(str(ROOT / "plugins" / dist))
        eps.append(FakeEntryPoint(name, module, dist, _version(dist)))
    install(monkeypatch, *eps)


def _version(dist: str) -> str:
    text = (ROOT / "plugins" / dist / "pyproject.toml").read_text()
    return text.split('version = "', 1)[1].split('"', 1)[0]
