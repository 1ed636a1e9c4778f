"""Architecture adapters, checked against real (tiny, random) transformers modules."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from tensadapt.arch import (
    BUILTIN_FAMILIES,
    PRESETS,
    PROJECTIONS,
    Architecture,
    from_config,
    from_model,
    get_module,
    load_config,
    preset_config,
    resolve_modules,
    scan_model,
)
from tensadapt.arch.scan import classify
from tensadapt.errors import ArchitectureError

_BERTISH = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
)
_DECODER = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)

# (model_type, config kwargs, expected family, task head class, head_dim, kv heads, projections)
QKVO_MLP = ("q", "k", "v", "o", "up", "down")
GATED = ("q", "k", "v", "o", "up", "gate", "down")
CASES: list[tuple[str, dict[str, Any], str, Any, int, int, tuple[str, ...]]] = [
    ("bert", _BERTISH, "bert", AutoModelForSequenceClassification, 8, 4, QKVO_MLP),
    ("roberta", _BERTISH, "bert", AutoModelForSequenceClassification, 8, 4, QKVO_MLP),
    ("xlm-roberta", _BERTISH, "bert", AutoModelForSequenceClassification, 8, 4, QKVO_MLP),
    ("camembert", _BERTISH, "bert", AutoModelForSequenceClassification, 8, 4, QKVO_MLP),
    (
        "electra",
        {**_BERTISH, "embedding_size": 16},
        "bert",
        AutoModelForSequenceClassification,
        8,
        4,
        QKVO_MLP,
    ),
    (
        "distilbert",
        dict(n_layers=2, dim=32, n_heads=4, hidden_dim=64, vocab_size=100),
        "distilbert",
        AutoModelForSequenceClassification,
        8,
        4,
        QKVO_MLP,
    ),
    (
        "gpt2",
        dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, pad_token_id=0)
        | dict(bos_token_id=0, eos_token_id=0),
        "gpt2",
        AutoModelForCausalLM,
        8,
        4,
        QKVO_MLP,
    ),
    ("llama", _DECODER, "llama", AutoModelForCausalLM, 8, 2, GATED),
    ("mistral", _DECODER, "llama", AutoModelForSequenceClassification, 8, 2, GATED),
    ("qwen2", _DECODER, "llama", AutoModelForCausalLM, 8, 2, GATED),
    # head_dim 16 != hidden/heads = 8: q is 32 -> 64 and o is 64 -> 32
    ("qwen3", {**_DECODER, "head_dim": 16}, "llama", AutoModelForCausalLM, 16, 2, GATED),
    ("gemma", {**_DECODER, "head_dim": 16}, "llama", AutoModelForCausalLM, 16, 2, GATED),
    ("gemma2", {**_DECODER, "head_dim": 16}, "llama", AutoModelForCausalLM, 16, 2, GATED),
    ("gemma3_text", {**_DECODER, "head_dim": 16}, "llama", AutoModelForCausalLM, 16, 2, GATED),
    ("phi3", _DECODER, "phi3", AutoModelForCausalLM, 8, 2, GATED),
    (
        "opt",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=100,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
        "opt",
        AutoModelForCausalLM,
        8,
        4,
        QKVO_MLP,
    ),
    (
        "vit",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        "vit",
        AutoModelForImageClassification,
        8,
        4,
        QKVO_MLP,
    ),
]
IDS = [c[0] for c in CASES]


def _config(model_type: str, kwargs: dict[str, Any]) -> Any:
    return AutoConfig.for_model(model_type, **kwargs)


def _linear_dims(module: nn.Module, layout: str) -> tuple[int, int]:
    """(in, out) from the real weight: nn.Linear is [out, in], GPT-2 Conv1D is [in, out]."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    rows, cols = (int(n) for n in weight.shape)
    return (rows, cols) if layout == "conv1d" else (cols, rows)


