"""The README stays true: its spec reference lists exactly the spec's keys with their defaults,
and its quick start is exactly the two commands CI and newcomers run."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tensadapt.spec import AdapterSpec, TrainingSpec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _reference_rows() -> dict[str, str]:
    section = README.split("## Spec reference", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", section, flags=re.M)
    return dict(rows)


def test_spec_reference_lists_every_key_with_its_default() -> None:
    rows = _reference_rows()
    assert set(rows) == set(AdapterSpec.model_fields)
    for key, shown in rows.items():
        default = AdapterSpec.model_fields[key].get_default(call_default_factory=True)
        expected = yaml.safe_load(shown)
        if isinstance(default, tuple):
            default = list(default)
        assert expected == default, f"README says {key} defaults to {shown!r}, code says {default!r}"


def test_spec_reference_lists_every_training_key() -> None:
    section = README.split("## Spec reference", 1)[1].split("\n## ", 1)[0]
    table = section.split("| training key |", 1)[1].split("\n\n", 1)[0]
    keys = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert keys == list(TrainingSpec.model_fields)
    for key, field in TrainingSpec.model_fields.items():
        assert field.default is None, f"training.{key} must default to null (the command's own)"


def test_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
