"""Bad input, everywhere: every wrong file, model, directory or number gets a clear, specific error
(type and message part checked), and spec fuzzing never escapes ``SpecError``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT, build_model, randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tensadapt as ta
from tensadapt.cli import main
from tensadapt.errors import AdapterMismatchError, NonFiniteError, SpecError, TensadaptError
from tensadapt.io import ADAPTER_FILE, CONFIG_FILE, sha256
from tensadapt.model import get_adapter
from tensadapt.numerics import FiniteCheckCallback, check_finite
from tensadapt.spec import spec_to_yaml

SPECS = sorted((ROOT / "specs").glob("*.yaml"))
SPEC = {
    "factorization": "cp",
    "targets": ["q", "k", "v", "o"],
    "modes": ["heads", "qkv", "depth"],
    "rank": 4,
}


def bert(**overrides: Any) -> torch.nn.Module:
    """tiny-bert, optionally with other sizes."""
    from transformers import AutoModel

    from tensadapt.arch import preset_config

    cfg = preset_config("tiny-bert")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter directory (CP over heads, qkv, depth on tiny-bert)."""
    model = build_model("tiny-bert")
    ta.inject(model, SPEC)
    randomize(model)
    return ta.save_adapter(model, tmp_path_factory.mktemp("ad") / "adapter")


class CliFailed(Exception):
    """The CLI returned non-zero; carries its exit code and stderr."""

    def __init__(self, rc: int, err: str) -> None:
        super().__init__(f"exit {rc}: {err}")
        self.rc = rc


def cli(*argv: str) -> None:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(err):
        rc = main(list(argv))
    if rc != 0:
        assert rc == 2, f"user mistakes exit 2, got {rc}: {err.getvalue()}"
        raise CliFailed(rc, err.getvalue())


# -- how each bad input is made ---------------------------------------------------------------------


def _load(d: Path, model: torch.nn.Module | None = None) -> None:
    ta.load_adapter(model if model is not None else build_model("tiny-bert"), d)


def truncated(d: Path) -> None:
    f = d / ADAPTER_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _load(d)


def empty_file(d: Path) -> None:
    (d / ADAPTER_FILE).write_bytes(b"")
    _load(d)


def garbage_header(d: Path) -> None:
    f = d / ADAPTER_FILE
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00\xff" * 16  # the JSON header is now binary junk
    f.write_bytes(bytes(data))
    _load(d)


def header_length_lies(d: Path) -> None:
    f = d / ADAPTER_FILE
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**9) + data[8:])
    _load(d)


def nan_bytes(d: Path) -> None:
    """Flip the last tensor's data to all-ones bits (float32 NaN): a silent bit-rot case."""
    f = d / ADAPTER_FILE
    data = bytearray(f.read_bytes())
    data[-16:] = b"\xff" * 16
    f.write_bytes(bytes(data))
    _load(d)


def not_tensadapt_file(d: Path) -> None:
    state = load_file(str(d / ADAPTER_FILE))
    save_file(state, str(d / ADAPTER_FILE), metadata={"format": "pt"})  # e.g. a PEFT file
    _load(d)


