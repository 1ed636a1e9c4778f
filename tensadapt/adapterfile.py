"""An adapter directory on disk: its files, its config, and reading both back within limits,
checked. Nothing here touches a model (saving an adapter and loading one onto a model is
:mod:`tensadapt.io`).

A directory holds :data:`ADAPTER_FILE` (``adapter.safetensors``: the tensors, keyed
``<tensor>.<factor>`` and ``modules_to_save.<module path>.<parameter>``, with the config and its
SHA-256 in the metadata, the commit point of a save) and :data:`CONFIG_FILE`
(``adapter_config.json``: a readable copy of the config). The config (:class:`AdapterConfig`)
records the spec once (the plan is re-made on load), the base model it was trained on
(``base_model_name_or_path``, the architecture fingerprint, the model class and label count), and
the shape, dtype and SHA-256 of every tensor (:class:`TensorRecord`).

Reading bounds everything before it reads it: regular files only, at most :data:`MAX_JSON_BYTES` of
JSON, no format version newer than :data:`FORMAT_VERSION`. :func:`read_committed` gives the
committed config (its checksum checked; a readable copy that differs, from a crash between a save's
two renames or a hand edit, is warned about and ignored), :func:`parse_config` validates it, and
:func:`check_records` checks every tensor against its record (same names, shapes, dtypes and
checksums). Directories written by tensadapt 0.1 (``spec.yaml`` + ``plan.json``, format version 1,
no checksums) still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import AdapterMismatchError
from .inplace import DEFAULT_ADAPTER
from .spec import load_spec

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
LOCK_FILE = ".tensadapt-save.lock"
#: tensadapt 0.1's files (still read)
SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.json"
SAVED_PREFIX = "modules_to_save."
FORMAT = "tensadapt-adapter"
FORMAT_VERSION = 2
#: the largest JSON file a load reads
MAX_JSON_BYTES = 16 * 2**20
#: the largest label count a config may ask a head to have
MAX_LABELS = 100_000


# -- the config ----------------------------------------------------------------------------------
class TensorRecord(BaseModel):
    """What the config records of one tensor."""

    model_config = ConfigDict(extra="forbid", strict=True)
    shape: list[int]
    dtype: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AdapterConfig(BaseModel):
    """``adapter_config.json``: everything needed to rebuild and check an adapter."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: str = FORMAT
    format_version: int = Field(FORMAT_VERSION, ge=1)
    tensadapt_version: str = ""
    adapter_name: str = DEFAULT_ADAPTER
    base_model_name_or_path: str = ""
    spec: dict[str, Any]
    architecture: dict[str, Any]
    model_class: str | None = None
    num_labels: int | None = Field(None, ge=1, le=MAX_LABELS)
    n_params: int = Field(ge=0)
    targets: dict[str, list[Any]] = Field(default_factory=dict)
    residual: dict[str, Any] | None = None
    tensors: dict[str, TensorRecord]


def _config_error(err: ValidationError, source: str) -> AdapterMismatchError:
    first = err.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "<config>"
    return AdapterMismatchError(
        f"{source}: corrupted adapter config: {where}: {first['msg']} "
        f"(got {str(first.get('input'))[:60]!r})"
    )


def parse_config(raw: Mapping[str, Any], source: str) -> AdapterConfig:
    """A committed config (:func:`read_committed`) as an :class:`AdapterConfig`, its format and
    version checked.

    Raises:
        AdapterMismatchError: a field is missing or wrong, another format, or a newer version.
    """
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as err:
        raise _config_error(err, source) from None
    if config.format != FORMAT:
        raise AdapterMismatchError(f"{source}: not a tensadapt adapter (format {config.format!r})")
    if config.format_version > FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{source}: adapter format version {config.format_version} is newer than this "
            f"tensadapt supports ({FORMAT_VERSION}); upgrade tensadapt"
        )
    return config


def sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (contiguous, on the CPU)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


