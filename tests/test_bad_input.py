"""Bad input, everywhere: every wrong file, model, directory or number gets a clear, specific error
(type and message part checked), and spec fuzzing never escapes ``SpecError``."""

from __future__ import annotations

import hashlib
import io
import json
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