def _assert_fits(model: nn.Module, arch: Architecture) -> None:
    """Every site resolves to one module whose weight has the site's widths."""
    names = resolve_modules(model, arch, check_shapes=False)
    assert set(names) == {(s.layer, s.proj) for s in arch.sites}
    for site in arch.sites:
        name = names[(site.layer, site.proj)]
        assert name == site.module or name.endswith("." + site.module)
        d_in, d_out = _linear_dims(get_module(model, name), site.layout)
        assert d_in == site.in_features, site
        if site.out_slice is None:
            assert d_out == site.out_features, site
        else:
            start, stop = site.out_slice
            assert stop - start == site.out_features and stop <= d_out, site
    # the fused projections of one module tile its output columns exactly
    fused: dict[str, list[tuple[int, int]]] = {}
    layouts: dict[str, str] = {}
    for site in arch.sites:
        if site.out_slice is not None:
            name = names[(site.layer, site.proj)]
            fused.setdefault(name, []).append(site.out_slice)
            layouts[name] = site.layout
    for name, slices in fused.items():
        slices.sort()
        assert slices[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
        assert slices[-1][1] == _linear_dims(get_module(model, name), layouts[name])[1]
    resolve_modules(model, arch)  # and the built-in shape check agrees


@pytest.mark.parametrize(
    ("model_type", "kwargs", "family", "head_cls", "hd", "kv", "projs"), CASES, ids=IDS
)
def test_family_matches_real_modules(
    model_type: str,
    kwargs: dict[str, Any],
    family: str,
    head_cls: Any,
    hd: int,
    kv: int,
    projs: tuple[str, ...],
) -> None:
    config = _config(model_type, kwargs)
    arch = from_config(config)
    assert arch.family == family
    assert arch.model_type == config.model_type
    assert (arch.n_layers, arch.hidden_size, arch.n_heads) == (2, 32, 4)
    assert (arch.head_dim, arch.n_kv_heads) == (hd, kv)
    assert arch.projections == projs
    assert len(arch.sites) == 2 * len(projs)
    assert [(s.layer, s.proj) for s in arch.sites] == [(i, p) for i in range(2) for p in projs]

    for site in arch.sites:
        if site.proj in ("q", "o"):
            assert site.n_heads == 4
        elif site.proj in ("k", "v"):
            assert site.n_heads == kv
        else:
            assert site.n_heads == 0 and site.head_side is None
    assert {s.head_side for s in arch.sites if s.proj in "qkv"} == {"out"}
    assert {s.head_side for s in arch.sites if s.proj == "o"} == {"in"}
    q, k, o = arch.site(0, "q"), arch.site(0, "k"), arch.site(0, "o")
    assert (q.in_features, q.out_features) == (32, 4 * hd)
    assert (k.in_features, k.out_features) == (32, kv * hd)
    assert (o.in_features, o.out_features) == (4 * hd, 32)

    backbone = AutoModel.from_config(config)  # real CPU weights, tiny
    _assert_fits(backbone, arch)
    assert from_model(backbone) == arch

    with torch.device("meta"):  # task head: paths under a prefix (bert., transformer., model.)
        headed = head_cls.from_config(config)
    _assert_fits(headed, arch)
    assert from_model(headed) == arch


def test_gpt2_fused_c_attn_slices_are_q_k_v() -> None:
    arch = from_config(preset_config("tiny-gpt2"))
    q, k, v = (arch.site(1, p) for p in "qkv")
    assert q.module == k.module == v.module == "h.1.attn.c_attn"
    assert (q.out_slice, k.out_slice, v.out_slice) == ((0, 32), (32, 64), (64, 96))
    assert {s.layout for s in arch.sites} == {"conv1d"}
    assert arch.site(0, "o").module == "h.0.attn.c_proj"
    assert arch.site(0, "up").module == "h.0.mlp.c_fc" and arch.intermediate_size == 128
    assert arch.site(0, "down").module == "h.0.mlp.c_proj"

    # the slices really are GPT-2's split: query/key/value = c_attn(x).split(d, dim=-1)
    model = AutoModel.from_config(preset_config("tiny-gpt2")).eval()
    c_attn = model.h[1].attn.c_attn
    x = torch.randn(3, 32)
    out = c_attn(x)
    for site in (q, k, v):
        start, stop = site.out_slice or (0, 0)
        w = c_attn.weight[:, start:stop]  # Conv1D: [in, out]
        torch.testing.assert_close(out[:, start:stop], x @ w + c_attn.bias[start:stop])


def test_phi3_fused_qkv_and_gate_up_with_gqa() -> None:
    arch = from_config(_config("phi3", _DECODER))
    assert [arch.site(0, p).out_slice for p in ("q", "k", "v")] == [(0, 32), (32, 48), (48, 64)]
    assert [arch.site(0, p).out_slice for p in ("gate", "up")] == [(0, 64), (64, 128)]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_weightless(name: str) -> None:
    """A preset plans from its config alone: no module is built (time: benchmarks/bench_arch.py)."""
    built: list[str] = []
    original = nn.Module.__init__

    def spy(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    config = preset_config(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Module, "__init__", spy)
        arch = from_config(config)
    assert built == []
    assert len(arch.sites) == arch.n_layers * len(arch.projections)
    assert arch.model_type == PRESETS[name]["model_type"]


def test_llama3_8b_facts() -> None:
    arch = from_config(load_config("llama3-8b"))
    assert (arch.family, arch.n_layers, arch.hidden_size) == ("llama", 32, 4096)
    assert (arch.n_heads, arch.n_kv_heads, arch.head_dim) == (32, 8, 128)
    assert arch.intermediate_size == 14336
    k = arch.site(31, "k")
    assert (k.module, k.in_features, k.out_features, k.n_heads) == (
        "layers.31.self_attn.k_proj",
        4096,
        1024,
        8,
    )


def test_large_preset_facts() -> None:
    arch = from_config(preset_config("llama3-70b"))
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, len(arch.sites)) == (80, 64, 8, 560)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-vit", "minilm"])
def test_small_presets_build_and_fit(name: str) -> None:
    config = preset_config(name)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    _assert_fits(model, from_config(config))


def test_gemma_preset_head_dim_differs_from_hidden_over_heads() -> None:
    arch = from_config(preset_config("gemma-2b"))
    assert (arch.head_dim, arch.n_kv_heads) == (256, 1)
    assert arch.site(0, "q").out_features == 8 * 256 == arch.site(0, "o").in_features


# --- fallback: families the table does not know ---------------------------------------------

FALLBACK: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "gpt_neo",
        dict(
            num_layers=2,
            hidden_size=32,
            num_heads=4,
            vocab_size=100,
            attention_types=[[["global", "local"], 1]],
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        "h.1.attn.attention.q_proj",
        "h.1.attn.attention.out_proj",
    ),
    (
        "xglm",
        dict(num_layers=2, d_model=32, attention_heads=4, ffn_dim=64, vocab_size=100),
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.out_proj",
    ),
    (
        "biogpt",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
        ),
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.out_proj",
    ),
]


