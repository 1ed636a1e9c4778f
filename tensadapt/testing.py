"""Public test helpers for decomposition authors: hypothesis strategies and a conformance suite.

A plugin author calls :func:`check_factorization` from their own tests::

    from tensadapt.testing import check_factorization
    from my_plugin import TensorRing

    def test_conformance():
        check_factorization(TensorRing)

It first probes the format's networks on many random tensor shapes and ranks (hypothesis), then
plans, injects and trains it on tiny random models built from configs (a LLaMA with grouped-query
attention and MLP targets, and a GPT-2 whose fused ``c_attn`` holds q, k and v), for several
stacking-mode subsets, and checks:

0. **shapes**: for random axes (any modes, widths, head counts, stacks) and ranks (integers and
   mappings) that ``check()`` accepts, ``network()`` builds a network whose axes, legs and factor
   shapes agree (:func:`tensadapt.plugin_checks.network_problems`), whose default init
   reconstructs to exactly 0, and whose random factors reconstruct to the tensor's shape -- so a
   format right on the models' one width and wrong on others fails here, not at forward time;
1. **count**: the plan's parameter count equals the adapter's real parameters, factor by factor;
2. **zero-update init**: the default init reconstructs to exactly 0 and the model's output is
   exactly the base model's;
3. **gradients**: after one optimiser step moves the zero factor, every factor gets a non-zero,
   finite gradient;
4. **forward == reconstruction**: with random factors, each adapted module's contracted output
   equals ``base(x) + scaling · x·S`` where ``S`` is sliced from :func:`reconstruct` of the network;
5. **merge / unmerge**: merged output equals the unmerged one, unmerge restores the base weights;
6. **save / load**: ``save_adapter`` then ``load_adapter`` on a fresh model gives the same factors
   and outputs.

A failing check raises :class:`ConformanceError` naming the check, the model and the modes.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .factorizations.base import Axis, Factorization, default_init, reconstruct
from .modes import MODES, tensor_axes
from .plugin_checks import factorization_problems, network_problems

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import nn

    from .planner import TargetPlan, TensorPlan

__all__ = [
    "ConformanceError",
    "MODE_CASES",
    "check_factorization",
    "ranks",
    "single_thread",
    "specs",
    "synthetic_model",
    "tensor_shapes",
]

#: Stacking-mode subsets the conformance suite runs (none, all, and the interesting ones).
MODE_CASES: tuple[tuple[str, ...], ...] = (
    (),
    ("qkv", "depth"),
    ("heads", "qkv", "depth"),
    ("heads",),
)
#: Tiny synthetic models: name -> (config kwargs, targets).
_MODELS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "llama": (
        dict(
            model_type="llama",
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            pad_token_id=0,
        ),
        ("q", "k", "v", "o", "up", "down"),
    ),
    "gpt2": (
        dict(
            model_type="gpt2",
            vocab_size=64,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ("q", "k", "v", "o"),
    ),
}


class ConformanceError(AssertionError):
    """A factorization failed a conformance check; the message names the check and the case."""


# -- hypothesis strategies -------------------------------------------------------------------------
@st.composite
def tensor_shapes(
    draw: st.DrawFn,
    modes: Sequence[str] | None = None,
    max_width: int = 12,
    max_heads: int = 4,
    max_stack: int = 4,
) -> tuple[Axis, ...]:
    """Axes of an update tensor as the planner builds them: ``in``, ``out`` or ``head_dim, heads``,
    then ``qkv`` and ``depth`` when stacked.

    Args:
        modes: stacking modes (default: any subset of ``heads``, ``qkv``, ``depth``).
        max_width: largest ``in`` size.
        max_heads: largest head count (the head side is ``heads x head_dim``, head_dim <= 4).
        max_stack: largest ``qkv`` / ``depth`` size.
    """
    chosen = set(draw(st.sets(st.sampled_from(MODES))) if modes is None else modes)
    heads = draw(st.integers(1, max_heads))
    head_dim = draw(st.integers(1, 4))
    return tensor_axes(
        [m for m in MODES if m in chosen],
        draw(st.integers(1, max_width)),
        heads * head_dim,
        heads if "heads" in chosen else 0,
        draw(st.integers(1, min(3, max_stack))),
        draw(st.integers(1, max_stack)),
    )


def ranks(keys: Sequence[str] = (), max_rank: int = 4) -> st.SearchStrategy[int | dict[str, int]]:
    """Ranks a spec may give: an int in ``1..max_rank``, or (when ``keys`` is not empty, e.g.
    ``factorization.rank_keys(axis_names)``) a mapping over some of the keys plus ``default``."""
    ints = st.integers(1, max_rank)
    if not keys:
        return ints
    mappings = st.builds(
        lambda some, default: {**some, "default": default},
        st.dictionaries(st.sampled_from(list(keys)), ints),
        ints,
    )
    return st.one_of(ints, mappings)


@st.composite
def specs(
    draw: st.DrawFn, factorizations: Sequence[str] | None = None, max_rank: int = 4
) -> dict[str, Any]:
    """Spec dicts :func:`~tensadapt.load_spec` accepts, over the registered factorizations.

    Args:
        factorizations: names to draw from (default: every registered one, plugins included).
        max_rank: largest rank.
    """
    from .plugins import factorization_registry
    from .spec import axis_names

    reg = factorization_registry()
    name = draw(st.sampled_from(list(factorizations or reg.names())))
    modes = draw(st.lists(st.sampled_from(MODES), unique=True))
    targets = draw(st.lists(st.sampled_from(("q", "k", "v", "o")), min_size=1, unique=True))
    keys = reg.get(name).rank_keys(axis_names(modes))
    spec: dict[str, Any] = {
        "factorization": name,
        "targets": targets,
        "modes": modes,
        "rank": draw(ranks(keys, max_rank)),
    }
    alpha = draw(st.none() | st.integers(1, 32))
    if alpha is not None:
        spec["alpha"] = alpha
    return spec


# -- the conformance suite -------------------------------------------------------------------------
def synthetic_model(kind: str = "llama", seed: int = 0) -> nn.Module:
    """A tiny random ``transformers`` model (``llama`` with GQA, or ``gpt2``), eval mode."""
    from transformers import AutoConfig, AutoModel

    kwargs, _ = _MODELS[kind]
    config = AutoConfig.for_model(**kwargs)
    torch.manual_seed(seed)
    return AutoModel.from_config(config).eval()


def check_factorization(
    cls: type[Factorization] | Factorization,
    *,
    options: Mapping[str, object] | None = None,
    rank: int = 2,
    models: Sequence[str] = ("llama", "gpt2"),
    modes: Sequence[Sequence[str]] = MODE_CASES,
    shapes: int = 60,
) -> None:
    """Run every conformance check on ``cls`` (see the module docstring).

    Not from inside a hypothesis test: the shape probe is one (hypothesis does not nest).

    Args:
        cls: the factorization class (or an instance). If its name is not registered (the plugin
            is not installed yet) it is registered for the duration of the checks.
        options: the ``options:`` of the specs used (e.g. ``{"n_cores": 2}`` for ``mpo``).
        rank: the rank used (an int; a mapping case is added when the format takes one).
        models: which synthetic models: ``llama`` (GQA, MLP targets) and/or ``gpt2`` (fused).
        modes: the stacking-mode subsets to check.
        shapes: how many random shapes and ranks the shape probe tries (0: none).

    Raises:
        ConformanceError: a check failed; the message says which, on which model and modes.
    """
    from .spec import axis_names

    klass = cls if isinstance(cls, type) else type(cls)
    problems = factorization_problems(klass)
    if problems:
        raise ConformanceError(f"{klass.__qualname__}: interface: " + "; ".join(problems))
    with _registered(klass) as name, single_thread():
        fact = klass()
        if shapes:
            _probe_shapes(fact, fact.parse_options(options), name, shapes)
        for kind in models:
            _, targets = _MODELS[kind]
            for i, ms in enumerate(modes):
                keys = fact.rank_keys(axis_names(ms))
                r: int | dict[str, int] = rank
                if keys and i % 2 == 1:  # per-key ranks on every other case
                    # "default" covers MLP tensors, which keep ``out`` when heads are split
                    r = {**{k: rank + (j % 2) for j, k in enumerate(keys)}, "default": rank}
                spec = {
                    "factorization": name,
                    "targets": list(targets),
                    "modes": list(ms),
                    "rank": r,
                    "alpha": 2.0 * rank,
                    "options": dict(options or {}),
                }
                _check_case(fact, spec, kind, f"{name} on {kind}, modes {list(ms)}, rank {r}")


def _probe_shapes(fact: Factorization, options: BaseModel, name: str, examples: int) -> None:
    """Check 0 (module docstring) on ``examples`` random shapes and ranks; the first failure,
    shrunk by hypothesis to a small case, is raised as a :class:`ConformanceError`."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,  # a library check: nothing written into the caller's project
        derandomize=True,  # the same cases on every run
        suppress_health_check=list(HealthCheck),
    )
    @given(axes=tensor_shapes(max_width=24, max_heads=5, max_stack=5), data=st.data())
    def probe(axes: tuple[Axis, ...], data: st.DataObject) -> None:
        rank = data.draw(ranks(fact.rank_keys([a.name for a in axes]), max_rank=5), label="rank")
        if fact.check(axes, rank, options):
            return  # the format refuses these sizes itself, with a message
        case = f"{name} on axes {', '.join(f'{a.name}={a.size}' for a in axes)} at rank {rank}"
        net = fact.network(axes, rank, options)
        problems = network_problems(net, axes)
        if problems:
            raise _fail(case, "shapes", "; ".join(problems))
        gen = torch.Generator().manual_seed(0)
        if reconstruct(net, default_init(net, generator=gen)).abs().max().item() != 0.0:
            raise _fail(case, "shapes", "the default init does not reconstruct to 0")
        noise = {f.name: torch.randn(f.shape, generator=gen) for f in net.factors}
        got = tuple(reconstruct(net, noise).shape)
        if got != tuple(a.size for a in axes):
            raise _fail(case, "shapes", f"reconstruction has shape {got}")

    probe()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block: tiny models run fastest so (and do not fight
    a busy machine's other jobs). Plugin test suites use it as a fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _registered(cls: type[Factorization]) -> Iterator[str]:
    from .plugins import factorization_registry

    reg = factorization_registry()
    name = cls.name
    if name in reg:
        have = reg.get(name)
        if type(have) is not cls:
            raise ConformanceError(
                f"{cls.__qualname__}: the name {name!r} is registered to "
                f"{type(have).__module__}.{type(have).__qualname__} "
                f"({reg.entry(name).source}); checking another class under it would test that one"
            )
        yield name
        return
    reg.register(name, cls(), source=f"{cls.__module__} (unregistered)", plugin="testing")
    try:
        yield name
    finally:
        reg.unregister(name)


def _fail(case: str, check: str, msg: str) -> ConformanceError:
    return ConformanceError(f"{case}: {check}: {msg}")


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    vocab = int(getattr(model.config, "vocab_size", 0))
    return {"input_ids": torch.randint(0, vocab, (2, 5), generator=g)}


def _out(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    hidden: torch.Tensor = model(**inputs).last_hidden_state
    return hidden


def _factor_dict(adapter: Any, tensor: str) -> dict[str, torch.Tensor]:
    return dict(adapter.factors[tensor].items())


def _check_case(fact: Factorization, spec: dict[str, Any], kind: str, case: str) -> None:
    import tensadapt as ta

    from .inplace import adapted_modules, get_adapter

    model = synthetic_model(kind)
    inputs = _inputs(model)
    with torch.no_grad():
        base_out = _out(model, inputs)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = ta.plan(spec, model)
    options = fact.parse_options(spec["options"])

    # 1. count == real parameters, factor by factor
    ta.inject(model, plan, seed=0)
    adapter = get_adapter(model)
    for tp in plan.tensors:
        net = fact.network(tp.axes, spec["rank"], options)
        real = {n: tuple(p.shape) for n, p in _factor_dict(adapter, tp.name).items()}
        shapes = {f.name: f.shape for f in net.factors}
        if real != shapes:
            raise _fail(case, "count", f"tensor {tp.name}: factors {real} != network {shapes}")
    real_total = sum(p.numel() for p in adapter.parameters())
    if not (plan.n_params == real_total == ta.trainable_parameters(model)):
        raise _fail(
            case,
            "count",
            f"plan says {plan.n_params} parameters, the adapter has {real_total}, "
            f"{ta.trainable_parameters(model)} are trainable",
        )

    # 2. zero-update init
    for tp in plan.tensors:
        full = reconstruct(tp.network, _factor_dict(adapter, tp.name))
        if full.abs().max().item() != 0.0:
            raise _fail(case, "zero-update init", f"tensor {tp.name} reconstructs to non-zero")
    with torch.no_grad():
        if not torch.equal(_out(model, inputs), base_out):
            raise _fail(case, "zero-update init", "output differs from the base model at step 0")

    # 3. gradients reach every factor once a first step has moved the zero factor
    target = torch.randn(base_out.shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(adapter.parameters(), lr=0.5)
    for step in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(_out(model, inputs), target).backward()
        if step == 0:
            opt.step()
    for tname, fname, p in _factors(adapter):
        g = p.grad
        if g is None or not torch.isfinite(g).all() or g.abs().sum().item() == 0.0:
            raise _fail(case, "gradients", f"factor {tname}.{fname} gets no gradient")
    opt.zero_grad()

    # 4. contracted forward == reconstruction
    _randomize(adapter)
    with torch.no_grad():
        for mname, module in adapted_modules(model):
            got, want = _module_delta(module, adapter)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                err = (got - want).abs().max().item()
                raise _fail(
                    case,
                    "forward == reconstruction",
                    f"module {mname}: contracted update differs from x·reconstruct() by {err:.3g}",
                )

    # 5. merge / unmerge
    with torch.no_grad():
        unmerged = _out(model, inputs)
        if torch.allclose(unmerged, base_out, atol=1e-6):
            raise _fail(case, "merge", "random factors do not change the output")
        ta.merge(model)
        if not torch.allclose(_out(model, inputs), unmerged, rtol=1e-4, atol=1e-5):
            raise _fail(case, "merge", "merged output differs from the unmerged one")
        ta.unmerge(model)
        for mname, module in adapted_modules(model):
            w0 = base_weights[f"{mname}.weight"]
            weight = module.base.weight
            assert isinstance(weight, torch.Tensor)
            if not torch.allclose(weight, w0, rtol=1e-5, atol=1e-6):
                raise _fail(case, "unmerge", f"module {mname}: base weight not restored")
        if not torch.allclose(_out(model, inputs), unmerged, rtol=1e-4, atol=1e-5):
            raise _fail(case, "unmerge", "output after merge+unmerge differs")

    # 6. save / load
    with tempfile.TemporaryDirectory() as tmp:
        ta.save_adapter(model, tmp)
        fresh = synthetic_model(kind)
        ta.load_adapter(fresh, tmp)
    loaded = {(t, f): p for t, f, p in _factors(get_adapter(fresh))}
    for tname, fname, p in _factors(adapter):
        if not torch.equal(loaded[(tname, fname)], p):
            raise _fail(case, "save/load", f"factor {tname}.{fname} differs after loading")
    with torch.no_grad():
        if not torch.allclose(_out(fresh, inputs), unmerged, rtol=1e-5, atol=1e-6):
            raise _fail(case, "save/load", "loaded adapter gives another output")


def _factors(adapter: Any) -> list[tuple[str, str, torch.nn.Parameter]]:
    from .nn import factor_items

    return factor_items(adapter)


def _randomize(adapter: Any, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, p in _factors(adapter):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _module_delta(module: Any, adapter: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(module(x) - base(x), Σ_t scaling · x·S_t)`` for a random ``x`` (S from reconstruct)."""

    from . import fused

    targets = module.targets
    width = targets[0].in_features  # every target of one module reads the same input
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(4))
    got = module(x) - module.base(x)
    want = torch.zeros_like(got)
    for t in targets:
        tp = adapter.plan.tensor(t.tensor)
        full = reconstruct(tp.network, _factor_dict(adapter, tp.name))
        s = _target_matrix(tp, t, full)
        fused.add_into(want, t.fused, 1, adapter.scaling * (x @ s))
    return got, want


def _target_matrix(tp: TensorPlan, t: TargetPlan, full: torch.Tensor) -> torch.Tensor:
    """The target's matrix ``S[in_features, out_features]`` (``update(x) = x·S``) cut from the
    full tensor: stacked axes indexed away, ``heads x head_dim`` flattened heads-outer, write-out
    projections (stored transposed) transposed back."""
    names = [a.name for a in tp.axes]
    index = dict(t.index)
    m = full
    for axis in sorted(index, key=names.index, reverse=True):
        m = m.select(names.index(axis), index[axis])
    rest = [n for n in names if n not in index]
    if rest == ["in", "head_dim", "heads"]:
        m = m.permute(0, 2, 1).reshape(m.shape[0], -1)
    elif rest != ["in", "out"]:
        raise ConformanceError(f"tensor {tp.name}: unexpected axes {rest}")
    if tuple(m.shape) != (
        (t.out_features, t.in_features) if t.transposed else (t.in_features, t.out_features)
    ):
        raise ConformanceError(f"tensor {tp.name}: slice of shape {tuple(m.shape)} for {t.key}")
    return m.T if t.transposed else m
