"""The minimum versions pyproject.toml declares are the ones CI tests.

Every dependency in ``pyproject.toml`` (core and every extra) has one floor (``>=``);
``constraints-min.txt`` pins each of them to exactly that floor, and ``make test-min`` runs the fast
suite in a virtual environment installed with those pins (CI runs it after ``make test``). These
tests keep the two files in step, name by name, so a floor cannot be raised or lowered without the
CI step that proves it; and inside that environment (``TENSADAPT_MIN_VERSIONS=1``, set by
``make test-min``) they check that pip really installed the pinned versions, so the run cannot pass
on newer releases by accident.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli on 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS_MIN = ROOT / "constraints-min.txt"
IN_MIN_ENV = os.environ.get("TENSADAPT_MIN_VERSIONS") == "1"

#: import names that differ from the distribution's name (``None``: nothing to import)
IMPORT_NAMES: dict[str, str | None] = {
    "pyyaml": "yaml",
    "pytest-xdist": "xdist",
    "types-pyyaml": None,  # type stubs only
}


def _requirements(text: str) -> list[tuple[str, Requirement]]:
    """Every requirement of a pyproject.toml text as (group, requirement); group ``core`` or the
    name of an extra."""
    project = tomllib.loads(text)["project"]
    groups = {"core": project["dependencies"], **project.get("optional-dependencies", {})}
    return [(group, Requirement(line)) for group, lines in groups.items() for line in lines]


def _applies(group: str, req: Requirement) -> bool:
    """Whether the requirement's environment marker (e.g. ``python_version < '3.11'``) holds here."""
    return req.marker is None or req.marker.evaluate({"extra": group})


def _floors(req: Requirement) -> list[Version]:
    return [Version(s.version) for s in req.specifier if s.operator == ">="]


def _pins(text: str) -> tuple[dict[NormalizedName, Version], list[str]]:
    """A constraints-min.txt text: one ``NAME==VERSION`` a line; ``#`` comments, blank lines.

    Returns the pins and the problems found (a line that is not a plain pin, a name pinned twice).
    """
    pins: dict[NormalizedName, Version] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"constraints-min.txt:{number}: {line!r}"
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or req.extras or req.marker is not None:
            problems.append(f"{where} is not a plain NAME==VERSION pin")
            continue
        name = canonicalize_name(req.name)
        if name in pins:
            problems.append(f"{where}: {req.name} is pinned twice")
        pins[name] = Version(specs[0].version)
    return pins, problems


def _disagreements(pyproject_text: str, constraints_text: str) -> list[str]:
    """Everything that keeps ``constraints-min.txt`` from pinning exactly pyproject's floors."""
    requirements = _requirements(pyproject_text)
    pins, problems = _pins(constraints_text)
    floors: dict[NormalizedName, set[Version]] = {}
    for group, req in requirements:
        found = _floors(req)
        if len(found) != 1:  # none: the minimum is unknown; two: which one is tested?
            problems.append(f"{group}: {req} needs exactly one '>=' floor")
        floors.setdefault(canonicalize_name(req.name), set()).update(found)
    for name, versions in sorted(floors.items()):
        if len(versions) > 1:
            problems.append(f"{name}: different floors in different groups: {sorted(versions)}")
        elif name not in pins:
            problems.append(f"{name}: pyproject.toml has a floor, constraints-min.txt no pin")
        elif versions and pins[name] not in versions:
            problems.append(
                f"{name}: pyproject.toml says >={min(versions)}, constraints-min.txt =={pins[name]}"
            )
    problems += [
        f"{name}: pinned in constraints-min.txt but not a dependency in pyproject.toml"
        for name in sorted(pins.keys() - floors.keys())
    ]
    problems += [  # a pin must also meet every other bound (an upper bound, an exclusion)
        f"{group}: {req} excludes the pin {pins[name]}"
        for group, req in requirements
        if (name := canonicalize_name(req.name)) in pins
        and not req.specifier.contains(pins[name], prereleases=True)
    ]
    return problems


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_constraints_min_pins_exactly_the_floors_of_pyproject() -> None:
    problems = _disagreements(_text(PYPROJECT), _text(CONSTRAINTS_MIN))
    assert not problems, "pyproject.toml and constraints-min.txt disagree:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # a floor raised in pyproject.toml only
        (("pyproject", '"opt_einsum>=3.3.0"', '"opt_einsum>=3.4.0"'), "opt-einsum: pyproject"),
        # a floor lowered in one group only
        (("pyproject", '"optuna>=4.0.0"]', '"optuna>=3.0"]'), "optuna: different floors"),
        # a dependency without a floor
        (("pyproject", '"pyyaml>=6.0"', '"pyyaml"'), "needs exactly one '>=' floor"),
        # a new dependency with no pin
        (("pyproject", '"tqdm>=', '"rich>=13.0", "tqdm>='), "rich: pyproject.toml has a floor"),
        # a pin that is not a floor of anything
        (("constraints", "torch==", "rich==13.0\ntorch=="), "rich: pinned in constraints-min"),
        # a pin that is not exact
        (("constraints", "torch==", "torch>="), "is not a plain NAME==VERSION pin"),
        # the same package pinned twice
        (("constraints", "torch==", "opt_einsum==3.3.0\ntorch=="), "pinned twice"),
    ],
)
def test_a_disagreement_between_the_two_files_is_reported(
    edit: tuple[str, str, str], expected: str
) -> None:
    """The check above fails on each kind of drift (run on edited copies of the real files)."""
    which, old, new = edit
    texts = {"pyproject": _text(PYPROJECT), "constraints": _text(CONSTRAINTS_MIN)}
    assert old in texts[which], f"the edit's anchor {old!r} is gone from {which}: update the test"
    texts[which] = texts[which].replace(old, new, 1)
    problems = _disagreements(texts["pyproject"], texts["constraints"])
    assert any(expected in p for p in problems), problems


