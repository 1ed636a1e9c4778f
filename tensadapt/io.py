"""Save and load adapters: ``adapter_config.json`` + ``adapter.safetensors``. No pickle.

What the directory holds, and reading it back within limits, is :mod:`tensadapt.adapterfile` (its
public names are re-exported here). A save is all-or-nothing:

- ``adapter.safetensors`` carries the config in its metadata and is the *commit point*: it is
  written to a temporary file, flushed, and renamed over the old one, so at every instant the
  directory holds exactly the old adapter or exactly the new one (the readable
  ``adapter_config.json`` is renamed into place right after; a load that finds it stale — a crash
  between the two renames — uses the committed copy and says so).
- Saves to one directory are serialised by an exclusive lock (``.tensadapt-save.lock``), so concurrent
  saves never mix files; under that lock a save first removes temporary files that killed saves
  left behind.
- A failed write (disk full, a kill) leaves the previous adapter untouched; files are created with
  the permissions the umask gives.

A load checks the directory (bounded reads; every tensor against the config: names, shapes, dtypes,
checksums) and the model (architecture fingerprint, targets and their widths) before touching the
model, accepts only the spec's factors and listed ``modules_to_save`` with finite values, and rolls
the model back if anything fails. :func:`load_base_model` rebuilds the base model an adapter was
trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .adapterfile import (
    ADAPTER_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    LOCK_FILE,
    MAX_LABELS,
    PLAN_FILE,
    SAVED_PREFIX,
    SPEC_FILE,
    AdapterConfig,
    TensorRecord,
    check_dir,
    check_records,
    parse_config,
    read_committed,
    read_config,
    read_tensors,
    sha256,
)
from .atomic import AdapterSaveError, atomic_write, clean_temp_files, fsync_dir, locked, write_text
from .errors import AdapterMismatchError
from .inplace import DEFAULT_ADAPTER, attach, hub_of, saved_modules, unwrapped
from .nn import TensorAdapter, factor_items
from .spec import load_spec


# -- writing -------------------------------------------------------------------------------------
def adapter_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors a saved adapter holds: every factor, plus its ``modules_to_save`` copies.

    Keys: ``<tensor>.<factor>`` and ``modules_to_save.<module path>.<parameter>``.
    """
    from .inplace import get_adapter

    ad = get_adapter(model, adapter_name)
    hub = hub_of(unwrapped(model))
    assert hub is not None
    name = adapter_name or hub.active or DEFAULT_ADAPTER
    state = {f"{t}.{f}": p.detach().contiguous().cpu() for t, f, p in factor_items(ad)}
    for path, sm in saved_modules(unwrapped(model)):
        if name in sm.copies:
            for pn, p in sm.copies[name].named_parameters():
                state[f"{SAVED_PREFIX}{path}.{pn}"] = p.detach().contiguous().cpu()
    return state


