"""Safe by construction: the package never unpickles. YAML only through a safe loader, tensors
only through safetensors, no ``torch.load`` without ``weights_only=True``, no pickle modules.

The check reads the source with ``ast`` (so calls split over lines, aliases such as
``from yaml import load`` and docstrings mentioning "pickle" are handled), and is itself tested on
bad snippets, so it cannot pass vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
UNSAFE_YAML = {"unsafe_load", "full_load", "unsafe_load_all", "full_load_all", "load_all"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def problems(source: str, name: str = "<src>") -> list[str]:
    """Every unsafe deserialisation in ``source``, as ``"name:line: what"``."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}  # local name -> module.attr it stands for
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name] = a.name
                if a.name.split(".")[0] in PICKLE_MODULES:
                    out.append(f"{name}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                out.append(f"{name}:{node.lineno}: imports from {node.module}")
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        head, _, rest = func.partition(".")
        full = f"{alias.get(head, head)}.{rest}" if rest else alias.get(head, head)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{name}:{node.lineno}"
        if full == "torch.load":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                out.append(f"{where}: torch.load without weights_only=True")
        elif full == "yaml.load":
            loader = kw.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                out.append(f"{where}: yaml.load without SafeLoader")
        elif (
            full.startswith("yaml.")
            and full.split(".")[-1] in UNSAFE_YAML
            or full.split(".")[-1] in {"loads", "load"}
            and full.split(".")[0] in PICKLE_MODULES
        ):
            out.append(f"{where}: {full}")
        if any(
            k == "allow_pickle" and isinstance(v, ast.Constant) and v.value for k, v in kw.items()
        ):
            out.append(f"{where}: allow_pickle=True")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr
            in {
                "Loader",
                "UnsafeLoader",
                "FullLoader",
            }
            and _dotted(node.value) == "yaml"
        ):
            out.append(f"{name}:{node.lineno}: yaml.{node.attr}")
    return out


def package_files() -> list[Path]:
    files = sorted((ROOT / "tensadapt").rglob("*.py"))
    plugins = ROOT / "plugins"
    if plugins.is_dir():
        files += sorted(p for p in plugins.rglob("*.py") if "/tests/" not in p.as_posix())
    return files


def test_package_never_unpickles() -> None:
    files = package_files()
    assert len(files) > 10
    found = [
        p for f in files for p in problems(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))
    ]
    assert found == []


@pytest.mark.parametrize(
    ("snippet", "what"),
    [
        ("import torch\ntorch.load('x')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load(\n  'x',\n  weights_only=False)", "torch.load without"),
        ("from torch import load as L\nL('x')", "torch.load without"),
        ("import yaml\nyaml.load(s)", "yaml.load without SafeLoader"),
        ("import yaml\nyaml.load(s, Loader=yaml.Loader)", "yaml.load without SafeLoader"),
        ("from yaml import load\nload(s)", "yaml.load without SafeLoader"),
        ("import yaml\nyaml.unsafe_load(s)", "yaml.unsafe_load"),
        ("import pickle\npickle.loads(b)", "imports pickle"),
        ("from joblib import load", "imports from joblib"),
        ("import numpy as np\nnp.load('x', allow_pickle=True)", "allow_pickle=True"),
    ],
)
def test_checker_catches(snippet: str, what: str) -> None:
    assert any(what in p for p in problems(snippet)), problems(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x', weights_only=True)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(s)",
        '"""No pickle here."""\nfrom safetensors.torch import load_file',
    ],
)
def test_checker_accepts_safe_code(snippet: str) -> None:
    assert problems(snippet) == []


def test_saved_adapter_is_safetensors_and_text_only(tmp_path: Path) -> None:
    """What save_adapter writes: one safetensors file and two text files, nothing else."""
    from conftest import build_model

    import tensadapt as ta

    model = build_model("tiny-bert")
    ta.inject(model, {"factorization": "cp", "modes": ["qkv", "depth"], "rank": 2})
    d = ta.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in d.iterdir()) == ["adapter.safetensors", "plan.json", "spec.yaml"]
    assert (d / "adapter.safetensors").read_bytes()[8:9] == b"{"  # a JSON header, no pickle