def _installed(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def test_installed_dependencies_are_within_the_declared_ranges() -> None:
    """Whatever environment runs the suite meets pyproject.toml: core dependencies are installed,
    and every installed dependency (core or extra) is inside its declared range (a stale package
    below a floor is reported here, not as a puzzling failure elsewhere)."""
    problems = []
    for group, req in _requirements(_text(PYPROJECT)):
        if not _applies(group, req):
            continue
        version = _installed(req.name)
        if version is None:
            if group == "core":
                problems.append(f"{req.name} (core) is not installed")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} is installed; {group} requires {req}")
    assert not problems, "\n".join(problems)


def test_installed_dependencies_import() -> None:
    """Every installed dependency imports: a broken one (an old release against a new
    ``transformers``, a compiled package against the wrong numpy) would otherwise only turn tests
    using ``pytest.importorskip`` into skips."""
    failed = []
    names = {
        canonicalize_name(r.name) for g, r in _requirements(_text(PYPROJECT)) if _applies(g, r)
    }
    for name in sorted(names):
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if module is None or _installed(name) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure to import is the finding
            failed.append(f"{name} (import {module}): {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(not IN_MIN_ENV, reason="checks the `make test-min` environment")
def test_min_environment_has_exactly_the_pinned_versions() -> None:
    pins, _ = _pins(_text(CONSTRAINTS_MIN))
    needed = {
        canonicalize_name(r.name) for g, r in _requirements(_text(PYPROJECT)) if _applies(g, r)
    }
    wrong = []
    for name, pin in pins.items():
        version = _installed(name)
        if version is None and name not in needed:
            continue  # e.g. tomli, only a requirement before Python 3.11
        # a local label (torch 2.13.0+cpu) is the same release as the pin
        if version is None or Version(version.public) != pin:
            wrong.append(f"{name}: pinned {pin}, installed {version or 'nothing'}")
    assert not wrong, "the minimum-versions environment is not at the minimums:\n" + "\n".join(
        wrong
    )


def test_ci_runs_the_suite_at_the_minimum_versions() -> None:
    """CI's script runs ``make test-min``, whose install takes the pins of constraints-min.txt
    and whose run sets the flag that turns on the check above."""
    ci = [line.strip() for line in _text(ROOT / ".ci" / "run").splitlines()]
    assert "make test-min" in ci
    makefile = _text(ROOT / "Makefile")
    assert "-c constraints-min.txt" in makefile
    recipe = makefile.split("\ntest-min:", 1)[1].split("\n\n", 1)[0]
    assert "TENSADAPT_MIN_VERSIONS=1" in recipe and "pytest" in recipe
