"""Safe by construction: the package never unpickles. YAML only through a safe loader, tensors
only through safetensors, no ``torch.load`` without ``weights_only=True``, no pickle modules.

The check reads the source with ``ast`` (so calls split over lines, aliases such as
``from yaml import load`` and docstrings mentioning "pickle" are handled), and is itself tested on
bad snippets, so it cannot pass vacuously.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from tensadapt.model import get_adapter

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
    """What save_adapter writes: one safetensors file and one JSON config (plus the save lock)."""
    from conftest import build_model

    import tensadapt as ta

    model = build_model("tiny-bert")
    ta.inject(model, {"factorization": "cp", "modes": ["qkv", "depth"], "rank": 2})
    d = ta.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in d.iterdir()) == [
        ".tensadapt-save.lock",
        "adapter.safetensors",
        "adapter_config.json",
    ]
    assert (d / "adapter.safetensors").read_bytes()[8:9] == b"{"  # a JSON header, no pickle


# -- nothing lost: a save killed mid-way leaves the previous adapter intact ----------------------

SPEC_OLD = {"factorization": "cp", "modes": ["qkv", "depth"], "rank": 4, "alpha": 4}
SPEC_NEW = {"factorization": "cp", "modes": ["qkv", "depth"], "rank": 64, "alpha": 16}

CHILD = """
import os, signal, sys
import torch
from conftest import build_model, randomize
import tensadapt as ta
import tensadapt.io as tio

mode, directory = sys.argv[1], sys.argv[2]
model = build_model("tiny-bert")
ta.inject(model, {spec!r})
randomize(model, seed=99)
real_save = tio.save_file

def killed_mid_write(state, path, metadata=None):
    real_save(state, path, metadata=metadata)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # only the first half reached the disk
        fh.truncate(size // 2)
    os.kill(os.getpid(), signal.SIGKILL)

def killed_after_commit(path, text):
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "mid-write":
    tio.save_file = killed_mid_write
elif mode == "after-commit":
    tio.write_text = killed_after_commit
ta.save_adapter(model, directory)
print("save finished: the kill did not happen", file=sys.stderr)
sys.exit(3)
"""


def _old_adapter(d: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from conftest import build_model, hidden, model_inputs, randomize

    import tensadapt as ta

    model = build_model("tiny-bert")
    ta.inject(model, SPEC_OLD)
    randomize(model, seed=1)
    ta.save_adapter(model, d)
    return {k: v.clone() for k, v in get_adapter(model).state_dict().items()}, hidden(
        model, model_inputs(model)
    )


def _kill_save(d: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    code = CHILD.format(spec=SPEC_NEW)
    proc = subprocess.run(
        [sys.executable, "-c", code, mode, str(d)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def test_kill_mid_save_leaves_old_adapter_intact(tmp_path: Path) -> None:
    """A real SIGKILL while adapter.safetensors is half written: the old adapter loads, unchanged."""
    from conftest import build_model, hidden, model_inputs

    import tensadapt as ta

    d = tmp_path / "adapter"
    old_state, old_out = _old_adapter(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    _kill_save(d, "mid-write")
    leftovers = [p.name for p in d.iterdir() if p.name not in before]
    assert all(n.startswith(".adapter.safetensors.") and n.endswith(".tmp") for n in leftovers)
    assert leftovers, "the kill should have left the half-written temporary file"
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in before} == before
    model = ta.load_adapter(build_model("tiny-bert"), d)
    state = get_adapter(model).state_dict()
    assert all(torch.equal(state[k], old_state[k]) for k in old_state)
    torch.testing.assert_close(hidden(model, model_inputs(model)), old_out)


def test_kill_after_tensors_committed_loads_new_adapter_consistently(tmp_path: Path) -> None:
    """Killed after adapter.safetensors was renamed into place but before adapter_config.json:
    the tensors file carries the committed config, so the directory loads the *new* adapter,
    whole (not new tensors under the old spec's alpha)."""
    from conftest import build_model

    import tensadapt as ta

    d = tmp_path / "adapter"
    _old_adapter(d)
    _kill_save(d, "after-commit")
    assert '"rank": 4' in (d / "adapter_config.json").read_text()  # still the old readable copy
    with pytest.warns(UserWarning, match="differs from the config committed inside"):
        model = ta.load_adapter(build_model("tiny-bert"), d)
    assert get_adapter(model).plan.spec.rank == 64 and get_adapter(model).plan.spec.alpha == 16


def test_writer_error_mid_save_keeps_old_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that fails after a partial write (disk full): the error propagates, the old
    adapter is untouched, and no temporary file is left behind."""
    from conftest import build_model, randomize

    import tensadapt as ta
    import tensadapt.io as tio

    d = tmp_path / "adapter"
    old_state, _ = _old_adapter(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def disk_full(
        state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
    ) -> None:
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tio, "save_file", disk_full)
    model = build_model("tiny-bert")
    ta.inject(model, SPEC_NEW)
    randomize(model, seed=5)
    with pytest.raises(OSError, match="disk full.*previous file is intact"):
        ta.save_adapter(model, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    monkeypatch.undo()
    loaded = ta.load_adapter(build_model("tiny-bert"), d)
    assert all(torch.equal(get_adapter(loaded).state_dict()[k], v) for k, v in old_state.items())