@pytest.mark.parametrize(
    ("model_type", "kwargs", "q_path", "o_path"), FALLBACK, ids=[f[0] for f in FALLBACK]
)
def test_fallback_scan_on_unknown_family(
    model_type: str, kwargs: dict[str, Any], q_path: str, o_path: str
) -> None:
    assert all(model_type not in f.model_types for f in BUILTIN_FAMILIES)
    config = _config(model_type, kwargs)
    # only the built-in families: installed plugins (tensadapt-gpt-neo) must not hide the fallback
    arch = from_config(config, families=BUILTIN_FAMILIES)  # built on meta and scanned
    assert (arch.family, arch.model_type) == ("generic", model_type)
    assert (arch.n_layers, arch.hidden_size, arch.n_heads, arch.n_kv_heads) == (2, 32, 4, 4)
    assert (arch.head_dim, arch.intermediate_size) == (8, 64)
    assert arch.projections == QKVO_MLP
    assert arch.site(1, "q").module == q_path and arch.site(1, "o").module == o_path
    assert arch.site(1, "o").head_side == "in" and arch.site(1, "k").n_heads == 4

    model = AutoModelForCausalLM.from_config(config)
    assert from_model(model, families=BUILTIN_FAMILIES) == arch  # task-head prefix stripped
    _assert_fits(model, arch)