# -- reading -------------------------------------------------------------------------------------
def _regular(path: Path, what: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AdapterMismatchError(f"{path.parent}: missing {path.name} ({what})") from None
    if not stat.S_ISREG(st.st_mode):
        raise AdapterMismatchError(f"{path}: not a regular file ({what})")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    _regular(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise AdapterMismatchError(
            f"{path}: {path.stat().st_size:,} bytes, more than the {MAX_JSON_BYTES:,} a {what} "
            "may have"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterMismatchError(f"{path}: corrupted {what} ({str(e)[:120]})") from None
    if not isinstance(d, dict):
        raise AdapterMismatchError(f"{path}: corrupted {what} (not a JSON object)")
    return d


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an ``adapter.safetensors``, with clear errors."""
    from safetensors import safe_open

    _regular(path, "the adapter's tensors")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = path.stat().st_size
        raise AdapterMismatchError(
            f"{path}: truncated or corrupted safetensors file ({size} bytes): {e}"
        ) from None
    if meta.get("tensadapt") != "adapter":
        raise AdapterMismatchError(f"{path}: not a tensadapt adapter file (no tensadapt metadata)")
    version = meta.get("format_version")
    if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
        raise AdapterMismatchError(
            f"{path}: adapter format version {version!r} is newer than this tensadapt supports "
            f"({FORMAT_VERSION}); upgrade tensadapt"
        )
    return state, meta


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The committed config of an adapter directory (the copy inside ``adapter.safetensors``;
    a 0.1 directory's ``plan.json``), as a dict. Used by ``tensadapt export`` to rebuild the
    base model with the head the adapter was trained with."""
    return read_committed(check_dir(Path(directory)))[0]


def check_dir(d: Path) -> Path:
    if d.is_file():
        raise AdapterMismatchError(f"{d}: is a file, not an adapter directory")
    if not d.is_dir():
        raise AdapterMismatchError(f"{d}: adapter directory not found")
    have = [n for n in (ADAPTER_FILE, CONFIG_FILE, PLAN_FILE) if os.path.lexists(d / n)]
    if not have:
        raise AdapterMismatchError(
            f"{d}: not a tensadapt adapter directory (no {ADAPTER_FILE} or {CONFIG_FILE})"
        )
    if CONFIG_FILE in have and ADAPTER_FILE not in have:
        _regular(d / ADAPTER_FILE, "the adapter's tensors")
    return d


def read_committed(d: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """``(config, tensors)`` of a directory: v2 from the tensors file's metadata; v1 from
    ``plan.json`` + ``spec.yaml`` (tensors ``None``: read later)."""
    if os.path.lexists(d / ADAPTER_FILE):
        state, meta = read_tensors(d / ADAPTER_FILE)
        text = meta.get("config")
        if text is not None:
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if meta.get("config_sha256") != digest:
                raise AdapterMismatchError(
                    f"{d / ADAPTER_FILE}: the committed config fails its checksum (the file was "
                    "corrupted or edited after saving)"
                )
            try:
                config = json.loads(text)
            except json.JSONDecodeError as e:
                raise AdapterMismatchError(f"{d / ADAPTER_FILE}: corrupted config ({e})") from None
            _compare_readable_copy(d, text)
            return config, state
        return _legacy_config(d, meta), state
    return _legacy_config(d, {}), None


def _compare_readable_copy(d: Path, committed: str) -> None:
    path = d / CONFIG_FILE
    if not path.exists():
        return
    try:
        readable = json.loads(path.read_text(encoding="utf-8")) if _small(path) else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        readable = None
    if readable != json.loads(committed):
        warnings.warn(
            f"{path} differs from the config committed inside {ADAPTER_FILE} (an interrupted "
            "save, or a hand edit); using the committed one",
            stacklevel=4,
        )


def _small(path: Path) -> bool:
    st = path.stat()
    return stat.S_ISREG(st.st_mode) and st.st_size <= MAX_JSON_BYTES


def _legacy_config(d: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    """A tensadapt 0.1 directory's config: ``plan.json`` + the spec (no checksums)."""
    saved = _read_json(d / PLAN_FILE, "plan file")
    version = saved.get("format_version")
    if not isinstance(version, int) or version > 1:
        raise AdapterMismatchError(
            f"{d / PLAN_FILE}: adapter format version {version!r} is newer than this tensadapt "
            f"supports; upgrade tensadapt"
        )
    if meta.get("spec"):
        spec = load_spec(meta["spec"], source_name=f"{d / ADAPTER_FILE} (embedded spec)")
    elif (d / SPEC_FILE).is_file():
        spec = load_spec(d / SPEC_FILE)
    elif isinstance(saved.get("spec"), dict):
        spec = load_spec(saved["spec"], source_name=f"{d / PLAN_FILE} (spec)")
    else:
        raise AdapterMismatchError(f"{d}: not a complete tensadapt adapter (no {SPEC_FILE})")
    targets = {
        f"{t.get('proj')}.{t.get('layer')}": [
            t.get("in_features"),
            t.get("out_features"),
            t.get("tensor"),
        ]
        for t in saved.get("targets") or []
        if isinstance(t, dict)
    }
    return {
        "format": FORMAT,
        "format_version": 1,
        "spec": spec.to_dict(),
        "architecture": saved.get("architecture") or {},
        "model_class": saved.get("model_class"),
        "num_labels": saved.get("num_labels"),
        "n_params": int(saved.get("n_params") or 0),
        "targets": targets,
        "residual": saved.get("residual"),
        "tensors": {},
    }


def check_records(
    state: Mapping[str, torch.Tensor], records: Mapping[str, TensorRecord], source: str
) -> None:
    """Every tensor matches its record (a v2 adapter): same set, shape, dtype and checksum."""
    if not records:
        return
    extra = sorted(set(state) - set(records))
    if extra:
        raise AdapterMismatchError(
            f"{source}: tensor {extra[0]!r} is not recorded in the adapter's config (added or "
            "renamed after saving)"
        )
    missing = sorted(set(records) - set(state))
    if missing:
        raise AdapterMismatchError(f"{source}: missing tensors {missing[:5]}")
    for k, rec in records.items():
        v = state[k]
        if list(v.shape) != rec.shape or str(v.dtype).removeprefix("torch.") != rec.dtype:
            raise AdapterMismatchError(
                f"{source}: tensor {k!r} is {str(v.dtype).removeprefix('torch.')}{list(v.shape)}, "
                f"its record says {rec.dtype}{rec.shape}"
            )
        if sha256(v) != rec.sha256:
            raise AdapterMismatchError(
                f"{source}: tensor {k!r} fails its checksum (the file was corrupted or edited "
                "after saving)"
            )


__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "MAX_JSON_BYTES",
    "MAX_LABELS",
    "PLAN_FILE",
    "SAVED_PREFIX",
    "SPEC_FILE",
    "AdapterConfig",
    "TensorRecord",
    "check_dir",
    "check_records",
    "parse_config",
    "read_committed",
    "read_config",
    "read_tensors",
    "sha256",
]
