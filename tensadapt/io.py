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
from .model import get_adapter, inject
from .nn import factor_items
from .planner import FORMAT_VERSION
from .spec import load_spec, spec_to_yaml

ADAPTER_FILE = "adapter.safetensors"
SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.json"
SAVED_PREFIX = "modules_to_save."
#: plan.json key recording the residual kind, init and checksums of a residual/NF4 adapter
RESIDUAL_KEY = "residual"


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
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
    # which head the adapter was trained with, so `tensadapt export` can rebuild the same model
    plan_d["model_class"] = type(model).__name__
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(num_labels, int):
        plan_d["num_labels"] = num_labels
    if ad.init_report is not None:  # pretrained init / residual / NF4 base: how to rebuild it
        rep = ad.init_report
        plan_d[RESIDUAL_KEY] = {
            "init": rep.init,
            "residual": rep.residual,
            "base": rep.base,
            "rebuilt_from": "base model weights, deterministically (tensadapt.init.initialize)",
            "checksums": rep.checksums(),
        }
    # the spec travels inside adapter.safetensors too: that file is the commit point of a save
    # (written first, renamed atomically), so a crash before spec.yaml is rewritten cannot pair
    # new tensors with an old spec
    meta = {
        "format_version": str(FORMAT_VERSION),
        "tensadapt": "adapter",
        "spec": spec_to_yaml(ad.plan.spec),
    }
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
    from .planner import plan as make_plan

    d = Path(directory)
    if d.is_file():
        raise AdapterMismatchError(f"{d}: is a file, not an adapter directory")
    if not d.is_dir():
        raise AdapterMismatchError(f"{d}: adapter directory not found")
    saved_plan = read_plan_file(d)
    if not (d / SPEC_FILE).is_file():
        raise AdapterMismatchError(f"{d}: not a complete tensadapt adapter (no {SPEC_FILE})")
    spec = load_spec(d / SPEC_FILE)
    have = from_model(model).fingerprint()
    want = saved_plan.get("architecture", {})
    diffs = [
        f"{k}: adapter {want.get(k)!r} vs model {have[k]!r}" for k in have if want.get(k) != have[k]
    ]
    if diffs:
        raise AdapterMismatchError(f"{d}: adapter was made for another model: " + "; ".join(diffs))
    state, meta = _read_tensors(d / ADAPTER_FILE)
    if meta.get("spec") and meta["spec"] != spec_to_yaml(spec):
        # adapter.safetensors is the commit point of a save: trust its own copy of the spec
        import warnings

        warnings.warn(
            f"{d / SPEC_FILE} differs from the spec saved inside {ADAPTER_FILE} (an interrupted "
            "save, or a hand edit); using the one inside the tensors file",
            stacklevel=2,
        )
        spec = load_spec(meta["spec"], source_name=f"{d / ADAPTER_FILE} (embedded spec)")
    new_plan = make_plan(spec, model)
    _check_targets(saved_plan, new_plan.to_dict(), str(d / PLAN_FILE))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, new_plan)
    try:
        saved_res = saved_plan.get(RESIDUAL_KEY)
        report = get_adapter(model).init_report
        if isinstance(saved_res, dict) and report is not None:
            from .init import check_checksums

            problems = check_checksums(report, saved_res.get("checksums", {}), str(d / PLAN_FILE))
            if problems:
                raise AdapterMismatchError("; ".join(problems))
        load_adapter_state(model, state, source=str(d / ADAPTER_FILE))
    except BaseException:
        _rollback(model, flags)
        raise
    return model


def _rollback(model: nn.Module, flags: dict[str, bool]) -> None:
    """Undo a failed load: the factors still hold their init, so merging them back and unwrapping
    gives the base model again (exactly for a zero init; to float rounding for a frozen residual,
    to the NF4 error for an NF4 one); the parameters' ``requires_grad`` flags are restored."""
    from .model import merge_and_unload

    merge_and_unload(model)
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an ``adapter.safetensors``, with clear errors."""
    from safetensors import safe_open

    if not path.is_file():
        raise AdapterMismatchError(f"{path.parent}: missing {path.name}")
    try:
        with safe_open(str(path), framework="pt") as fh:  # type: ignore[no-untyped-call]
            meta = dict(fh.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = path.stat().st_size
        raise AdapterMismatchError(
            f"{path}: truncated or corrupted safetensors file ({size} bytes): {e}"
        ) from None
    version = meta.get("format_version")
    if meta.get("tensadapt") != "adapter":
        raise AdapterMismatchError(f"{path}: not a tensadapt adapter file (no tensadapt metadata)")
    if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
        raise AdapterMismatchError(
            f"{path}: adapter format version {version!r} is newer than this tensadapt supports "
            f"({FORMAT_VERSION}); upgrade tensadapt"
        )
    return state, meta


def _check_targets(saved: dict[str, Any], new: dict[str, Any], source: str) -> None:
    """Every saved target must exist in the model's plan with the same widths and tensor."""

    def table(p: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
        rows = p.get("targets") or []
        return {
            f"{t.get('proj')}.{t.get('layer')}": (
                t.get("in_features"),
                t.get("out_features"),
                t.get("tensor"),
            )
            for t in rows
            if isinstance(t, dict)
        }

    old, cur = table(saved), table(new)
    if not old:
        return
    problems = [f"target {k} not in this model" for k in old if k not in cur]
    problems += [f"target {k} is adapted here but not in the adapter" for k in cur if k not in old]
    problems += [
        f"target {k}: adapter {old[k][0]}x{old[k][1]} vs model {cur[k][0]}x{cur[k][1]}"
        for k in old
        if k in cur and old[k][:2] != cur[k][:2]
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else "")
        raise AdapterMismatchError(f"{source}: adapter targets differ from this model's: {shown}")


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
    copies: list[tuple[nn.Parameter, torch.Tensor]] = []
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
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise AdapterMismatchError(
                f"{source}: tensor {k!r} holds NaN or inf values (corrupted, or saved after "
                "training diverged)"
            )
        copies.append((target, v))
    with torch.no_grad():  # copy only once every tensor passed: a bad file changes nothing
        for dst, v in copies:
            dst.copy_(v.to(dst.dtype))
