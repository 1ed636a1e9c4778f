"""docs/architecture.md lists every module of the package once, and nothing else (issue 14)."""

from __future__ import annotations

import re

from conftest import ROOT


def test_every_module_is_on_the_map_and_the_map_names_only_modules() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `(tensadapt/[\w/]+\.py)` \|", text, flags=re.MULTILINE)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    actual = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tensadapt").rglob("*.py") if "__pycache__" not in p.parts
    )
    missing = sorted(set(actual) - set(listed))
    stale = sorted(set(listed) - set(actual))
    assert not missing, f"modules missing from docs/architecture.md: {missing}"
    assert not stale, f"docs/architecture.md lists modules that do not exist: {stale}"


def test_reliability_table_names_tests_that_exist() -> None:
    """docs/reliability.md points at tests: every file and test it names exists."""
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    files = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    assert files, "the table names no tests"
    for f in files:
        assert (ROOT / f).is_file(), f
    for f, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text):
        assert re.search(rf"^def {name}\(", (ROOT / f).read_text(), flags=re.MULTILINE), (f, name)
