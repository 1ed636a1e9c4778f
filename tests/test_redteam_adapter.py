"""A standing red team against adapter directories (issue 12): hypothesis damages a saved
adapter -- bit flips anywhere in the tensors file, truncation, appended bytes, extra, dropped,
renamed or retyped tensors, wrong-typed or hostile config fields -- and every load must end in a
named error or in exactly the saved adapter: never another exception, never a silent change."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tensadapt as ta
from tensadapt.errors import TensadaptError
from tensadapt.io import ADAPTER_FILE, CONFIG_FILE, adapter_state

SPEC = {"factorization": "tucker", "modes": ["qkv", "depth"], "targets": ["q", "k", "v"], "rank": 3}
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = build_model("tiny-bert")
    ta.inject(model, SPEC, seed=0)
    randomize(model)
    d = ta.save_adapter(model, tmp_path_factory.mktemp("red") / "ad")
    return d, {k: v.clone() for k, v in adapter_state(model).items()}


def _attempt(d: Path, want: dict[str, torch.Tensor]) -> str:
    """Load ``d``: a named error, or exactly ``want``. Returns what happened."""
    model = build_model("tiny-bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ta.load_adapter(model, d)
    except TensadaptError:
        after = dict(model.named_parameters())  # a refused load changes nothing
        assert set(after) == set(before)
        assert all(torch.equal(p, before[n]) for n, p in after.items())
        return "refused"
    got = adapter_state(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (
        "a damaged adapter loaded with different values"
    )
    return "loaded intact"


def _copy(src: Path, tmp: Path, n: int) -> Path:
    d = tmp / f"case{n}"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(src, d)
    return d


COUNTER = iter(range(10**9))


@SETTINGS
@given(offsets=st.lists(st.integers(0, 10**7), min_size=1, max_size=3), bits=st.integers(0, 7))
def test_bit_flips_anywhere(original, tmp_path: Path, offsets: list[int], bits: int) -> None:
    src, want = original
    d = _copy(src, tmp_path, next(COUNTER))
    f = d / ADAPTER_FILE
    data = bytearray(f.read_bytes())
    for off in offsets:
        data[off % len(data)] ^= 1 << bits
    f.write_bytes(bytes(data))
    _attempt(d, want)


@SETTINGS
@given(cut=st.floats(0.0, 0.999), tail=st.binary(max_size=64))
def test_truncation_and_trailing_bytes(original, tmp_path: Path, cut: float, tail: bytes) -> None:
    src, want = original
    d = _copy(src, tmp_path, next(COUNTER))
    f = d / ADAPTER_FILE
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)] + tail)
    _attempt(d, want)


def _rewrite(d: Path, edit_state: Any = None, edit_config: Any = None) -> None:
    f = d / ADAPTER_FILE
    state = load_file(str(f))
    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata())
    config = json.loads(meta["config"])
    if edit_state is not None:
        edit_state(state)
    if edit_config is not None:
        edit_config(config)
    meta["config"] = json.dumps(config)
    meta["config_sha256"] = hashlib.sha256(meta["config"].encode()).hexdigest()
    save_file(state, str(f), metadata=meta)


tensor_edits = st.sampled_from(["drop", "rename", "extra", "retype", "reshape", "scale"])


@SETTINGS
@given(edit=tensor_edits, which=st.integers(0, 100))
def test_tensor_edits(original, tmp_path: Path, edit: str, which: int) -> None:
    src, want = original
    d = _copy(src, tmp_path, next(COUNTER))

    def apply(state: dict[str, torch.Tensor]) -> None:
        key = sorted(state)[which % len(state)]
        if edit == "drop":
            del state[key]
        elif edit == "rename":
            state[key + "_x"] = state.pop(key)
        elif edit == "extra":
            state["modules_to_save.embeddings.word_embeddings.weight"] = torch.zeros(1000, 32)
        elif edit == "retype":
            state[key] = state[key].double()
        elif edit == "reshape":
            state[key] = state[key].reshape(-1)
        else:
            state[key] = state[key] * 1.0001

    _rewrite(d, edit_state=apply)
    assert _attempt(d, want) == "refused"


hostile = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=20)
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)
fields = st.sampled_from(
    [
        "format",
        "format_version",
        "spec",
        "architecture",
        "model_class",
        "num_labels",
        "n_params",
        "targets",
        "residual",
        "tensors",
        "adapter_name",
    ]
)


@SETTINGS
@given(field=fields, value=hostile)
def test_config_fields_of_any_type(original, tmp_path: Path, field: str, value: Any) -> None:
    src, want = original
    d = _copy(src, tmp_path, next(COUNTER))
    _rewrite(d, edit_config=lambda c: c.__setitem__(field, value))
    _attempt(d, want)


@SETTINGS
@given(at=st.integers(0, 10**6), bit=st.integers(0, 6))
def test_bit_flips_in_the_committed_config(original, tmp_path: Path, at: int, bit: int) -> None:
    """A flipped bit in the config text (a rank, an alpha, a name) never loads silently."""
    src, want = original
    d = _copy(src, tmp_path, next(COUNTER))
    f = d / ADAPTER_FILE
    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata())
    text = bytearray(meta["config"].encode())
    text[at % len(text)] ^= 1 << bit
    meta["config"] = text.decode("utf-8", errors="replace")
    save_file(load_file(str(f)), str(f), metadata=meta)
    assert _attempt(d, want) in ("refused", "loaded intact")


@SETTINGS
@given(text=st.text(max_size=200))
def test_readable_config_garbage_is_only_reported(original, tmp_path: Path, text: str) -> None:
    """adapter_config.json is the readable copy: any damage to it is reported, and the committed
    config inside the tensors file still loads the adapter intact."""
    src, want = original
    d = _copy(src, tmp_path, next(COUNTER))
    (d / CONFIG_FILE).write_text(text)
    assert _attempt(d, want) == "loaded intact"
