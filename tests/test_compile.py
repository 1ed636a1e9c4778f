"""``torch.compile`` of a :class:`~tensadapt.model.TensadaptModel` and gradient checkpointing
(issue 10, item 3).

The product: the built-in factorizations (lora, cp, tucker, tt, mpo) × the 8 subsets of the
stacking modes (heads, qkv, depth) × three families built from configs (BERT; GPT-2, whose q, k, v
sit in one fused ``c_attn`` Conv1D; LLaMA with grouped-query attention) = 120 cases, each checked
for: forward and every factor's gradient equal to eager (≤ 1e-5 relative, fp32), one graph (no
graph break anywhere), and no recompilation on a second call.

The default run tests a sample (:data:`SAMPLE`, 10 cases, backend ``aot_eager``): every mode subset
at least once, every factorization at least twice, every family at least three times, and both
left-operand strategies (``route``: ``(x·P_in)·P_out``; ``rebuild``: ``x·S``) besides MPO's
``stages``. The ``inductor`` backend runs on :data:`INDUCTOR_SAMPLE` (1 case: LoRTA on GPT-2's
fused ``c_attn``). ``pytest --full`` (or ``TENSADAPT_FULL=1``) runs the whole product under
``aot_eager`` and under ``inductor``.

Other checks, each on its own sample:
- ``torch._dynamo.explain`` finds no graph break in tensadapt code; breaks elsewhere (none with
  transformers 5 on these families) must be the ones PEFT LoRA has on the same model;
- the frame's sharing survives compilation: the forward graph AOT autograd traces holds exactly
  the matrix products eager runs (``x·P_in`` once for q, k and v), fewer than without the frame;
- adapter dropout: the compiled forward draws one mask per module input, as eager does;
- dynamic shapes: token counts on both sides of a strategy bound, one compiled model;
- ``set_adapter`` / ``disable_adapter`` on a compiled model (recompiles allowed, wrong results not);
- gradient checkpointing (non-reentrant and reentrant) gives the gradients of a plain run.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import model_inputs
from torch import nn

from tensadapt.executor import Program, strategy_bounds
from tensadapt.factorizations import BUILTINS
from tensadapt.model import TensadaptModel, adapted_modules

FACTORIZATIONS = ("lora", "cp", "tucker", "tt", "mpo")
MODES = ("heads", "qkv", "depth")
MODE_SUBSETS = [tuple(c) for k in range(4) for c in itertools.combinations(MODES, k)]
FAMILIES = {"bert": "tiny-bert", "gpt2": "tiny-gpt2", "llama": "tiny-llama"}
TARGETS = ("q", "k", "v", "o")

#: the default sample: (family, factorization, modes, rank, sequence length)
SAMPLE = [
    ("bert", "cp", ("heads", "qkv", "depth"), 3, 7),  # LoRTA
    ("gpt2", "tucker", ("qkv", "depth"), 3, 7),  # TensLoRA's best, fused c_attn
    ("llama", "tt", ("heads", "qkv"), 3, 7),
    ("llama", "mpo", ("depth",), 2, 7),  # stages
    ("gpt2", "lora", (), 3, 7),
    ("bert", "tt", ("heads",), 2, 7),
    ("llama", "lora", ("qkv",), 32, 24),  # rebuild: x·S wins past 33 tokens at rank 32
    ("bert", "mpo", ("heads", "depth"), 2, 7),
    ("gpt2", "cp", ("heads", "qkv"), 2, 7),
    ("llama", "tucker", ("heads", "qkv", "depth"), 2, 7),
]
INDUCTOR_SAMPLE = [("gpt2", "cp", ("heads", "qkv", "depth"), 3, 7)]  # LoRTA on fused c_attn
RTOL = 1e-5


def _full(config: pytest.Config) -> bool:
    opt = config.getoption("--full", default=False)
    return bool(opt) or os.environ.get("TENSADAPT_FULL", "") not in ("", "0")


def _product() -> list[tuple[str, str, tuple[str, ...], int, int]]:
    return [
        (fam, fact, modes, 2, 7)
        for fam in FAMILIES
        for fact in FACTORIZATIONS
        for modes in MODE_SUBSETS
    ]


def _case_id(case: tuple[str, str, tuple[str, ...], int, int]) -> str:
    fam, fact, modes, rank, seq = case
    return f"{fam}-{fact}-{'+'.join(modes) or 'none'}-r{rank}-t{seq}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``case`` is the sample by default, the whole product with ``--full``."""
    if "case" not in metafunc.fixturenames:
        return
    inductor = metafunc.function.__name__.endswith("inductor")
    sample = INDUCTOR_SAMPLE if inductor else SAMPLE
    cases = _product() if _full(metafunc.config) else sample
    metafunc.parametrize("case", cases, ids=[_case_id(c) for c in cases])


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test compiles from scratch: a cached graph or a hit recompile limit (which silently
    falls back to eager) must not carry over from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- building -----------------------------------------------------------------------------------