def newer_tensor_format(d: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(d / ADAPTER_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
    save_file(
        load_file(str(d / ADAPTER_FILE)),
        str(d / ADAPTER_FILE),
        metadata={**meta, "format_version": "99"},
    )
    _load(d)


def recommit(d: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> None:
    """Rewrite adapter.safetensors with ``edit`` applied to its committed config and tensors
    (as a careful attacker would: the result is a well-formed safetensors file)."""
    from safetensors import safe_open

    state = load_file(str(d / ADAPTER_FILE))
    with safe_open(str(d / ADAPTER_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
    config = json.loads(meta["config"])
    edit(config, state)
    meta["config"] = json.dumps(config)
    meta["config_sha256"] = hashlib.sha256(meta["config"].encode()).hexdigest()
    save_file(state, str(d / ADAPTER_FILE), metadata=meta)
    (d / CONFIG_FILE).write_text(meta["config"])


def newer_config_format(d: Path) -> None:
    recommit(d, lambda c, s: c.update(format_version=99))
    _load(d)


def corrupted_config(d: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(d / ADAPTER_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta["config"] = '{"format_version": 2, "architec'
    meta["config_sha256"] = hashlib.sha256(meta["config"].encode()).hexdigest()
    save_file(load_file(str(d / ADAPTER_FILE)), str(d / ADAPTER_FILE), metadata=meta)
    _load(d)


def config_edited_unsigned(d: Path) -> None:
    """The committed config edited (alpha 1 -> 9) without its checksum: refused."""
    from safetensors import safe_open

    with safe_open(str(d / ADAPTER_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta["config"] = meta["config"].replace('"alpha": null', '"alpha": 9.0')
    save_file(load_file(str(d / ADAPTER_FILE)), str(d / ADAPTER_FILE), metadata=meta)
    _load(d)


def config_wrong_type(d: Path) -> None:
    recommit(d, lambda c, s: c.update(num_labels="3"))
    _load(d)


def config_huge_labels(d: Path) -> None:
    recommit(d, lambda c, s: c.update(num_labels=1_000_000_000))
    _load(d)


def added_tensor(d: Path) -> None:
    """A tensor the config does not record (added after saving)."""
    state = load_file(str(d / ADAPTER_FILE))
    from safetensors import safe_open

    with safe_open(str(d / ADAPTER_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
    state["modules_to_save.embeddings.word_embeddings.weight"] = torch.zeros(1000, 32)
    save_file(state, str(d / ADAPTER_FILE), metadata=meta)
    _load(d)


def undeclared_module(d: Path) -> None:
    """A consistently re-signed tensor for a module the spec does not save: refused, so it can
    never overwrite the base embeddings."""

    def edit(c: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        k = "modules_to_save.embeddings.word_embeddings.weight"
        state[k] = torch.zeros(1000, 32)
        c["tensors"][k] = {"shape": [1000, 32], "dtype": "float32", "sha256": sha256(state[k])}

    recommit(d, edit)
    _load(d)


def fifo_config(d: Path) -> None:
    """A FIFO where the tensors file should be: refused at once, never opened (would block)."""
    import os

    (d / ADAPTER_FILE).unlink()
    os.mkfifo(d / ADAPTER_FILE)
    _load(d)


def missing(name: str) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        (d / name).unlink()
        _load(d)

    run.__name__ = f"missing_{name}"
    return run


def a_file(d: Path) -> None:
    _load(d / ADAPTER_FILE)


def no_dir(d: Path) -> None:
    _load(d / "nope")


def wrong_shape(d: Path) -> None:
    state = load_file(str(d / ADAPTER_FILE))
    from safetensors import safe_open

    with safe_open(str(d / ADAPTER_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
    key = sorted(state)[0]
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    save_file(state, str(d / ADAPTER_FILE), metadata=meta)
    _load(d)


def other_model(**overrides: Any) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        _load(d, bert(**overrides))

    return run


def gpt2_model(d: Path) -> None:
    _load(d, build_model("tiny-gpt2"))


def other_targets(d: Path) -> None:
    """The config lists a target the model's plan lacks (an adapter made on another variant)."""

    def edit(c: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        first = next(iter(c["targets"].values()))
        c["targets"]["q.7"] = list(first)
        key = sorted(c["targets"])[1]
        c["targets"][key][0] = 48

    recommit(d, edit)
    _load(d)


def nan_in_training(d: Path) -> None:
    """A real loop whose loss turns NaN at step 3: found after the optimizer step, step named."""
    model = build_model("tiny-bert")
    ta.inject(model, SPEC, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    for step in range(1, 6):
        h = model(input_ids=ids).last_hidden_state
        loss = (h @ torch.linspace(-1, 1, h.shape[-1])).pow(2).mean()
        if step == 3:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        opt.zero_grad()
        check_finite(model, step)


def inf_grad(d: Path) -> None:
    model = build_model("tiny-bert")
    ta.inject(model, SPEC, seed=0)
    p = get_adapter(model).factors["q_k_v_o"]["U_in"]
    p.grad = torch.zeros_like(p)
    p.grad.view(-1)[0] = float("inf")
    check_finite(model, 12, grads=True)


def trainer_callback(d: Path) -> None:
    """FiniteCheckCallback inside a real transformers.Trainer run: poisoned at step 2."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_model("tiny-bert")
    ta.inject(model, SPEC, seed=0)

    class Wrapped(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
            loss = self.m(input_ids=input_ids).last_hidden_state.pow(2).mean()
            return {"loss": loss}

    class Poison(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step == 2:
                with torch.no_grad():
                    get_adapter(model).factors["q_k_v_o"]["U_in"].view(-1)[3] = float("inf")
            return control

    data = [
        {"input_ids": torch.randint(0, 1000, (5,)), "labels": torch.zeros(())} for _ in range(8)
    ]
    args = TrainingArguments(
        output_dir=str(d / "trainer"),
        max_steps=4,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=Wrapped(model),
        args=args,
        train_dataset=data,
        callbacks=[Poison(), FiniteCheckCallback()],
    )
    trainer.train()


def spec_file(text: str) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        (d / "s.yaml").write_text(text)
        ta.load_spec(d / "s.yaml")

    return run


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], None]
    error: type[BaseException]
    match: str


CASES = [
    # load_adapter: damaged files
    Case(
        "truncated",
        truncated,
        AdapterMismatchError,
        r"adapter\.safetensors: truncated or corrupted",
    ),
    Case(
        "empty-file",
        empty_file,
        AdapterMismatchError,
        r"truncated or corrupted safetensors file \(0 bytes\)",
    ),
    Case("garbage-header", garbage_header, AdapterMismatchError, "truncated or corrupted"),
    Case("header-length-lies", header_length_lies, AdapterMismatchError, "truncated or corrupted"),
    Case("nan-bit-rot", nan_bytes, AdapterMismatchError, r"tensor '.*' fails its checksum"),
    Case(
        "peft-file-not-ours",
        not_tensadapt_file,
        AdapterMismatchError,
        "not a tensadapt adapter file",
    ),
    Case(
        "wrong-tensor-shape",
        wrong_shape,
        AdapterMismatchError,
        r"tensor '.*' is float32\[.*\], its record says float32\[",
    ),
    Case("corrupted-config", corrupted_config, AdapterMismatchError, r"corrupted config"),
    Case(
        "config-edited-unsigned",
        config_edited_unsigned,
        AdapterMismatchError,
        r"committed config fails its checksum",
    ),
    Case(
        "config-wrong-type",
        config_wrong_type,
        AdapterMismatchError,
        r"corrupted adapter config: num_labels",
    ),
    Case(
        "config-huge-labels",
        config_huge_labels,
        AdapterMismatchError,
        r"corrupted adapter config: num_labels: Input should be less than or equal to 100000",
    ),
    Case(
        "added-tensor",
        added_tensor,
        AdapterMismatchError,
        r"tensor 'modules_to_save\.embeddings.*' is not recorded in the adapter's config",
    ),
    Case(
        "undeclared-module",
        undeclared_module,
        AdapterMismatchError,
        r"unexpected tensor 'modules_to_save\.embeddings.*modules_to_save does not list",
    ),
    Case("fifo-tensors", fifo_config, AdapterMismatchError, r"not a regular file"),
    Case(
        "missing-tensors",
        missing(ADAPTER_FILE),
        AdapterMismatchError,
        r"missing adapter\.safetensors",
    ),
    Case("path-is-a-file", a_file, AdapterMismatchError, "is a file, not an adapter directory"),
    Case("no-such-dir", no_dir, AdapterMismatchError, "adapter directory not found"),
    # load_adapter: newer format
    Case(
        "newer-config-format",
        newer_config_format,
        AdapterMismatchError,
        r"format version 99 is newer .*upgrade",
    ),
    Case(
        "newer-tensor-format",
        newer_tensor_format,
        AdapterMismatchError,
        r"format version '99' is newer",
    ),
    # load_adapter: another model
    Case(
        "other-width",
        other_model(hidden_size=48),
        AdapterMismatchError,
        r"another model: hidden_size: adapter 32 vs model 48",
    ),
    Case(
        "other-layers",
        other_model(num_hidden_layers=3),
        AdapterMismatchError,
        "n_layers: adapter 2 vs model 3",
    ),
    Case(
        "other-heads",
        other_model(num_attention_heads=2),
        AdapterMismatchError,
        "n_heads: adapter 4 vs model 2",
    ),
    Case(
        "other-mlp",
        other_model(intermediate_size=80),
        AdapterMismatchError,
        "intermediate_size: adapter 64 vs model 80",
    ),
    Case(
        "other-family", gpt2_model, AdapterMismatchError, "family: adapter 'bert' vs model 'gpt2'"
    ),
    Case(
        "other-targets",
        other_targets,
        AdapterMismatchError,
        r"targets differ .*target q\.7 not in this model.*adapter 48x32 vs model 32x32",
    ),
    # CLI: missing files, directories -> exit 2 and says so
    Case(
        "cli-validate-missing",
        lambda d: cli("validate", str(d / "nope.yaml")),
        CliFailed,
        r"(?s)exit 2: .*file not found",
    ),
    Case(
        "cli-validate-dir",
        lambda d: cli("validate", str(d)),
        CliFailed,
        "is a directory, not a spec file",
    ),
    Case(
        "cli-plan-missing",
        lambda d: cli("plan", str(d / "nope.yaml"), "-m", "tiny-bert"),
        CliFailed,
        "nope.yaml: no such file",
    ),
    Case(
        "cli-plan-dir",
        lambda d: cli("plan", str(d), "-m", "tiny-bert"),
        CliFailed,
        "is a directory, expected a file",
    ),
    Case(
        "cli-plan-bad-model",
        lambda d: cli("plan", str(SPECS[0]), "-m", str(d / "nomodel")),
        CliFailed,
        "unknown preset",
    ),
    Case(
        "cli-export-missing",
        lambda d: cli(
            "export", str(d / "nope"), "--to", "merged", "-m", "tiny-bert", "-o", str(d / "o")
        ),
        CliFailed,
        "no such adapter directory",
    ),
    Case(
        "cli-export-file",
        lambda d: cli(
            "export", str(d / ADAPTER_FILE), "--to", "merged", "-m", "tiny-bert", "-o", str(d / "o")
        ),
        CliFailed,
        "is a file, expected an adapter directory",
    ),
    Case(
        "cli-export-not-adapter",
        lambda d: (
            cli("export", str(d / "x"), "--to", "peft-lora", "-m", "tiny-bert", "-o", str(d / "o"))
            if (d / "x").mkdir() is None
            else None
        ),
        CliFailed,
        r"not a tensadapt adapter directory \(no adapter\.safetensors",
    ),
    Case(
        "cli-export-bad-class",
        lambda d: cli(
            "export",
            str(d),
            "--to",
            "merged",
            "-m",
            "tiny-bert",
            "--model-class",
            "NoSuchModel",
            "-o",
            str(d / "o"),
        ),
        CliFailed,
        "transformers has no class 'NoSuchModel'",
    ),
    # specs
    Case("spec-typo", spec_file("factorization: tuker\n"), SpecError, r"factorization"),
    Case("spec-not-mapping", spec_file("- q\n- k\n"), SpecError, "a spec must be a mapping"),
    Case("spec-yaml-syntax", spec_file("rank: [1, 2\n"), SpecError, "YAML syntax error at line"),
    # numerics during training
    Case(
        "nan-during-training",
        nan_in_training,
        NonFiniteError,
        r"non-finite values in adapter factors at step 3: q_k_v_o\.U_\w+: \d+ NaN",
    ),
    Case("inf-gradient", inf_grad, NonFiniteError, r"at step 12: q_k_v_o\.U_in\.grad: 1 inf of"),
    Case("trainer-callback", trainer_callback, NonFiniteError, r"at step 2: q_k_v_o\.U_in: 1 inf"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, saved: Path, tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    shutil.copytree(saved, d)
    with pytest.raises(case.error, match=case.match) as info:
        case.run(d)
    assert isinstance(info.value, TensadaptError | CliFailed)
    if isinstance(info.value, NonFiniteError):
        assert info.value.step is not None and info.value.names


def test_valid_adapter_still_loads(saved: Path) -> None:
    """The fixture itself is fine: the table's errors come from the damage, not the adapter."""
    model = build_model("tiny-bert")
    ta.load_adapter(model, saved)
    assert ta.trainable_parameters(model) > 0


def test_config_hand_edit_uses_committed_config(saved: Path, tmp_path: Path) -> None:
    """adapter.safetensors carries the config it was committed with; a stale
    adapter_config.json (interrupted save, or a hand edit) is reported and the committed one
    wins."""
    d = tmp_path / "a"
    shutil.copytree(saved, d)
    text = (d / CONFIG_FILE).read_text()
    assert '"alpha": null' in text
    (d / CONFIG_FILE).write_text(text.replace('"alpha": null', '"alpha": 99.0'))
    with pytest.warns(UserWarning, match="differs from the config committed inside"):
        model = ta.load_adapter(build_model("tiny-bert"), d)
    assert get_adapter(model).plan.spec.alpha is None


# -- spec fuzzing ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["q", "k", "v", "o", "cp", "tucker", "heads", "in", "default", "all"]),
)
data = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(
            st.one_of(
                st.text(max_size=8),
                st.integers(),
                st.sampled_from(list(ta.AdapterSpec.model_fields)),
            ),
            kids,
            max_size=5,
        ),
    ),
    max_leaves=12,
)


def _only_spec_errors(source: Any) -> None:
    with suppress(SpecError):
        ta.load_spec(source)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(data, st.text(max_size=80)))
def test_fuzz_random_yaml_documents(doc: Any) -> None:
    """Random YAML documents (and random text) never raise anything but SpecError."""
    if isinstance(doc, str):
        _only_spec_errors(doc if "\n" in doc or not doc.strip() else doc + "\n")
    else:
        _only_spec_errors(yaml.safe_dump(doc, allow_unicode=True) if doc is not None else "~\n")
        if isinstance(doc, dict):
            _only_spec_errors(doc)


@st.composite
def mutated_specs(draw: st.DrawFn) -> tuple[Path, dict[Any, Any]]:
    path = draw(st.sampled_from(SPECS))
    spec = yaml.safe_load(path.read_text())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "replace", "add", "nest", "retype"]))
        keys = list(spec)
        if op == "delete" and keys:
            spec.pop(draw(st.sampled_from(keys)))
        elif op == "replace" and keys:
            spec[draw(st.sampled_from(keys))] = draw(data)
        elif op == "add":
            spec[
                draw(
                    st.one_of(
                        st.text(max_size=8), st.sampled_from(list(ta.AdapterSpec.model_fields))
                    )
                )
            ] = draw(data)
        elif op == "nest" and keys:
            k = draw(st.sampled_from(keys))
            spec[k] = draw(
                st.sampled_from([[spec[k]], {"default": spec[k]}, {"in": spec[k], "bogus": 0}])
            )
        elif op == "retype" and keys:
            k = draw(st.sampled_from(keys))
            spec[k] = draw(st.sampled_from([str(spec[k]), -1, 0, 1.5, True, None, [], {}]))
    return path, spec


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_fuzz_mutated_reference_specs(case: tuple[Path, dict[Any, Any]]) -> None:
    """Random mutations of every shipped spec: SpecError or a valid spec -- and a valid one then
    plans against tiny-bert or fails with PlanError, never anything else."""
    _, spec = case
    _only_spec_errors(spec)
    _only_spec_errors(yaml.safe_dump(spec))
    try:
        ok = ta.load_spec(spec)
    except SpecError:
        return
    from tensadapt.arch import preset_config

    with suppress(TensadaptError):
        ta.plan(ok, preset_config("tiny-bert"))


# -- limits: an oversized spec is refused by name, before the work it would cause -----------------


def _laughs(width: int = 9, levels: int = 9) -> str:
    """The "billion laughs": each level an anchored list of ``width`` aliases of the one before."""
    names = "abcdefghijklmnop"
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [{', '.join([f'*{names[i - 1]}'] * width)}]")
    return "\n".join(lines) + "\n"


def _block_nest(depth: int) -> str:
    return (
        "options:\n"
        + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(depth))
        + "  " * (depth + 1)
        + "x: 1\n"
    )


LIMITS: list[tuple[str, str, str]] = [
    ("billion-laughs", _laughs(), "holds more than 10,000 values"),
    ("nested-600-flow", "rank: " + "[" * 600 + "]" * 600 + "\n", "nests deeper than 32 levels"),
    ("nested-mappings", "options: " + "{a: " * 200 + "1" + "}" * 200 + "\n", "nests deeper"),
    ("nested-block", _block_nest(100), "nests deeper than 32 levels"),
    ("recursive-alias", "options: &a {a: *a}\n", "nests deeper than 32 levels"),
    ("int-5000-digits", "rank: " + "9" * 5000 + "\n", "an integer of 5,000 digits is too large"),
    ("int-19-digits", "rank: 1000000000000000000\n", "an integer of 19 digits is too large"),
    ("int-tagged", "rank: !!int " + "1" * 50 + "\n", "an integer of 50 digits"),
    ("int-in-options", "options: {n_cores: " + "7" * 40 + "}\n", "an integer of 40 digits"),
    ("wide-list", "targets: [" + "q, " * 20000 + "q]\n", "holds more than 10,000 values"),
    ("bad-timestamp", "name: 2001-13-45\n", "YAML value cannot be read: ValueError"),
    ("python-tag", "name: !!python/object:os.system {}\n", "could not determine a constructor"),
    ("undefined-alias", "rank: *nope\n", "found undefined alias"),
    ("unhashable-key", "? [a, b]\n: 1\n", "found unhashable key"),
]


@pytest.mark.parametrize(("text", "fragment"), [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_spec_limits(text: str, fragment: str, tmp_path: Path) -> None:
    """Each breach is one named problem, from text and from a file, and `validate` exits 2."""
    with pytest.raises(SpecError) as info:
        ta.load_spec(text)
    (problem,) = info.value.problems
    assert problem.path == "" and fragment in problem.message, problem
    f = tmp_path / "hostile.yaml"
    f.write_text(text)
    with pytest.raises(CliFailed, match=re.escape(fragment)):
        cli("validate", str(f))


def test_the_billion_laughs_is_tiny() -> None:
    assert len(_laughs().encode()) < 600  # 9 levels of 9: 387,420,489 values once expanded


def test_huge_files_and_texts_are_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as fh:
        fh.write(b"rank: 8\n" + b"#" * (50 * 2**20))  # 50 MB of comment after a valid spec
    with pytest.raises(SpecError, match=r"the spec is 52,428,808 bytes; the limit is 1,048,576"):
        ta.load_spec(big)
    with pytest.raises(CliFailed, match="the limit is 1,048,576"):
        cli("validate", str(big))
    with pytest.raises(SpecError, match=r"the spec is 2,097,160 characters; the limit"):
        ta.load_spec("rank: 8\n" + "#" * 2**21)


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)  # opening it to read would block until a writer comes: never opened
    with pytest.raises(SpecError, match="is not a regular file"):
        ta.load_spec(fifo)
    with pytest.raises(CliFailed, match="is not a regular file"):
        cli("validate", str(fifo))


def test_json_spec_limits(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"options": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(SpecError, match="nests deeper than 32 levels"):
        ta.load_spec(deep)
    big_int = tmp_path / "int.json"
    big_int.write_text('{"rank": ' + "9" * 5000 + "}")
    with pytest.raises(SpecError, match="an integer of 5,000 digits is too large"):
        ta.load_spec(big_int)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"rank": 4}).encode())
    assert ta.load_spec(bom).rank == 4


def _cyclic() -> dict[str, Any]:
    inner: dict[str, Any] = {}
    inner["a"] = inner
    return {"options": inner}


def _shared_bomb() -> dict[str, Any]:
    x: Any = ["lol"] * 9
    for _ in range(9):
        x = [x] * 9
    return {"options": {"a": x}}


def _deep_dict(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {"x": 1}
    for _ in range(depth):
        d = {"k": d}
    return {"options": d}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"rank": 10**5000}, "an integer of 5,001 digits is too large"),
        ({"rank": -(10**18)}, "an integer of 19 digits is too large"),
        (_deep_dict(2000), "nests deeper than 32 levels"),
        (_cyclic(), "nests deeper than 32 levels"),
        (_shared_bomb(), "holds more than 10,000 values"),
    ],
    ids=["int-5001-digits", "int-negative", "deep", "cycle", "shared-references"],
)
def test_spec_limits_on_python_data(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        ta.load_spec(data)
    (problem,) = info.value.problems
    assert fragment in problem.message and info.value.source == "<dict>"


# -- the standing red team: hostile specs give a SpecError or a valid spec, nothing else ----------
#: how many examples each red-team test runs (the figure reported in docs/reliability.md)
RED_TEAM_EXAMPLES = {"text": 300, "hostile": 300, "python": 200}
_YAML_CHARS = "[]{}:,-?&*!|>'\"#%@`~ \n\t.0123456789eE+_aqkvx<=\\\ufeff\u00e9"
_FIELDS = [*ta.AdapterSpec.model_fields, "rnak"]


def _spec_error_or_spec(source: Any) -> SpecError | None:
    """Loading ``source`` gives a SpecError with named problems, or a spec that round-trips."""
    try:
        spec = ta.load_spec(source)
    except SpecError as err:
        assert err.problems and all(isinstance(p.path, str) and p.message for p in err.problems)
        return err
    assert isinstance(spec, ta.AdapterSpec)
    assert ta.load_spec(spec_to_yaml(spec)) == spec
    return None


@pytest.mark.slow
@settings(max_examples=RED_TEAM_EXAMPLES["text"], deadline=None)
@given(st.text(alphabet=_YAML_CHARS, max_size=160))
def test_red_team_random_text(text: str) -> None:
    _spec_error_or_spec(text if "\n" in text else text + "\n")


@st.composite
def hostile_yaml(draw: st.DrawFn) -> tuple[str, str | None]:
    """A spec with one hostile value, and the limit it must be refused by (None: any outcome)."""
    kind = draw(st.sampled_from(["laughs", "nest", "int", "tag", "alias", "wide", "mixed"]))
    key = draw(st.sampled_from(_FIELDS))
    if kind == "laughs":
        width, levels = draw(st.integers(2, 12)), draw(st.integers(1, 10))
        text = _laughs(width, levels).replace("a: &a", f"{key}: &a", 1)
        return text, ("more than 10,000 values" if width**levels > 20_000 else None)
    if kind == "nest":
        depth = draw(st.integers(1, 150))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("[{b: ", "}]")]))
        leaf = draw(st.sampled_from(["1", "q", "", "*x", "&y 2"]))
        levels = 1 + depth * (2 if opener == "[{b: " else 1)  # the spec's own mapping is one
        return f"{key}: {opener * depth}{leaf}{closer * depth}\n", (
            "nests deeper" if levels > 32 else None
        )
    if kind == "int":
        digits = draw(st.integers(1, 6000))
        sign = draw(st.sampled_from(["", "-", "+"]))
        tag = draw(st.sampled_from(["", "!!int ", "!!float ", "!!str "]))
        text = f"{key}: {tag}{sign}{'1' + '0' * (digits - 1)}\n"
        return text, ("digits is too large" if digits > 18 and tag in ("", "!!int ") else None)
    if kind == "tag":
        tag = draw(
            st.sampled_from(
                [
                    "!!binary",
                    "!!timestamp",
                    "!!set",
                    "!!omap",
                    "!!pairs",
                    "!!python/name:os.system",
                    "!!bool",
                    "!!null",
                    "!!map",
                    "!!seq",
                    "!custom",
                    "!!merge",
                ]
            )
        )
        value = draw(st.sampled_from(["x", "2001-13-45", "{a: 1}", "[1, 2]", "'%%%'", "", "yes"]))
        return f"{key}: {tag} {value}\n", None
    if kind == "alias":
        body = draw(
            st.sampled_from(
                [
                    "&a [1, *a]",
                    "*undefined",
                    "&a 1\nb: *a",
                    "&a {<<: *a}",
                    "&a [&a 1, *a]",
                    "{<<: [1, 2]}",
                ]
            )
        )
        return f"{key}: {body}\n", None
    if kind == "wide":
        n = draw(st.integers(1, 15000))
        return f"{key}: [{', '.join(['q'] * n)}]\n", (
            "more than 10,000 values" if n >= 10_000 else None
        )
    text = draw(st.text(alphabet=_YAML_CHARS, max_size=60))
    return f"{key}: {text}\n", None


@pytest.mark.slow
@settings(max_examples=RED_TEAM_EXAMPLES["hostile"], deadline=None)
@given(hostile_yaml())
def test_red_team_hostile_yaml(case: tuple[str, str | None]) -> None:
    """Alias bombs, deep nests, huge integers, odd tags and aliases: a SpecError (naming the limit
    when one is breached) or a valid spec -- never another exception, never the expanded work."""
    text, limit = case
    err = _spec_error_or_spec(text)
    if limit is not None:
        assert err is not None and any(limit in p.message for p in err.problems), (text[:80], err)


def _containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.text(max_size=6), st.integers(), st.sampled_from(_FIELDS))
    return st.one_of(
        st.lists(kids, max_size=4), st.tuples(kids, kids), st.dictionaries(keys, kids, max_size=4)
    )


_HOSTILE_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.binary(max_size=4),
        st.sampled_from([object(), {1, 2}, frozenset(), 1j, Path("x")]),
    ),
    _containers,
    max_leaves=15,
)


@st.composite
def hostile_python(draw: st.DrawFn) -> Any:
    """Python data as no YAML could give: odd types, huge integers, cycles, shared references
    (a bomb), deep nesting."""
    value = draw(_HOSTILE_VALUES)
    twist = draw(st.sampled_from(["none", "cycle", "share", "deep"]))
    if twist == "cycle" and isinstance(value, list):
        value.append(value)
    elif twist == "share":
        value = [value] * draw(st.integers(2, 30))
        value = [value] * draw(st.integers(2, 30))
        value = [value] * draw(st.integers(2, 30))
    elif twist == "deep":
        for _ in range(draw(st.integers(1, 60))):
            value = {"k": value}
    return value


@pytest.mark.slow
@settings(max_examples=RED_TEAM_EXAMPLES["python"], deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), hostile_python(), max_size=4))
def test_red_team_python_mappings(spec: dict[str, Any]) -> None:
    _spec_error_or_spec(spec)
