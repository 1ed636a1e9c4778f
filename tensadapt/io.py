"""Save and load adapters: ``adapter.safetensors`` + ``spec.yaml`` + ``plan.json``. No pickle.

Files are written to a temporary name in the target directory and renamed into place, so a crash
mid-save leaves the previous adapter intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import AdapterMismatchError
from .inject import get_adapter, inject
from .nn import factor_items
from .planner import FORMAT_VERSION
from .spec import load_spec, spec_to_yaml

ADAPTER_FILE = "adapter.safetensors"
SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.json"
SAVED_PREFIX = "modules_to_save."


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` (same directory)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(path, w)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a saved adapter holds: every factor, plus ``modules_to_save`` parameters."""
    ad = get_adapter(model)
    state = {f"{t}.{f}": p.detach().contiguous().cpu() for t, f, p in factor_items(ad)}
    for want in ad.plan.spec.modules_to_save:
        for n, m in model.named_modules():
            if n == want or n.endswith("." + want):
                for pn, p in m.named_parameters():
                    state[f"{SAVED_PREFIX}{n}.{pn}"] = p.detach().contiguous().cpu()
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the model's adapter to ``directory`` (created if needed).

    Returns:
        the directory path.
    """
    ad = get_adapter(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plan_d = ad.plan.to_dict()
    meta = {"format_version": str(FORMAT_VERSION), "tensadapt": "adapter"}
    state = adapter_state(model)
    atomic_write(out / ADAPTER_FILE, lambda tmp: save_file(state, tmp, metadata=meta))
    _write_text(out / SPEC_FILE, spec_to_yaml(ad.plan.spec))
    _write_text(out / PLAN_FILE, json.dumps(plan_d, indent=2))
    return out


def read_plan_file(directory: Path) -> dict[str, Any]:
    path = directory / PLAN_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterMismatchError(
            f"{directory}: not a tensadapt adapter directory (no {PLAN_FILE})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterMismatchError(f"{path}: corrupted plan file ({e})") from None
    if not isinstance(d, dict):
        raise AdapterMismatchError(f"{path}: corrupted plan file (not a JSON object)")
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{path}: adapter format version {version!r} is newer than this tensadapt supports "
            f"({FORMAT_VERSION}); upgrade tensadapt"
        )
    return d


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a saved adapter on ``model`` (the same base model it was trained on).

    Raises:
        AdapterMismatchError: the directory is not an adapter, a file is truncated or corrupted, the
            format is newer, or the model differs (sizes, layers, heads, targets); the message
            names the mismatch.
    """
    from .arch import from_model

    d = Path(directory)
    if not d.is_dir():
        raise AdapterMismatchError(f"{d}: adapter directory not found")
    saved_plan = read_plan_file(d)
    spec = load_spec(d / SPEC_FILE)
    have = from_model(model).fingerprint()
    want = saved_plan.get("architecture", {})
    diffs = [
        f"{k}: adapter {want.get(k)!r} vs model {have[k]!r}" for k in have if want.get(k) != have[k]
    ]
    if diffs:
        raise AdapterMismatchError(f"{d}: adapter was made for another model: " + "; ".join(diffs))
    try:
        state = load_file(str(d / ADAPTER_FILE))
    except FileNotFoundError:
        raise AdapterMismatchError(f"{d}: missing {ADAPTER_FILE}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterMismatchError(f"{d / ADAPTER_FILE}: truncated or corrupted ({e})") from None
    inject(model, spec)
    load_adapter_state(model, state, source=str(d / ADAPTER_FILE))
    return model


def load_adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "<state>"
) -> None:
    """Copy ``state`` into the model's factors (and modules_to_save), checking every name and shape."""
    ad = get_adapter(model)
    expected = {f"{t}.{f}": p for t, f, p in factor_items(ad)}  # type: ignore[operator]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise AdapterMismatchError(
            f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    saved_modules = dict(model.named_parameters())
    for k, v in state.items():
        if k.startswith(SAVED_PREFIX):
            name = k[len(SAVED_PREFIX) :]
            if name not in saved_modules:
                raise AdapterMismatchError(
                    f"{source}: model has no parameter {name!r} (modules_to_save)"
                )
            target = saved_modules[name]
        elif k in expected:
            target = expected[k]
        else:
            raise AdapterMismatchError(
                f"{source}: unexpected tensor {k!r}; the adapter's plan differs"
            )
        if tuple(target.shape) != tuple(v.shape):
            raise AdapterMismatchError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(v.to(target.dtype))