def save_adapter(
    model: nn.Module, directory: str | os.PathLike[str], adapter_name: str | None = None
) -> Path:
    """Write an adapter of ``model`` (default: the active one) to ``directory`` (created if
    needed), all-or-nothing (see the module docstring).

    Returns:
        the directory path.
    Raises:
        AdapterSaveError: the directory cannot be written (the previous adapter stays intact).
    """
    from . import __version__
    from .inplace import get_adapter

    base = unwrapped(model)
    ad = get_adapter(base, adapter_name)
    hub = hub_of(base)
    assert hub is not None
    name = adapter_name or hub.active or DEFAULT_ADAPTER
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise AdapterSaveError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdapterSaveError(f"{out}: cannot create the directory ({exc.strerror})") from exc
    state = adapter_state(base, name)
    config = AdapterConfig(
        format_version=FORMAT_VERSION,
        tensadapt_version=__version__,
        adapter_name=name,
        base_model_name_or_path=str(
            getattr(getattr(base, "config", None), "_name_or_path", "") or ""
        ),
        spec=ad.plan.spec.to_dict(),
        architecture=dict(ad.plan.architecture),
        model_class=type(base).__name__,
        num_labels=_num_labels(base),
        n_params=ad.plan.n_params,
        targets={t.key: [t.in_features, t.out_features, t.tensor] for t in ad.plan.targets},
        residual=_residual_record(ad),
        tensors={
            k: TensorRecord(
                shape=list(v.shape), dtype=str(v.dtype).removeprefix("torch."), sha256=sha256(v)
            )
            for k, v in state.items()
        },
    )
    text = config.model_dump_json(indent=2)
    meta = {
        "tensadapt": "adapter",
        "format_version": str(FORMAT_VERSION),
        "config": text,
        "config_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    with locked(out, LOCK_FILE):
        clean_temp_files(out, (ADAPTER_FILE, CONFIG_FILE, SPEC_FILE, PLAN_FILE))
        atomic_write(out / ADAPTER_FILE, lambda tmp: save_file(state, tmp, metadata=meta))
        write_text(out / CONFIG_FILE, text)
        for old in (SPEC_FILE, PLAN_FILE):  # a 0.1 adapter saved over
            with contextlib.suppress(FileNotFoundError):
                (out / old).unlink()
        fsync_dir(out)
    return out


def _num_labels(model: nn.Module) -> int | None:
    n = getattr(getattr(model, "config", None), "num_labels", None)
    return n if isinstance(n, int) and 1 <= n <= MAX_LABELS else None


def _residual_record(ad: TensorAdapter) -> dict[str, Any] | None:
    rep = ad.init_report
    if rep is None:
        return None
    return {
        "init": rep.init,
        "residual": rep.residual,
        "base": rep.base,
        "rebuilt_from": "base model weights, deterministically (tensadapt.init.initialize)",
        "checksums": rep.checksums(),
    }


# -- loading -------------------------------------------------------------------------------------
def load_adapter(
    model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER
) -> nn.Module:
    """Rebuild a saved adapter on ``model`` (the same base model it was trained on).

    Raises:
        AdapterMismatchError: the directory is not an adapter, a file is truncated, corrupted or
            tampered with (checksums), the format is newer, the model differs (sizes, layers,
            heads, targets), or a tensor is not one the spec declares; the message names the
            mismatch. The model is left as it was.
    """
    from .planner import plan as make_plan

    base = unwrapped(model)
    d = check_dir(Path(directory))
    raw, state = read_committed(d)
    source = str(d / ADAPTER_FILE)
    config = parse_config(raw, source)
    spec = load_spec(config.spec, source_name=f"{source} (spec)")
    from .arch import from_model

    have = from_model(base).fingerprint()
    want = config.architecture
    diffs = [
        f"{k}: adapter {want.get(k)!r} vs model {have[k]!r}" for k in have if want.get(k) != have[k]
    ]
    if diffs:
        raise AdapterMismatchError(f"{d}: adapter was made for another model: " + "; ".join(diffs))
    if state is None:
        state, _ = read_tensors(d / ADAPTER_FILE)
    new_plan = make_plan(spec, base)
    _check_targets(
        config.targets,
        {t.key: [t.in_features, t.out_features, t.tensor] for t in new_plan.targets},
        source,
    )
    check_records(state, config.tensors, source)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    hub_before = hub_of(base)
    had_hub = hub_before is not None
    active = hub_before.active if hub_before is not None else None
    adapter = attach(base, new_plan, adapter_name, detect_new_modules=False)
    try:
        saved_res = config.residual
        report = adapter.init_report
        if isinstance(saved_res, dict) and report is not None:
            from .init import check_checksums

            problems = check_checksums(report, saved_res.get("checksums", {}), source)
            if problems:
                raise AdapterMismatchError("; ".join(problems))
        load_adapter_state(base, state, source=source, adapter_name=adapter_name)
    except BaseException:
        _rollback(base, adapter_name, had_hub, active, flags)
        raise
    return model


def _rollback(
    model: nn.Module, name: str, had_hub: bool, active: str | None, flags: dict[str, bool]
) -> None:
    """Undo a failed load: take the new adapter off (a pretrained init's residual is merged
    back first, giving the base weights to float rounding / the NF4 error); restore
    ``requires_grad`` and the active adapter."""
    from .inplace import _remove, merge_and_unload

    hub = hub_of(model)
    if hub is None:
        return
    if not had_hub:
        hub.active = name
        merge_and_unload(model, keep_trained_copies=False)
    else:
        _remove(model, hub, name)
        hub.active = active
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _check_targets(old: Mapping[str, list[Any]], cur: Mapping[str, list[Any]], source: str) -> None:
    """Every saved target must exist in the model's plan with the same widths."""
    if not old:
        return
    problems = [f"target {k} not in this model" for k in old if k not in cur]
    problems += [f"target {k} is adapted here but not in the adapter" for k in cur if k not in old]
    problems += [
        f"target {k}: adapter {old[k][0]}x{old[k][1]} vs model {cur[k][0]}x{cur[k][1]}"
        for k in old
        if k in cur and list(old[k][:2]) != list(cur[k][:2])
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else "")
        raise AdapterMismatchError(f"{source}: adapter targets differ from this model's: {shown}")


def load_adapter_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str = "<state>",
    adapter_name: str | None = None,
) -> None:
    """Copy ``state`` into an adapter's factors and ``modules_to_save`` copies, checking every
    name and shape first: only the spec's factors and its listed modules are accepted."""
    from .inplace import get_adapter

    base = unwrapped(model)
    ad = get_adapter(base, adapter_name)
    hub = hub_of(base)
    assert hub is not None
    name = adapter_name or hub.active or DEFAULT_ADAPTER
    expected: dict[str, torch.Tensor] = {f"{t}.{f}": p for t, f, p in factor_items(ad)}
    for path, sm in saved_modules(base):
        if name in sm.copies:
            for pn, p in sm.copies[name].named_parameters():
                expected[f"{SAVED_PREFIX}{path}.{pn}"] = p
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(SAVED_PREFIX))
    if missing:
        raise AdapterMismatchError(
            f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, v in state.items():
        target = expected.get(k)
        if target is None:
            what = (
                "a module the spec's modules_to_save does not list"
                if k.startswith(SAVED_PREFIX)
                else "the adapter's plan differs"
            )
            raise AdapterMismatchError(f"{source}: unexpected tensor {k!r} ({what})")
        if tuple(target.shape) != tuple(v.shape):
            raise AdapterMismatchError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(target.shape)}"
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