def test_fallback_prefers_first_stack_and_self_attention() -> None:
    """The scan (a T5 model with the family table bypassed) keeps one layer list, the first of
    equal size, and self- before cross-attention."""
    config = _config(
        "t5", dict(num_layers=2, d_model=32, num_heads=4, d_ff=64, d_kv=8, vocab_size=100)
    )
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    arch = scan_model(model)
    assert arch.n_layers == 2 and arch.projections == QKVO_MLP
    assert arch.site(0, "q").module == "encoder.block.0.layer.0.SelfAttention.q"
    assert arch.site(1, "down").module == "encoder.block.1.layer.1.DenseReluDense.wo"


@pytest.mark.parametrize(
    ("path", "proj"),
    [
        ("attention.self.query", "q"),
        ("attention.output.dense", "o"),
        ("output.dense", "down"),
        ("intermediate.dense", "up"),
        ("attn.c_proj", "o"),
        ("mlp.c_proj", "down"),
        ("layer.0.SelfAttention.o", "o"),
        ("layer.1.DenseReluDense.wo", "down"),
        ("mixer.out_proj", None),
        ("mlp.gate_proj", "gate"),
        ("attention.k_lin", "k"),
        ("classifier", None),
    ],
)
def test_name_rules(path: str, proj: str | None) -> None:
    assert classify(path) == proj


def test_fallback_gives_helpful_error_without_attention() -> None:
    config = _config(
        "mamba", dict(num_hidden_layers=2, hidden_size=32, state_size=4, vocab_size=100)
    )
    with pytest.raises(ArchitectureError) as info:
        from_config(config)
    message = str(info.value)
    assert "'mamba'" in message and "8 linear modules" in message
    assert "layers.0.mixer.in_proj" in message

    class MLPOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))

    with pytest.raises(ArchitectureError, match=r"MLPOnly.*3 linear modules.*blocks\.0\.0"):
        from_model(MLPOnly())


def test_unbuildable_unknown_config() -> None:
    from transformers import PretrainedConfig

    with pytest.raises(ArchitectureError, match="not a known family") as info:
        from_config(PretrainedConfig())
    assert len(str(info.value)) < 1000  # transformers' list of every config class is cut


# --- layouts and resolution --------------------------------------------------------------------


def _tree(paths: dict[str, nn.Module]) -> nn.Module:
    """A module tree holding ``paths`` (dotted names, numeric parts included)."""
    root = nn.Module()
    for path, leaf in paths.items():
        node = root
        *parents, last = path.split(".")
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(last, leaf)
    return root


def test_from_model_picks_the_layout_present_in_the_model() -> None:
    """Old (transformers 4.x) ViT names resolve too, through the family's second layout."""
    config = preset_config("tiny-vit")
    leaves = {
        "attention.attention.query": (32, 32),
        "attention.attention.key": (32, 32),
        "attention.attention.value": (32, 32),
        "attention.output.dense": (32, 32),
        "intermediate.dense": (32, 64),
        "output.dense": (64, 32),
    }
    model = _tree(
        {
            f"vit.encoder.layer.{i}.{leaf}": nn.Linear(*dims)
            for i in range(2)
            for leaf, dims in leaves.items()
        }
    )
    model.config = config  # type: ignore[assignment]
    arch = from_model(model)
    assert arch.family == "vit"
    assert arch.site(1, "q").module == "encoder.layer.1.attention.attention.query"
    _assert_fits(model, arch)
    # and the config alone gives the layout installed transformers builds (transformers 5.0
    # still names ViT's projections attention.attention.query; later 5.x, attention.q_proj)
    built = AutoModel.from_config(config)
    _assert_fits(built, from_config(config))
    assert from_config(config).site(1, "q").module in dict(built.named_modules())