def _config(preset: str) -> Any:
    """The preset's config with every dropout off (gradients are compared across runs)."""
    from tensadapt.arch import preset_config

    cfg = preset_config(preset)
    for k in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "attention_dropout",
    ):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    return cfg


def _base(family: str, seed: int = 0) -> nn.Module:
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(_config(FAMILIES[family]))


def _spec(fact: str, modes: tuple[str, ...], rank: int) -> dict[str, Any]:
    return {"factorization": fact, "targets": list(TARGETS), "modes": list(modes), "rank": rank}


def _randomize(model: TensadaptModel, seed: int = 3, scale: float = 0.2) -> None:
    """Random non-zero factors: every factor gets a gradient, every update is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter().parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapted(family: str, fact: str, modes: tuple[str, ...], rank: int) -> TensadaptModel:
    model = TensadaptModel(_base(family), _spec(fact, modes, rank), seed=0)
    _randomize(model)
    return model.train()


def _inputs(model: nn.Module, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    return model_inputs(model, batch=2, seq=seq, seed=seed)


# -- running --------------------------------------------------------------------------------------
def _loss(out: Any) -> torch.Tensor:
    h = out.last_hidden_state
    return (h @ torch.linspace(-1, 1, h.shape[-1])).pow(2).mean()


def _step(
    run: Callable[..., Any], params: dict[str, nn.Parameter], inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward: ``(last hidden state, gradient of every parameter)``."""
    for p in params.values():
        p.grad = None
    out = run(**inputs)
    _loss(out).backward()
    grads = {}
    for n, p in params.items():
        assert p.grad is not None, f"{n}: no gradient"
        grads[n] = p.grad.detach().clone()
        p.grad = None
    return out.last_hidden_state.detach(), grads


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _assert_same(
    got: tuple[torch.Tensor, dict[str, torch.Tensor]],
    want: tuple[torch.Tensor, dict[str, torch.Tensor]],
    what: str,
) -> None:
    assert _rel(got[0], want[0]) <= RTOL, f"{what}: outputs differ by {_rel(got[0], want[0]):.2e}"
    assert got[1].keys() == want[1].keys()
    for n in want[1]:
        assert want[1][n].norm() > 0, f"{what}: {n} has a zero gradient (the check would be void)"
        err = _rel(got[1][n], want[1][n])
        assert err <= RTOL, f"{what}: gradient of {n} differs by {err:.2e}"


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class _Counting:
    """A dynamo backend that counts the graphs it is given and hands them to ``inner``."""

    def __init__(self, inner: str) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return self.inner(gm, example_inputs)


def _strategies(model: TensadaptModel, tokens: int) -> set[str]:
    return {t.strategy(tokens) for t in model.plan().targets}


# -- the matrix ------------------------------------------------------------------------------------
def _check_case(case: tuple[str, str, tuple[str, ...], int, int], backend: str) -> set[str]:
    fam, fact, modes, rank, seq = case
    model = _adapted(fam, fact, modes, rank)
    params = _trainable(model)
    inputs = _inputs(model, seq)
    eager = _step(model, params, inputs)
    counting = _Counting(backend)
    compiled = torch.compile(model, backend=counting)
    _assert_same(_step(compiled, params, inputs), eager, f"{_case_id(case)} first call")
    assert counting.graphs == 1, f"{counting.graphs} graphs: a graph break"
    _assert_same(_step(compiled, params, inputs), eager, f"{_case_id(case)} second call")
    assert counting.graphs == 1, "the second call with the same shapes recompiled"
    return _strategies(model, inputs["input_ids"].numel())


