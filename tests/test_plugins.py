"""Plugins: hooks, entry points, failure isolation, disabling, laziness, the ``plugins`` command,
and the installed example distributions (tensor_ring, gpt_neo) working through every command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
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
from tensadapt.testing import single_thread

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
    with single_thread():
        yield
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
    install(monkeypatch, FakeEntryPoint("broken", ImportError("boom"), "tensadapt-broken", "0.4"))
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


def test_a_plugin_whose_hook_fails_is_left_out_whole(monkeypatch) -> None:
    """One failing hook leaves the plugin out entirely: its other hooks' entries are not kept."""

    class HalfGood(Kron2):
        name = "half_good"

    mod = _plugin_module("half", tensadapt_register_factorizations=[HalfGood])
    mod.tensadapt_register_initializers = hookimpl(lambda: None)  # type: ignore[attr-defined]
    install(monkeypatch, FakeEntryPoint("half", mod, "tensadapt-half"))
    with pytest.warns(
        plugins.PluginWarning,
        match=r"plugin 'half' \(tensadapt-half 1.2.3\): left out: "
        r"tensadapt_register_initializers\(\) returned NoneType, expected a list",
    ):
        assert "half_good" not in plugins.factorization_registry()
    assert {p.name: p.status for p in plugins.plugins()}["half"] == "failed"
    assert not plugins.plugin_manager().has_plugin("half")


def test_a_hook_with_a_wrong_signature_is_reported(monkeypatch) -> None:
    mod = types.ModuleType("wrong_sig")

    @hookimpl
    def tensadapt_register_factorizations(config):  # the hook takes no argument
        return [Kron2]

    mod.tensadapt_register_factorizations = tensadapt_register_factorizations  # type: ignore[attr-defined]
    install(monkeypatch, FakeEntryPoint("wrong_sig", mod, "tensadapt-wrong-sig"))
    with pytest.warns(plugins.PluginWarning, match=r"'wrong_sig'.*hook validation failed"):
        assert "fake_good" not in plugins.factorization_registry()
    assert plugins.factorization_registry().names()[:5] == ["lora", "cp", "tucker", "tt", "mpo"]


