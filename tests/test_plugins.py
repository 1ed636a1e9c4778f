"""Plugins: hooks, entry points, failure isolation, disabling, laziness, the ``plugins`` command,
and the installed example distributions (tensor_ring, gpt_neo) working through every command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, build_model, hidden, model_inputs
from fake_plugins import (
    FakeEntryPoint,
    install,
    install_examples,
    needs_installed_examples,
)

import tensadapt as ta
from tensadapt import cli, plugins
from tensadapt.errors import RegistryError
from tensadapt.factorizations.base import Factorization, make_network
from tensadapt.hookspecs import HOOKS, hookimpl
from tensadapt.registry import Registry

RING_SPEC = """\
# a tensor-ring adapter (from the tensadapt-tensor-ring plugin) over stacked q/k/v and layers
factorization: tensor_ring
targets: [q, k, v]
modes: [qkv, depth]
rank: 2
alpha: 4
"""


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test starts from a fresh load with nothing disabled and the example plugins
    installed (from their source trees when ``make install`` did not), and leaves one behind."""
    monkeypatch.delenv(plugins.DISABLE_ENV, raising=False)
    plugins.reset(disabled=())
    install_examples(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    plugins.reset(disabled=())


# -- fake plugins ----------------------------------------------------------------------------------
def _plugin_module(name: str, **hooks: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook, value in hooks.items():
        setattr(mod, hook, hookimpl(lambda value=value: value))
    return mod


class Kron2(Factorization):
    """A valid little format: LoRA with an extra diagonal core (only for these tests)."""

    name = "fake_good"
    description = "test format"

    def network(self, axes, rank, options):
        r = rank if isinstance(rank, int) else 2
        rest = [a.name for a in axes[1:]]
        factors = [("A", ("in", "r")), ("D", ("r", "s")), ("B", ("s", *rest))]
        return make_network(factors, axes, {"r": r, "s": r}, zero_factor="B")


class DuplicateLora(Kron2):
    name = "lora"


class NoNetwork(Factorization):
    name = "fake_no_network"


class NotAFactorization:
    name = "fake_duck"

    def rank_keys(self, axes):
        return ()


# -- registry --------------------------------------------------------------------------------------
def test_registry_rejects_duplicates_and_lists_valid_names() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1, source="dist-a", version="1.0")
    reg.register("b", 2)
    with pytest.raises(
        RegistryError, match=r"widget 'a' from dist-x 2 is already registered by dist-a 1.0"
    ):
        reg.register("a", 3, source="dist-x", version="2")
    with pytest.raises(RegistryError, match=r"unknown widget 'c'; valid names: a, b"):
        reg.get("c")
    assert reg.unregister("a").obj == 1 and reg.names() == ["b"]


def test_every_registry_lookup_error_lists_the_valid_names() -> None:
    for reg in (
        plugins.factorization_registry(),
        plugins.architecture_registry(),
        plugins.initializer_registry(),
    ):
        with pytest.raises(RegistryError) as err:
            reg.get("no_such_thing")
        assert "valid names:" in str(err.value)
        for name in reg.names():
            assert name in str(err.value)


def test_builtins_register_through_the_hooks() -> None:
    pm = plugins.plugin_manager()
    assert pm.has_plugin("tensadapt")
    impls = {i.plugin_name for i in pm.hook.tensadapt_register_factorizations.get_hookimpls()}
    assert "tensadapt" in impls
    fact = plugins.factorization_registry()
    assert {"lora", "cp", "tucker", "tt", "mpo"} <= set(fact.names())
    assert fact.entry("cp").plugin == "tensadapt" and fact.entry("cp").source == "tensadapt"
    assert {"bert", "gpt2", "llama", "vit"} <= set(plugins.architecture_registry().names())
    assert plugins.failures() == []


# -- the installed example distributions ---------------------------------------------------------------
def test_installed_plugins_are_registered_with_their_distribution() -> None:
    ring = plugins.factorization_registry().entry("tensor_ring")
    assert (ring.source, ring.version, ring.plugin) == (
        "tensadapt-tensor-ring",
        "0.1.0",
        "tensor_ring",
    )
    neo = plugins.architecture_registry().entry("gpt_neo")
    assert neo.source == "tensadapt-gpt-neo"


@needs_installed_examples
def test_no_plugin_is_imported_at_import_tensadapt() -> None:
    code = (
        "import sys, tensadapt\n"
        "print(sorted(m for m in sys.modules if m.startswith(('tensadapt_', 'tensadapt.plugins'))))\n"
        "from tensadapt.spec import load_spec\n"
        "load_spec({'factorization': 'tensor_ring', 'rank': 2})\n"
        "print(sorted(m for m in sys.modules if m.startswith('tensadapt_')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == "['tensadapt_gpt_neo', 'tensadapt_tensor_ring']"


def test_cli_plugins_table_and_json(capsys) -> None:
    assert cli.main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert re.search(
        r"^factorization\s+tensor_ring\s+tensadapt-tensor-ring\s+0\.1\.0\s+tensor ring", table, re.M
    )
    assert re.search(r"^architecture\s+gpt_neo\s+tensadapt-gpt-neo\s+0\.1\.0", table, re.M)
    assert re.search(r"^factorization\s+lora\s+tensadapt\s", table, re.M)
    assert cli.main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["kind"], r["name"]): r for r in data["entries"]}
    assert rows[("factorization", "tensor_ring")]["distribution"] == "tensadapt-tensor-ring"
    assert set(rows[("factorization", "tensor_ring")]) >= {
        "kind",
        "name",
        "distribution",
        "version",
        "description",
    }
    assert data["failures"] == []