def test_compiled_equals_eager(case: tuple[str, str, tuple[str, ...], int, int]) -> None:
    """Forward and gradients of ``torch.compile(model)`` (aot_eager) equal eager's."""
    _check_case(case, "aot_eager")


def test_compiled_equals_eager_inductor(case: tuple[str, str, tuple[str, ...], int, int]) -> None:
    """The same under inductor (C++ kernels generated on this CPU)."""
    _check_case(case, "inductor")


def test_sample_covers_the_product() -> None:
    """The documented sample reaches every factorization, mode subset, family and strategy."""
    assert {c.name for c in BUILTINS} == set(FACTORIZATIONS)
    assert len(MODE_SUBSETS) == 8
    assert {c[2] for c in SAMPLE} == set(MODE_SUBSETS)
    assert collections.Counter(c[1] for c in SAMPLE).keys() == set(FACTORIZATIONS)
    assert min(collections.Counter(c[1] for c in SAMPLE).values()) >= 2
    assert min(collections.Counter(c[0] for c in SAMPLE).values()) >= 3
    seen: set[str] = set()
    for fam, fact, modes, rank, seq in SAMPLE:
        p = TensadaptModel(_base(fam), _spec(fact, modes, rank)).plan()
        seen |= {t.strategy(2 * seq) for t in p.targets}
    assert seen == {"route", "rebuild", "stages"}