def test_resolve_reports_missing_ambiguous_and_misshaped() -> None:
    bert = from_config(preset_config("tiny-bert"))
    with torch.device("meta"):
        llama = AutoModel.from_config(preset_config("tiny-llama"))
        two = nn.ModuleDict(
            {
                "a": AutoModel.from_config(preset_config("tiny-bert")),
                "b": AutoModel.from_config(preset_config("tiny-bert")),
            }
        )
        narrow = preset_config("tiny-bert")
        narrow.intermediate_size = 48
        wide = AutoModel.from_config(narrow)
    with pytest.raises(
        ArchitectureError, match=r"no module 'encoder\.layer\.0\.attention\.self\.query'"
    ):
        resolve_modules(llama, bert)
    with pytest.raises(ArchitectureError, match=r"ambiguous: a\.encoder.*b\.encoder"):
        resolve_modules(two, bert)
    with pytest.raises(
        ArchitectureError,
        match=r"intermediate\.dense \(up\): expected in 32, out 64, found in 32, out 48",
    ):
        resolve_modules(wide, bert)
    assert len(resolve_modules(wide, bert, check_shapes=False)) == len(bert.sites)


def test_get_module() -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config("tiny-llama"))
    assert isinstance(get_module(model, "model.layers.1.mlp.gate_proj"), nn.Linear)
    with pytest.raises(ArchitectureError, match="no module 'model.layers.9'"):
        get_module(model, "model.layers.9")


# --- configs -----------------------------------------------------------------------------------


def test_load_config_from_preset_directory_and_file(tmp_path: Any) -> None:
    config = load_config("tiny-llama")
    assert config.num_key_value_heads == 2
    config.save_pretrained(tmp_path)
    for where in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        loaded = load_config(where)
        assert from_config(loaded) == from_config(config)


def test_load_config_errors(tmp_path: Any) -> None:
    with pytest.raises(ArchitectureError, match=r"unknown preset 'llama9'") as info:
        load_config("llama9")
    assert all(name in str(info.value) for name in PRESETS)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArchitectureError, match="cannot read a transformers config"):
        load_config(tmp_path)


def test_presets_return_fresh_configs() -> None:
    a, b = preset_config("tiny-bert"), preset_config("tiny-bert")
    a.num_hidden_layers = 7
    assert b.num_hidden_layers == 2 and from_config(preset_config("tiny-bert")).n_layers == 2


# --- the family table -------------------------------------------------------------------------


def test_family_table_is_consistent() -> None:
    seen: dict[str, str] = {}
    for family in BUILTIN_FAMILIES:
        assert family.layouts
        for mt in family.model_types:
            assert mt not in seen, f"{mt} in {seen.get(mt)} and {family.name}"
            seen[mt] = family.name
        for layout in family.layouts:
            assert bool(layout.paths) != bool(layout.stacks)  # the shorthand, or stacks
            for stack in layout.all_stacks():
                assert set(stack.paths) <= set(PROJECTIONS)
                assert {"q", "k", "v", "o"} <= set(stack.paths)
                assert all("{l}" in t for t in stack.paths.values())
                assert set(stack.interleave) <= set(stack.paths.values())
    assert len({f.name for f in BUILTIN_FAMILIES}) == len(BUILTIN_FAMILIES)


def test_custom_family_is_one_entry() -> None:
    from tensadapt.arch import Family, Layout

    neo = Family(
        "neo",
        ("gpt_neo",),
        (
            Layout(
                {
                    "q": "h.{l}.attn.attention.q_proj",
                    "k": "h.{l}.attn.attention.k_proj",
                    "v": "h.{l}.attn.attention.v_proj",
                    "o": "h.{l}.attn.attention.out_proj",
                }
            ),
        ),
        n_heads=("num_heads",),
    )
    config = _config("gpt_neo", FALLBACK[0][1])
    arch = from_config(config, families=(*BUILTIN_FAMILIES, neo))
    assert arch.family == "neo" and arch.projections == ("q", "k", "v", "o")
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    _assert_fits(model, arch)
    assert from_model(model, families=(neo,)) == arch


# --- the README's coverage table ----------------------------------------------------------------


def test_readme_coverage_table_is_generated_from_the_family_table() -> None:
    """The README's table is exactly what the family table generates (it cannot drift)."""
    from pathlib import Path

    from tensadapt.arch import coverage

    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert coverage.replace_section(text, coverage.table()) == text, (
        "README's coverage table is stale: run python -m tensadapt.arch.coverage --write"
    )
    assert coverage.main(["--check", "--readme", str(readme)]) == 0
    rows = coverage.rows()
    assert [r[0] for r in rows[1:]] == [f"`{f.name}`" for f in BUILTIN_FAMILIES]
    # the checker catches a stale table
    stale = text.replace("| `bert` |", "| `bert2` |", 1)
    assert coverage.replace_section(stale, coverage.table()) != stale