# -- plugins are guests ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["import", "hook"])
def test_system_exit_from_a_plugin_is_reported_and_commands_still_work(
    monkeypatch, capsys, tmp_path, where: str
) -> None:
    if where == "import":
        target: object = SystemExit(3)
    else:
        target = types.ModuleType("quitter")

        @hookimpl
        def tensadapt_register_factorizations():
            raise SystemExit(0)

        target.tensadapt_register_factorizations = tensadapt_register_factorizations  # type: ignore[attr-defined]
    install(monkeypatch, FakeEntryPoint("quitter", target, "tensadapt-quitter"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("factorization: tensor_rnig\nrank: 0\n")  # an unknown name: loads the plugins
    with pytest.warns(plugins.PluginWarning, match="plugin 'quitter'"):
        assert cli.main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "factorization: unknown factorization 'tensor_rnig' (did you mean 'tensor_ring'?)" in out
    assert "rank: must be >= 1, got 0" in out
    assert cli.main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (failure,) = data["failures"]
    assert failure["plugin"] == "quitter" and "SystemExit" in failure["message"]
    assert {"lora", "tensor_ring"} <= {r["name"] for r in data["entries"]}


def test_what_a_plugin_prints_never_reaches_the_command_output(monkeypatch, capsys) -> None:
    class Noisy:
        def __init__(self) -> None:
            self.mod = _plugin_module("noisy", tensadapt_register_factorizations=[])

        def load(self) -> object:
            print("hello from the noisy plugin's import")
            return self.mod

    noisy = Noisy()

    @hookimpl
    def tensadapt_register_architectures():
        print("hello from the noisy plugin's hook")
        return []

    noisy.mod.tensadapt_register_architectures = tensadapt_register_architectures  # type: ignore[attr-defined]
    ep = FakeEntryPoint("noisy", None, "tensadapt-noisy")
    monkeypatch.setattr(ep, "load", noisy.load)
    install(monkeypatch, ep)
    assert cli.main(["plugins", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is the JSON and nothing else
    assert data["failures"] == []
    assert "noisy" in {p["name"] for p in data["plugins"]}
    assert "hello from the noisy plugin's import" in captured.err
    assert "hello from the noisy plugin's hook" in captured.err


def test_a_slow_import_is_reported_with_its_time(monkeypatch) -> None:
    mod = _plugin_module("sleepy", tensadapt_register_factorizations=[])
    ep = FakeEntryPoint("sleepy", mod, "tensadapt-sleepy")
    monkeypatch.setattr(ep, "load", lambda: time.sleep(0.05) or mod)
    monkeypatch.setattr(plugins, "SLOW_IMPORT_SECONDS", 0.01)
    monkeypatch.setenv(plugins.DISABLE_ENV, "tensor_ring,gpt_neo")  # only the sleepy one, here
    install(monkeypatch, ep)
    with pytest.warns(plugins.PluginWarning, match=r"plugin 'sleepy' .*: import took \d+\.\d\d s"):
        plugins.factorization_registry().names()
    (line,) = [s["message"] for s in plugins.report()["slow"] if "'sleepy'" in s["message"]]
    assert float(re.search(r"took (\d+\.\d+) s", line).group(1)) >= 0.05  # type: ignore[union-attr]
    assert "--disable-plugin sleepy" in line
    info = {p.name: p for p in plugins.plugins()}["sleepy"]
    assert info.status == "loaded" and info.seconds >= 0.05


class Touchy(Kron2):
    """Right on the load-time probe (in, out), raising once a tensor is stacked or keyed."""

    name = "touchy"

    def rank_keys(self, axes):
        return tuple(axes) if len(axes) == 2 else (1 // 0,)

    def network(self, axes, rank, options):
        if len(axes) > 2:
            raise SystemExit("touchy cannot stack")
        return super().network(axes, rank, options)


def test_a_plugin_factorization_failing_at_use_time_is_a_named_error(monkeypatch, capsys) -> None:
    from tensadapt.errors import PluginError

    mod = _plugin_module("touchy", tensadapt_register_factorizations=[Touchy])
    install(monkeypatch, FakeEntryPoint("touchy", mod, "tensadapt-touchy", "0.3"))
    assert isinstance(plugins.factorization_registry().get("touchy"), Touchy)
    who = "plugin 'touchy' (tensadapt-touchy 0.3): factorization 'touchy'"
    # validating: rank_keys raises -> a spec problem at `factorization`, naming the plugin
    with pytest.raises(ta.SpecError) as info:
        ta.load_spec({"factorization": "touchy", "modes": ["qkv"], "rank": {"default": 2}})
    (problem,) = info.value.problems
    assert problem.path == "factorization"
    assert (
        problem.message
        == f"{who}: rank_keys() raised ZeroDivisionError: integer division or modulo by zero"
    )
    # planning: network raises SystemExit -> PluginError, and the CLI exits 2 with it
    spec = ta.load_spec({"factorization": "touchy", "modes": ["qkv"], "rank": 2})
    with pytest.raises(
        PluginError, match=rf"{re.escape(who)}: network\(\) raised SystemExit: touchy"
    ):
        ta.plan(spec, "tiny-bert")
    assert ta.plan({"factorization": "touchy", "rank": 2}, "tiny-bert").n_params > 0


def test_plugin_initializers_declare_what_they_start_from(monkeypatch) -> None:
    from tensadapt.registry import Initializer

    def legacy(factorization, network, full, generator):
        """An initialiser written before ``pretrained`` existed."""
        raise AssertionError("not called while validating")

    cp_only = Initializer(
        "cp_noise", "noise for CP", pretrained=False, factorizations=("cp",), function="json:dumps"
    )
    mod = _plugin_module("inits", tensadapt_register_initializers=[legacy, cp_only])
    install(monkeypatch, FakeEntryPoint("inits", mod, "tensadapt-inits"))
    reg = plugins.initializer_registry()
    assert reg.get("legacy").pretrained is True and reg.get("legacy").factorizations is None
    assert reg.get("cp_noise").resolve() is json.dumps  # imported on first use
    rows = {r["name"]: r["description"] for r in plugins.rows() if r["kind"] == "initializer"}
    assert (
        rows["legacy"]
        == "An initialiser written before ``pretrained`` existed. [every format; pretrained, needs a residual]"
    )
    assert rows["cp_noise"] == "noise for CP [cp; no residual]"
    assert ta.load_spec({"factorization": "cp", "init": "cp_noise"}).init == "cp_noise"
    assert ta.load_spec({"init": "legacy", "residual": "frozen"}).get_initializer() is reg.get(
        "legacy"
    )
    with pytest.raises(ta.SpecError) as info:
        ta.load_spec({"factorization": "tucker", "init": "cp_noise", "residual": "frozen"})
    assert {p.path: p.message for p in info.value.problems} == {
        "init": "init 'cp_noise' is not supported by factorization 'tucker'; it supports: "
        "zeros, svd, tenslora, legacy",
        "residual": "residual 'frozen' holds W0 minus a pretrained initialisation, but init is "
        "'cp_noise', which does not start from the pretrained weights (nothing to subtract); "
        "choose a pretrained init such as svd or mpo, or residual: none",
    }
    with pytest.raises(ta.SpecError, match="init 'legacy' starts from the pretrained weights"):
        ta.load_spec({"init": "legacy"})


def test_builtin_initializers_are_data_and_resolve_lazily() -> None:
    from tensadapt._builtin_plugin import BUILTIN_INITIALIZERS

    reg = plugins.initializer_registry()
    assert [e.name for e in reg.loaded()][:5] == ["zeros", "svd", "mpo", "lorta", "tenslora"]
    declared = {i.name: (i.pretrained, i.factorizations) for i in BUILTIN_INITIALIZERS}
    assert declared == {
        "zeros": (False, None),
        "svd": (True, ("lora", "cp", "tucker", "tt")),
        "mpo": (True, ("mpo",)),
        "lorta": (False, ("cp",)),
        "tenslora": (False, ("tucker", "cp")),
    }
    import tensadapt.init

    assert reg.get("svd").resolve() is tensadapt.init.svd
    assert reg.get("mpo").resolve() is tensadapt.init.mpo
    net = ta.factorizations.CP().network(
        [ta.factorizations.Axis("in", 4), ta.factorizations.Axis("out", 3)], 2, None
    )
    zero = reg.get("zeros")("cp", net, None, torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in zero.items()} == {f.name: f.shape for f in net.factors}
    assert ta.factorizations.reconstruct(net, zero).abs().max().item() == 0.0


def test_lookups_load_plugins_only_for_names_the_builtins_lack(monkeypatch) -> None:
    loads: list[str] = []
    mod = _plugin_module("counted", tensadapt_register_factorizations=[Kron2])
    ep = FakeEntryPoint("counted", mod, "tensadapt-counted")
    monkeypatch.setattr(ep, "load", lambda: loads.append("counted") or mod)
    install(monkeypatch, ep)
    ta.load_spec({"factorization": "cp", "init": "svd", "residual": "frozen", "rank": 4})
    assert plugins.family_for("bert").name == "bert"
    assert loads == []  # built-ins only: no plugin imported
    assert ta.load_spec({"factorization": "fake_good"}).factorization == "fake_good"
    assert loads == ["counted"]
    plugins.factorization_registry().names()
    assert loads == ["counted"]  # once


def test_family_lookups_agree(monkeypatch) -> None:
    from tensadapt.arch import family_for, from_config
    from tensadapt.arch.families import known_model_types

    config = types.SimpleNamespace(
        model_type="gpt_neo", num_layers=2, hidden_size=32, num_heads=4, intermediate_size=None
    )
    assert family_for("gpt_neo") is plugins.family_for("gpt_neo")
    assert family_for("gpt_neo") is plugins.architecture_registry().get("gpt_neo")
    assert from_config(config).family == family_for("gpt_neo").name == "gpt_neo"  # type: ignore[union-attr]
    assert "gpt_neo" in known_model_types()
    assert family_for("no_such_model_type") is None


def test_disabled_plugins_are_blocked_in_pluggy(monkeypatch) -> None:
    monkeypatch.setenv(plugins.DISABLE_ENV, "tensadapt-tensor-ring")
    plugins.reset()
    pm = plugins.plugin_manager()
    assert pm.is_blocked("tensor_ring") and not pm.has_plugin("tensor_ring")
    assert pm.has_plugin("gpt_neo") and pm.has_plugin("tensadapt")
    dists = {
        plugin.__name__: dist.metadata["Name"] for plugin, dist in pm.list_plugin_distributions()
    }
    assert dists["tensadapt_gpt_neo"] == "tensadapt-gpt-neo"


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
    assert (
        tuple(
            n
            for n in vars(__import__("tensadapt.hookspecs").hookspecs)
            if n.startswith("tensadapt_")
        )
        == HOOKS
    )


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