# -- graph breaks ------------------------------------------------------------------------------
def _breaks(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    """``(reason, files of the user stack)`` of every graph break ``explain`` finds."""
    torch._dynamo.reset()
    exp = torch._dynamo.explain(model)(**inputs)
    return [(b.reason, [f.filename for f in b.user_stack]) for b in exp.break_reasons]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_graph_break_in_tensadapt_code(family: str) -> None:
    """``explain`` finds no break whose stack passes through tensadapt; any other break (in
    transformers' own code) is one PEFT LoRA has too on the same model."""
    import peft

    import tensadapt

    root = os.path.dirname(tensadapt.__file__)
    model = _adapted(family, "cp", ("heads", "qkv", "depth"), 2)
    inputs = _inputs(model)
    ours = _breaks(model, inputs)
    in_tensadapt = [r for r, files in ours if any(f.startswith(root) for f in files)]
    assert not in_tensadapt, in_tensadapt
    targets = {
        "bert": ["query", "key", "value"],
        "gpt2": ["c_attn"],
        "llama": ["q_proj", "k_proj", "v_proj"],
    }
    lora = peft.get_peft_model(
        _base(family),
        peft.LoraConfig(
            r=2, target_modules=targets[family], lora_dropout=0.0, fan_in_fan_out=family == "gpt2"
        ),
    ).train()
    theirs = _breaks(lora, inputs)
    assert sorted(r for r, _ in ours) == sorted(r for r, _ in theirs)


# -- sharing ------------------------------------------------------------------------------------
_MM = {
    torch.ops.aten.mm.default: (0, 1),
    torch.ops.aten.addmm.default: (1, 2),
    torch.ops.aten.addmm_.default: (1, 2),
    torch.ops.aten.bmm.default: (0, 1),
}
Products = collections.Counter[tuple[tuple[int, ...], tuple[int, ...]]]


def _eager_products(run: Callable[[], Any]) -> Products:
    """The matrix products (operand shapes) an eager forward dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: Products = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
            if func in _MM:
                i, j = _MM[func]
                found[(tuple(args[i].shape), tuple(args[j].shape))] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return found


def _compiled_products(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Products:
    """The matrix products in the forward graph AOT autograd traces for the compiled model."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm)
    torch.compile(model, backend=backend)(**inputs)
    assert len(graphs) == 1
    found: Products = collections.Counter()
    for node in graphs[0].graph.nodes:
        if node.op == "call_function" and node.target in _MM:
            i, j = _MM[node.target]
            a, b = node.args[i].meta["val"], node.args[j].meta["val"]
            found[(tuple(a.shape), tuple(b.shape))] += 1
    return found


def _input_products(model: TensadaptModel, tokens: int) -> int:
    """How many ``x·P_in`` a forward with the frame runs: one per layer, module input and
    ``in_key`` (q, k and v read the same input; o reads its own)."""
    return len(
        {
            (t.layer, "qkv" if t.proj in ("q", "k", "v") else t.proj, t.route.in_key)
            for t in model.plan().targets
            if t.route is not None and t.strategy(tokens) == "route"
        }
    )


@pytest.mark.parametrize(
    ("family", "fact", "modes"),
    [
        ("bert", "cp", ("heads", "qkv", "depth")),
        ("llama", "tucker", ("qkv", "depth")),
        ("gpt2", "tt", ("qkv",)),
    ],
)
def test_sharing_survives_compilation(family: str, fact: str, modes: tuple[str, ...]) -> None:
    """The compiled forward graph holds exactly eager's matrix products, with ``x·P_in`` once per
    layer for q, k and v: fewer products than the same model run without the frame."""
    model = _adapted(family, fact, modes, 3)  # rank 3: no base product has a dimension 3, 9, 27
    inputs = _inputs(model)
    tokens = inputs["input_ids"].numel()
    with_frame = _eager_products(lambda: model(**inputs))
    without = _eager_products(lambda: model.base_model(**inputs))
    compiled = _compiled_products(model, inputs)
    assert compiled == with_frame
    d = model.config.hidden_size
    ranks = {t.route.rank for t in model.plan().targets if t.route is not None}
    x_p_in = sum(v for (a, b), v in compiled.items() if a == (tokens, d) and b[1] in ranks)
    assert x_p_in == _input_products(model, tokens)
    if family != "gpt2":  # GPT-2's q, k, v share one module: one product even without the frame
        assert sum(with_frame.values()) < sum(without.values())
        assert x_p_in < sum(1 for t in model.plan().targets if t.proj in TARGETS)


def _random_ops(names: collections.Counter[str]) -> int:
    return sum(v for k, v in names.items() if "bernoulli" in k or "dropout" in k)


def test_dropout_masks_shared_under_compile() -> None:
    """With adapter dropout, the compiled forward draws one mask per module input (q, k and v
    share theirs), as eager does with the frame, and fewer than without it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch.utils._python_dispatch import TorchDispatchMode

    spec = _spec("cp", ("heads", "qkv", "depth"), 2)
    model = TensadaptModel(_base("bert"), {**spec, "dropout": 0.1}, seed=0).train()
    inputs = _inputs(model)

    def eager_ops(run: Callable[[], Any]) -> collections.Counter[str]:
        found: collections.Counter[str] = collections.Counter()

        class Names(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
                found[str(func)] += 1
                return func(*args, **(kwargs or {}))

        with Names():
            run()
        return found

    graphs: list[torch.fx.GraphModule] = []
    backend = aot_autograd(
        fw_compiler=lambda gm, _: graphs.append(gm) or gm, bw_compiler=lambda gm, _: gm
    )
    torch.compile(model, backend=backend)(**inputs)
    assert len(graphs) == 1
    compiled = collections.Counter(
        str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"
    )
    with_frame = _random_ops(eager_ops(lambda: model(**inputs)))
    without = _random_ops(eager_ops(lambda: model.base_model(**inputs)))
    layers = model.config.num_hidden_layers
    assert _random_ops(compiled) == with_frame == 2 * layers  # q/k/v's input, o's input
    assert without == 4 * layers


# -- strategies, bounds and dynamic shapes --------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "fact", "modes", "rank"),
    [
        ("bert", "lora", (), 32),
        ("llama", "tucker", ("heads", "qkv", "depth"), 24),
        ("gpt2", "mpo", ("qkv",), 4),
    ],
)
def test_program_regimes_match_strategy(
    family: str, fact: str, modes: tuple[str, ...], rank: int
) -> None:
    """A module's :class:`Program` picks, at every token count, the grouping the planner's
    strategy gives (checked around every bound and far beyond)."""
    model = _adapted(family, fact, modes, rank)
    ex = model.adapter().executor
    for _, mod in adapted_modules(model.base_model):
        targets = mod.adapter_targets["default"]
        prog = ex.program(targets)
        assert isinstance(prog, Program)
        assert ex.program(targets) is prog  # built once, when the targets were set
        probes = {0, 1, 2, 7, 10**6, 10**9}
        for b in {b for t in targets for b in strategy_bounds(t)}:
            probes |= {b - 1, b, b + 1}
        for n in sorted(probes):
            regime = prog.at(n)
            got = {(g.kind, tuple(t.key for t in g.targets)) for g in regime.groups}
            got |= {("stages", (t.key,)) for t in regime.stages}  # each target on its own
            want = {(kind, tuple(t.key for t in group)) for kind, group in ex.groups(targets, n)}
            assert got == want, n


def test_dynamic_shapes_across_a_strategy_bound() -> None:
    """One compiled model on token counts below and above a strategy bound (route below,
    rebuild above), with torch's default automatic dynamic shapes: equal to eager each time; the
    second length recompiles once as a dynamic graph, which serves every length below the bound;
    crossing the bound compiles the other regime once (a guard ``n < bound``, not a re-plan)."""
    model = _adapted("bert", "lora", ("qkv",), 32)
    params = _trainable(model)
    (bound,) = {b for t in model.plan().targets for b in strategy_bounds(t)}
    counting = _Counting("aot_eager")
    compiled = torch.compile(model, backend=counting)
    graphs = []
    for seq in (5, 8, 12, 30, 40):  # 2 rows each: 10, 16, 24 tokens < bound; 60, 80 > bound
        inputs = _inputs(model, seq)
        _assert_same(_step(compiled, params, inputs), _step(model, params, inputs), f"seq {seq}")
        graphs.append(counting.graphs)
    assert 2 * 12 < bound < 2 * 30
    assert graphs == [1, 2, 2, 3, 3]


# -- switching adapters --------------------------------------------------------------------------
def test_set_and_disable_adapter_under_compile() -> None:
    """``set_adapter`` and ``disable_adapter`` change what a compiled model computes exactly as
    they do in eager (a recompile is fine; a stale graph is not)."""
    model = _adapted("llama", "cp", ("heads", "qkv", "depth"), 2)
    model.add_adapter("other", _spec("tucker", ("qkv", "depth"), 2), seed=1)
    model.set_adapter("other")
    _randomize(model, seed=5)
    model.set_adapter("default")
    model.eval()
    inputs = _inputs(model)
    with torch.no_grad():
        want = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            want[name] = model(**inputs).last_hidden_state
        with model.disable_adapter():
            want["off"] = model(**inputs).last_hidden_state
        model.set_adapter("default")
        assert _rel(want["default"], want["other"]) > 1e-3
        assert _rel(want["default"], want["off"]) > 1e-3
        compiled = torch.compile(model, backend="aot_eager")
        for step in ("default", "other", "off", "default", "other"):
            if step == "off":
                with model.disable_adapter():
                    got = compiled(**inputs).last_hidden_state
            else:
                model.set_adapter(step)
                got = compiled(**inputs).last_hidden_state
            assert _rel(got, want[step]) <= RTOL, step


# -- gradient checkpointing -------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    ("family", "fact", "modes"),
    [
        ("bert", "cp", ("heads", "qkv", "depth")),
        ("bert", "mpo", ("qkv",)),
        ("llama", "tucker", ("qkv", "depth")),
        ("llama", "lora", ()),
    ],
)
def test_gradient_checkpointing_same_gradients(
    family: str, fact: str, modes: tuple[str, ...], reentrant: bool
) -> None:
    """``gradient_checkpointing_enable()`` (transformers' default non-reentrant, and reentrant)
    gives the outputs and gradients of the same model without it (dropout off)."""
    model = _adapted(family, fact, modes, 2)
    params = _trainable(model)
    inputs = _inputs(model)
    want = _step(model, params, inputs)
    with pytest.warns(FutureWarning):  # transformers 5: activation_checkpointing_enable's alias
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
    assert model.is_activation_checkpointing and model.training
    results = []
    calls = _count_checkpoints(model, lambda: results.append(_step(model, params, inputs)))
    assert calls == model.config.num_hidden_layers  # every layer really was checkpointed
    _assert_same(results[0], want, f"checkpointing (reentrant={reentrant})")


def _count_checkpoints(model: nn.Module, run: Callable[[], Any]) -> int:
    """How many times ``torch.utils.checkpoint.checkpoint`` runs during ``run()``."""
    funcs = [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False)
        and hasattr(m, "_gradient_checkpointing_func")
    ]
    calls = 0
    originals = {id(m): m._gradient_checkpointing_func for m in funcs}

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return f(*args, **kwargs)

        return counted

    for m in funcs:
        m._gradient_checkpointing_func = wrap(originals[id(m)])
    try:
        run()
    finally:
        for m in funcs:
            m._gradient_checkpointing_func = originals[id(m)]
    return calls