def test_cli_validate_and_plan_accept_tensor_ring(tmp_path, capsys) -> None:
    spec = tmp_path / "ring.yaml"
    spec.write_text(RING_SPEC)
    assert cli.main(["validate", str(spec)]) == 0
    assert "ok" in capsys.readouterr().out
    assert cli.main(["plan", str(spec), "--model", "tiny-bert", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    (tensor,) = p["tensors"]
    # axes in=32, out=32, qkv=3, depth=2, ring rank 2: cores [2,32,2] [2,32,2] [2,3,2] [2,2,2]
    assert [tuple(f["shape"]) for f in tensor["factors"]] == [
        (2, 32, 2),
        (2, 32, 2),
        (2, 3, 2),
        (2, 2, 2),
    ]
    assert p["n_params"] == 128 + 128 + 12 + 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(RING_SPEC.replace("tensor_ring", "tensor_rnig"))
    assert cli.main(["validate", str(bad)]) == 2
    assert "tensor_ring" in capsys.readouterr().out  # the valid names (or a suggestion) are shown


def test_inject_trains_tensor_ring() -> None:
    model = build_model("tiny-bert")
    inputs = model_inputs(model)
    with torch.no_grad():
        base = hidden(model, inputs)
    ta.inject(model, RING_SPEC, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, inputs), base, rtol=0, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == 276
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn_like(base)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(hidden(model, inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# -- failure isolation -----------------------------------------------------------------------------
def test_each_broken_plugin_is_reported_by_name_and_the_rest_keep_working(monkeypatch) -> None:
    good = _plugin_module("good", tensadapt_register_factorizations=[Kron2])
    dup = _plugin_module("dup", tensadapt_register_factorizations=[DuplicateLora, NoNetwork])
    duck = _plugin_module("duck", tensadapt_register_factorizations=[NotAFactorization])
    raising = types.ModuleType("raising")

    @hookimpl
    def tensadapt_register_architectures():
        raise RuntimeError("config table missing")

    raising.tensadapt_register_architectures = tensadapt_register_architectures  # type: ignore[attr-defined]
    install(
        monkeypatch,
        FakeEntryPoint("good", good, "tensadapt-good"),
        FakeEntryPoint(
            "broken",
            ModuleNotFoundError("No module named 'torch_ring_ext'"),
            "tensadapt-broken",
            "0.4",
        ),
        FakeEntryPoint("dup", dup, "tensadapt-dup", "2.0"),
        FakeEntryPoint("duck", duck, "tensadapt-duck"),
        FakeEntryPoint("raising", raising, "tensadapt-raising", "0.0.1"),
    )
    fact = plugins.factorization_registry()
    with pytest.warns(plugins.PluginWarning) as caught:
        fact.names()  # the built-ins are there from the start; listing every name loads plugins
    msgs = [str(f) for f in plugins.failures()]
    assert len(msgs) == len(caught.list) == 5, msgs

    # broken import: the whole plugin, with distribution and version
    assert (
        "plugin 'broken' (tensadapt-broken 0.4): left out: import failed: "
        "ModuleNotFoundError: No module named 'torch_ring_ext'" in msgs
    )
    # duplicate name: that entry left out, naming who holds the name
    assert (
        "plugin 'dup' (tensadapt-dup 2.0): factorization 'lora' left out: name already "
        f"registered by plugin 'tensadapt' (tensadapt {plugins._own_version()})" in msgs
    )
    assert isinstance(fact.get("lora"), ta.factorizations.LoRA)  # the built-in kept its name
    # class missing a method / not implementing the interface
    assert any("fake_no_network" in m and "does not implement network" in m for m in msgs)
    assert any(
        m.startswith("plugin 'duck' (tensadapt-duck 1.2.3)") and "missing method(s) network" in m
        for m in msgs
    )
    # a hook that raises
    assert any(
        m.startswith("plugin 'raising' (tensadapt-raising 0.0.1): left out:")
        and "RuntimeError: config table missing" in m
        for m in msgs
    )
    # the rest keep working: the good fake, the installed plugins, the built-ins
    assert {"fake_good", "tensor_ring", "lora", "mpo"} <= set(fact.names())
    assert not {"fake_no_network", "fake_duck"} & set(fact.names())
    assert "gpt_neo" in plugins.architecture_registry()
    status = {p.name: p.status for p in plugins.plugins()}
    assert status["broken"] == "failed" and status["raising"] == "failed"
    assert status["good"] == status["dup"] == status["tensor_ring"] == "loaded"
    spec = ta.load_spec({"factorization": "fake_good", "rank": 2})
    assert ta.plan(spec, "tiny-bert").n_params > 0


def test_cli_plugins_reports_failures(monkeypatch, capsys) -> None:
    install(
        monkeypatch, FakeEntryPoint("broken", ImportError("boom"), "tensadapt-broken", "0.4")
    )
    with pytest.warns(plugins.PluginWarning):
        assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "1 plugin problem(s), left out:" in out
    assert (
        "plugin 'broken' (tensadapt-broken 0.4): left out: import failed: ImportError: boom" in out
    )
    assert re.search(r"^factorization\s+tensor_ring", out, re.M)


def test_unknown_hook_name_is_reported(monkeypatch) -> None:
    typo = types.ModuleType("typo")
    typo.tensadapt_register_factorisations = hookimpl(lambda: [Kron2])  # type: ignore[attr-defined]
    install(monkeypatch, FakeEntryPoint("typo", typo, "tensadapt-typo"))
    with pytest.warns(
        plugins.PluginWarning, match=r"unknown hook\(s\) \['tensadapt_register_factorisations'\]"
    ):
        assert "fake_good" not in plugins.factorization_registry()


def test_family_claiming_a_known_model_type_is_rejected(monkeypatch) -> None:
    from tensadapt.arch import Family, Layout

    clash = Family("my_llama", ("llama",), (Layout({"q": "layers.{l}.q"}),))
    mod = _plugin_module("clash", tensadapt_register_architectures=[clash])
    install(monkeypatch, FakeEntryPoint("clash", mod, "tensadapt-clash"))
    with pytest.warns(
        plugins.PluginWarning,
        match=r"model_type\(s\) \['llama'\] already covered by family 'llama'",
    ):
        assert "my_llama" not in plugins.architecture_registry()


# -- disabling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tensor_ring", "tensadapt-tensor-ring", "tensadapt_tensor_ring"])
def test_disabled_by_environment(monkeypatch, name: str) -> None:
    monkeypatch.setenv(plugins.DISABLE_ENV, f"nothing, {name}")
    plugins.reset()
    reg = plugins.factorization_registry()
    assert "tensor_ring" not in reg and "lora" in reg
    assert "gpt_neo" in plugins.architecture_registry()
    assert {p.name: p.status for p in plugins.plugins()}["tensor_ring"] == "disabled"
    with pytest.raises(
        RegistryError, match="unknown factorization 'tensor_ring'; valid names: lora"
    ):
        reg.get("tensor_ring")


def test_disabled_by_cli_option(tmp_path, capsys) -> None:
    assert cli.main(["--disable-plugin", "tensor_ring", "plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in data["entries"]}
    assert "tensor_ring" not in names and "gpt_neo" in names
    spec = tmp_path / "ring.yaml"
    spec.write_text(RING_SPEC)
    plugins.reset(disabled=())
    assert cli.main(["--disable-plugin", "tensor_ring", "validate", str(spec)]) == 2
    assert "factorization" in capsys.readouterr().out


@needs_installed_examples
def test_disabled_plugin_is_not_imported() -> None:
    code = (
        "import sys\nfrom tensadapt import plugins\n"
        "plugins.factorization_registry().names()\n"
        "print('tensadapt_tensor_ring' in sys.modules, 'tensadapt_gpt_neo' in sys.modules)\n"
    )
    env = {**__import__("os").environ, plugins.DISABLE_ENV: "tensor_ring"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    assert out == "False True"


# -- docs ------------------------------------------------------------------------------------------
DOC = ROOT / "docs" / "plugins.md"


def test_every_hook_is_documented() -> None:
    text = DOC.read_text()
    documented = set(re.findall(r"^### `(tensadapt_\w+)`", text, re.M))
    assert set(HOOKS) <= documented, f"undocumented hooks: {sorted(set(HOOKS) - documented)}"
    assert documented <= set(HOOKS), (
        f"documented hooks that do not exist: {sorted(documented - set(HOOKS))}"
    )
    assert tuple(
        n for n in vars(__import__("tensadapt.hookspecs").hookspecs) if n.startswith("tensadapt_")
    ) == HOOKS


def test_docs_example_is_complete_short_and_conforms() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 60
    ns: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(example, str(DOC), "exec"), ns)
    (cls,) = ns["tensadapt_register_factorizations"]()  # type: ignore[operator]
    from tensadapt.testing import check_factorization

    check_factorization(cls, options={"n_blocks": 3}, models=("gpt2",), modes=[("qkv", "depth")])
    net = cls().network(
        [ta.factorizations.Axis("in", 5), ta.factorizations.Axis("out", 4)],
        {"in": 2, "out": 3},
        cls.options_model(n_blocks=3),
    )
    assert [f.shape for f in net.factors] == [(5, 3, 2), (4, 3, 3), (3, 2, 3)]
    assert "[project.entry-points.tensadapt]" in text


def test_shipped_plugin_distributions_declare_the_entry_point() -> None:
    for dist, ep in (("tensadapt-tensor-ring", "tensor_ring"), ("tensadapt-gpt-neo", "gpt_neo")):
        text = (Path(ROOT) / "plugins" / dist / "pyproject.toml").read_text()
        assert "[project.entry-points.tensadapt]" in text and f"{ep} = " in text