def load_base_model(
    model: str | os.PathLike[str],
    directory: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    model_class: str | None = None,
    num_labels: int | None = None,
) -> nn.Module:
    """The base model an adapter was trained on, rebuilt.

    Args:
        model: a bundled preset name (built from its config with random weights drawn after
            ``torch.manual_seed(seed)``: only meaningful when training built it the same way) or a
            local model directory (weights loaded with ``from_pretrained``, never downloaded).
        directory: an adapter directory: its config gives ``model_class`` and ``num_labels``
            unless they are passed.
        seed: the seed for a preset's random weights.
        model_class: a ``transformers`` class name, e.g. ``AutoModelForSequenceClassification``
            or ``BertForSequenceClassification``; default: the adapter's, else the config's
            ``architectures[0]`` for a local directory, ``AutoModel`` for a preset.
        num_labels: size of a classification head.
    Returns:
        the model, in eval mode.
    Raises:
        AdapterMismatchError: unknown class, or the weights cannot be loaded.
        ArchitectureError: neither a preset nor a local model directory.
    """
    import transformers

    from .arch import PRESETS, load_config

    model = str(model)
    if directory is not None:
        saved = read_config(directory)
        if model_class is None:
            model_class = saved.get("model_class")
            num_labels = num_labels if num_labels is not None else saved.get("num_labels")
    config = load_config(model)
    if isinstance(num_labels, int) and 1 <= num_labels <= MAX_LABELS:
        config.num_labels = num_labels
    is_preset = model in PRESETS and not Path(model).exists()
    name = model_class or (
        "AutoModel" if is_preset else ((getattr(config, "architectures", None) or ["AutoModel"])[0])
    )
    cls: Any = getattr(transformers, str(name), None)
    if cls is None or not isinstance(cls, type):
        raise AdapterMismatchError(
            f"model class: transformers has no class {name!r} (e.g. AutoModel, "
            "AutoModelForSequenceClassification, AutoModelForCausalLM)"
        )
    try:
        if is_preset or not any(Path(model).glob("*.safetensors")):
            if not is_preset:
                raise AdapterMismatchError(
                    f"{model}: no *.safetensors weights in this directory; give the directory of "
                    "the base model the adapter was trained on"
                )
            torch.manual_seed(seed)
            built = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        else:
            built = getattr(cls, "from_pretrained")(model, config=config, local_files_only=True)  # noqa: B009
    except AdapterMismatchError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise AdapterMismatchError(f"cannot build {name} from {model!r}: {exc}") from exc
    return built.eval()


__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "AdapterConfig",
    "AdapterSaveError",
    "adapter_state",
    "atomic_write",
    "check_dir",
    "check_records",
    "load_adapter",
    "load_adapter_state",
    "load_base_model",
    "read_committed",
    "read_config",
    "save_adapter",
    "sha256",
]