def test_coverage_rows_follow_the_data() -> None:
    from tensadapt.arch import coverage

    by_name = {r[0].strip("`"): r for r in coverage.rows()[1:]}
    assert "experts" in by_name["mixtral"][4] and "experts" not in by_name["llama"][4]
    assert "cross_q" in by_name["t5"][3] and "gate" in by_name["t5"][3]  # the gated variant's
    assert by_name["bart"][2] == "encoder + decoder" and by_name["llama"][2] == "one"
    assert "per head" in by_name["gpt_neox"][5] and "alternating" in by_name["gpt_oss"][5]
    with pytest.raises(ValueError, match="no coverage markers"):
        coverage.replace_section("# README without markers\n", coverage.table())


# --- stacking modes -------------------------------------------------------------------------------


def test_experts_mode_axes() -> None:
    from tensadapt.modes import ALIASES, MODES, WRITE_PROJECTIONS, canonical, tensor_axes

    assert MODES == ("heads", "qkv", "experts", "depth")
    assert canonical("moe") == canonical("expert") == "experts" and "moe" in ALIASES
    axes = tensor_axes(["qkv", "experts", "depth"], 32, 64, 0, 3, 2, n_experts=8)
    assert [(a.name, a.size) for a in axes] == [
        ("in", 32),
        ("out", 64),
        ("qkv", 3),
        ("experts", 8),
        ("depth", 2),
    ]
    # targets that are not expert weights have no experts axis, as MLP targets have no heads
    plain = tensor_axes(["heads", "experts", "depth"], 32, 32, 4, 1, 2)
    assert [a.name for a in plain] == ["in", "head_dim", "heads", "depth"]
    assert {"o", "down", "cross_o", "expert_down"} == WRITE_PROJECTIONS


def test_projection_names() -> None:
    from tensadapt.arch import CROSS_PROJECTIONS, EXPERT_PROJECTIONS

    assert PROJECTIONS[:7] == ("q", "k", "v", "o", "up", "gate", "down")  # order kept
    assert set(CROSS_PROJECTIONS) | set(EXPERT_PROJECTIONS) <= set(PROJECTIONS)
    assert len(set(PROJECTIONS)) == len(PROJECTIONS) == 14


@pytest.mark.parametrize(
    ("widths", "groups", "want"),
    [
        ([32, 32, 32], 1, [(1, 3, 32, 0, 1), (1, 3, 32, 1, 2), (1, 3, 32, 2, 3)]),  # GPT-2
        ([32, 16, 16], 1, [(1, 4, 16, 0, 2), (1, 4, 16, 2, 3), (1, 4, 16, 3, 4)]),  # Phi-3 GQA
        ([32, 32, 32], 4, [(4, 3, 8, 0, 1), (4, 3, 8, 1, 2), (4, 3, 8, 2, 3)]),  # per head
        ([32, 16, 16], 2, [(2, 4, 8, 0, 2), (2, 4, 8, 2, 3), (2, 4, 8, 3, 4)]),  # per kv group
        ([64, 64], 64, [(64, 2, 1, 0, 1), (64, 2, 1, 1, 2)]),  # GPT-OSS gate/up alternating
    ],
)
def test_pack(widths: list[int], groups: int, want: list[tuple[int, ...]]) -> None:
    from tensadapt.arch import Fused, pack

    got = pack(widths, groups)
    assert got == tuple(Fused(*w) for w in want)
    rows = [r for f in got for r in f.rows()]
    assert sorted(rows) == list(range(sum(widths)))  # a partition of the fused output
    assert [f.out_features for f in got] == widths
    if groups > 1:  # interleaved: the first projection's second row block is one group further
        first = got[0]
        assert first.rows()[first.unit * (first.stop - first.start)] == first.slots * first.unit
    with pytest.raises(ValueError, match="cannot be split into 3 equal groups"):
        pack([32, 16], 3)
