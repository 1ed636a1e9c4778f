"""How a model family is described as data: :class:`Family`, :class:`Layout`, :class:`Stack`,
:class:`Experts`, :class:`Variant`; and how a config becomes an :class:`Architecture`.

Widths come from the config alone: with ``H`` heads, ``KV`` key/value heads, head width ``hd``,
model width ``d``, MLP width ``I`` and expert width ``Ie``::

    q, cross_q: d -> H*hd      k, v, cross_k, cross_v: d -> KV*hd      o, cross_o: H*hd -> d
    up, gate: d -> I           down: I -> d
    expert_up, expert_gate: d -> Ie (each of E experts)                 expert_down: Ie -> d

Projections listed with one module path share that module (*fused*): its output holds each
projection's rows, in listed order, repeated over ``groups`` (:func:`.base.pack`). Nothing here
branches on a family's name.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ArchitectureError
from .base import (
    EXPERT_PROJECTIONS,
    HEAD_SIDES,
    MLP_PROJECTIONS,
    PROJECTIONS,
    Architecture,
    ExpertWeights,
    Fused,
    StackSpan,
    TargetSite,
    pack,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: size fields of :class:`Family` that a :class:`Stack` may override
SIZE_FIELDS: tuple[str, ...] = (
    "n_layers",
    "hidden_size",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
)


@dataclass(frozen=True)
class Stack:
    """One list of layers: a decoder, an encoder, a text or a vision tower.

    Attributes:
        name: ``"encoder"``, ``"decoder"``, ``"text"``, ``"vision"`` (``""`` for the one list
            of a single-stack model).
        paths: projection name -> module path template below the backbone, ``{l}`` standing for
            the layer's index *within this list*.
        interleave: fused module template -> how many groups its output repeats the listed
            projections' slot pattern in: an int, ``"kv_heads"`` or ``"heads"``. Unlisted fused
            templates are column blocks (one group). GPT-NeoX/BLOOM ``[H, (q, k, v), hd]`` and
            Falcon ``[KV, (H/KV q, k, v), hd]`` are both ``"kv_heads"``.
        config: attribute of the config holding this list's sub-config (``"text_config"``), or
            ``None`` for the config itself.
        sizes: :data:`SIZE_FIELDS` entries overriding the family's attribute names for this list
            (BART's encoder: ``{"n_layers": ("encoder_layers",), ...}``).
    """

    name: str
    paths: Mapping[str, str]
    interleave: Mapping[str, int | str] = field(default_factory=dict)
    config: str | None = None
    sizes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """Where a family's projections live in one generation of ``transformers``' modeling code.

    Attributes:
        paths: the single-list shorthand: projection -> template (see :class:`Stack`).
        marker: ``(python module, name)``: this layout is the one the installed
            ``transformers`` builds iff that module defines that class (or function, or
            variable); read from the module's source, without importing it. ``None``:
            always applies (list such a layout last). Only :func:`from_config` needs markers;
            :func:`from_model` picks the layout whose paths resolve in the model.
        interleave: the single-list shorthand's :attr:`Stack.interleave`.
        stacks: several layer lists, numbered through in this order (``paths`` stays empty).
    """

    paths: Mapping[str, str] = field(default_factory=dict)
    marker: tuple[str, str] | None = None
    interleave: Mapping[str, int | str] = field(default_factory=dict)
    stacks: tuple[Stack, ...] = ()

    def installed(self) -> bool:
        """Whether the installed ``transformers`` builds modules at these paths."""
        return self.marker is None or _has_attribute(*self.marker)

    def all_stacks(self) -> tuple[Stack, ...]:
        """The layer lists, the shorthand as one unnamed :class:`Stack`."""
        return self.stacks or (Stack("", self.paths, self.interleave),)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts block whose experts are stacked 3-D parameters (``transformers`` 5).

    Attributes:
        module: template of the experts module (``layers.{l}.mlp.experts``), called as
            ``experts(hidden [T, d], top_k_index [T, k], top_k_weights [T, k]) -> [T, d]``.
        router: template of the router module (``layers.{l}.mlp.gate``).
        params: ``expert_gate`` / ``expert_up`` / ``expert_down`` -> parameter name; names
            listed twice share one fused parameter, gate and up in listed order.
        interleaved: a shared gate/up parameter alternates rows ``[g0, u0, g1, u1, ...]``
            (GPT-OSS) instead of holding ``[gate; up]``.
        layout: each expert's matrix as ``"linear"`` (``[E, out, in]``) or ``"conv1d"``
            (``[E, in, out]``).
        bias: every parameter ``p`` has a bias ``p + "_bias"`` of shape ``[E, out]``.
        n_experts, top_k, width: config attributes of the expert count, experts per token and
            one expert's MLP width.
        shared: dense MLP projection -> template in sparse layers (Qwen2-MoE's always-on shared
            expert), replacing the layout's MLP paths there; empty: sparse layers have none.
        shared_width: config attributes of the shared expert's width.
        sparse_step: config attributes of ``s``: layer ``l`` is sparse iff ``(l + 1) % s == 0``.
        dense_layers: config attributes listing layers kept dense (Qwen's ``mlp_only_layers``).
        first_dense: config attributes of ``k``: layers ``0 .. k-1`` are dense.
        stack: the :attr:`Stack.name` holding the experts.
    """

    module: str
    router: str
    params: Mapping[str, str] = field(
        default_factory=lambda: {
            "expert_gate": "gate_up_proj",
            "expert_up": "gate_up_proj",
            "expert_down": "down_proj",
        }
    )
    interleaved: bool = False
    layout: Literal["linear", "conv1d"] = "linear"
    bias: bool = False
    n_experts: tuple[str, ...] = ("num_local_experts", "num_experts")
    top_k: tuple[str, ...] = ("num_experts_per_tok",)
    width: tuple[str, ...] = ("intermediate_size",)
    shared: Mapping[str, str] = field(default_factory=dict)
    shared_width: tuple[str, ...] = ()
    sparse_step: tuple[str, ...] = ()
    dense_layers: tuple[str, ...] = ()
    first_dense: tuple[str, ...] = ()
    stack: str = ""

    def sparse(self, config: PretrainedConfig, layer: int) -> bool:
        """Whether ``layer`` (index within its list) holds the experts."""
        step = int(first_attr(config, self.sparse_step) or 1)
        dense = first_attr(config, self.dense_layers) or ()
        first = int(first_attr(config, self.first_dense) or 0)
        return layer >= first and layer not in dense and (layer + 1) % step == 0


@dataclass(frozen=True)
class Variant:
    """A config-dependent change of a family: when every ``when`` attribute matches, the family's
    fields in ``changes`` are replaced (first matching variant wins).

    ``when`` values that are ``bool`` compare with the attribute's truthiness, others by
    equality. Falcon: ``Variant({"new_decoder_architecture": True}, {"n_kv_heads":
    ("num_kv_heads",)})`` then ``Variant({"multi_query": True}, {"kv_heads": 1})``.
    """

    when: Mapping[str, Any]
    changes: Mapping[str, Any]

    def matches(self, config: PretrainedConfig) -> bool:
        for name, want in self.when.items():
            have = getattr(config, name, None)
            if (bool(have) != want) if isinstance(want, bool) else (have != want):
                return False
        return True


@dataclass(frozen=True)
class Family:
    """One model family: which ``model_type`` values it covers and how to read their configs.

    Each attribute-name field lists config attributes tried in order; the first that exists and
    is not ``None`` wins (``transformers`` configs map the standard names through
    ``attribute_map``, so the defaults cover most families).

    Attributes:
        name: family name, stored as :attr:`Architecture.family`.
        model_types: the config ``model_type`` values this family covers.
        layouts: module path layouts, newest ``transformers`` first.
        weight_layout: ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (weight ``[in, out]``).
        n_layers, hidden_size, n_heads, n_kv_heads, head_dim, intermediate_size: config
            attribute names. Without a kv-heads attribute ``n_kv_heads = n_heads``; without a
            head_dim ``head_dim = hidden_size // n_heads``.
        intermediate_multiple: MLP width as a multiple of ``hidden_size`` when the config leaves
            it unset (GPT-2: ``n_inner=None`` means ``4 * n_embd``).
        kv_heads: a fixed key/value head count (multi-query attention), overriding ``n_kv_heads``.
        experts: the mixture-of-experts block, if any.
        variants: config-dependent changes (:class:`Variant`).
        notes: one line for the coverage table (what is special; what is not covered).
    """

    name: str
    model_types: tuple[str, ...]
    layouts: tuple[Layout, ...]
    weight_layout: Literal["linear", "conv1d"] = "linear"
    n_layers: tuple[str, ...] = ("num_hidden_layers",)
    hidden_size: tuple[str, ...] = ("hidden_size",)
    n_heads: tuple[str, ...] = ("num_attention_heads",)
    n_kv_heads: tuple[str, ...] = ("num_key_value_heads",)
    head_dim: tuple[str, ...] = ("head_dim",)
    intermediate_size: tuple[str, ...] = ("intermediate_size",)
    intermediate_multiple: int | None = None
    kv_heads: int | None = None
    experts: Experts | None = None
    variants: tuple[Variant, ...] = ()
    notes: str = ""

    def for_config(self, config: PretrainedConfig) -> Family:
        """This family with the first matching :class:`Variant` applied (itself if none)."""
        for variant in self.variants:
            if variant.matches(config):
                return dataclasses.replace(self, variants=(), **variant.changes)
        return self

    def installed_layout(self) -> Layout:
        """The layout the installed ``transformers`` builds (the first whose marker holds)."""
        for layout in self.layouts:
            if layout.installed():
                return layout
        return self.layouts[-1]

    def architecture(
        self,
        config: PretrainedConfig,
        layout: Layout | None = None,
        stacks: Iterable[str] | None = None,
    ) -> Architecture:
        """The :class:`Architecture` of ``config`` (a ``PretrainedConfig``) in this family.

        Args:
            config: the model's config; only attributes are read, nothing is built.
            layout: which module layout to use; default: the installed one of the family's
                variant for ``config``.
            stacks: names of the layer lists to include (an encoder-only model of an
                encoder-decoder family); default all.

        Returns:
            The architecture, its sites ordered by (through-numbered) layer then
            :data:`PROJECTIONS` order.

        Raises:
            ArchitectureError: a required config attribute is missing, or a fused module's
                widths do not split into its groups.
        """
        fam = self.for_config(config)
        layout = layout or fam.installed_layout()
        wanted = None if stacks is None else set(stacks)
        chosen = [s for s in layout.all_stacks() if wanted is None or s.name in wanted]
        model_type = str(getattr(config, "model_type", "") or "")
        sites: list[TargetSite] = []
        spans: list[StackSpan] = []
        first: _Sizes | None = None
        n_experts = 0
        for stack in chosen:
            sub = _sub_config(config, stack, fam.name)
            sizes = fam._sizes(sub, stack)
            first = first or sizes
            experts = fam.experts if fam.experts and fam.experts.stack == stack.name else None
            start = sum(span.n_layers for span in spans)
            built = _StackSites(fam, stack, sub, sizes, experts)
            for layer in range(sizes.n_layers):
                sites += built.sites(layer, start + layer)
            spans.append(StackSpan(stack.name, start, sizes.n_layers))
            n_experts = max(n_experts, built.n_experts)
        if first is None:
            raise ArchitectureError(f"{self.name}: no layer list selected from {stacks}")
        return Architecture(
            family=self.name,
            model_type=model_type,
            n_layers=sum(span.n_layers for span in spans),
            hidden_size=first.d,
            n_heads=first.n_heads,
            n_kv_heads=first.n_kv,
            head_dim=first.head_dim,
            intermediate_size=first.intermediate,
            sites=tuple(sites),
            stacks=tuple(spans) if len(spans) > 1 or spans[0].name else (),
            n_experts=n_experts,
        )

    def _sizes(self, config: PretrainedConfig, stack: Stack) -> _Sizes:
        def names(what: str) -> tuple[str, ...]:
            return tuple(stack.sizes.get(what, getattr(self, what)))

        n_layers = int(self._need(config, names("n_layers"), "layer count"))
        d = int(self._need(config, names("hidden_size"), "hidden size"))
        n_heads = int(self._need(config, names("n_heads"), "attention heads"))
        if self.kv_heads is not None:
            n_kv = self.kv_heads
        else:
            n_kv = int(first_attr(config, names("n_kv_heads")) or n_heads)
        head_dim = int(first_attr(config, names("head_dim")) or d // n_heads)
        inter = first_attr(config, names("intermediate_size"))
        if inter is None and self.intermediate_multiple is not None:
            inter = self.intermediate_multiple * d
        return _Sizes(n_layers, d, n_heads, n_kv, head_dim, None if inter is None else int(inter))

    def _need(self, config: PretrainedConfig, names: tuple[str, ...], what: str) -> Any:
        value = first_attr(config, names)
        if value is None:
            raise ArchitectureError(
                f"{self.name} config (model_type {getattr(config, 'model_type', None)!r}) has no "
                f"{what}: none of the attributes {', '.join(names)} is set"
            )
        return value


@dataclass(frozen=True)
class _Sizes:
    n_layers: int
    d: int
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int | None


def _sub_config(config: PretrainedConfig, stack: Stack, family: str) -> Any:
    if stack.config is None:
        return config
    sub = getattr(config, stack.config, None)
    if sub is None:
        raise ArchitectureError(
            f"{family} config (model_type {getattr(config, 'model_type', None)!r}) has no "
            f"{stack.config!r} for its {stack.name or 'layer'} stack"
        )
    return sub


@dataclass(frozen=True)
class _Kind:
    """The sites of one kind of layer (dense, or sparse with experts), before numbering."""

    paths: Mapping[str, str]  # proj -> template
    shapes: Mapping[str, tuple[int, int, int]]  # proj -> (in, out, heads on the head side)
    fused: Mapping[str, Fused]


class _StackSites:
    """The sites of one layer list: shapes and fused descriptors computed once per layer kind."""

    def __init__(
        self,
        family: Family,
        stack: Stack,
        config: PretrainedConfig,
        sizes: _Sizes,
        experts: Experts | None,
    ) -> None:
        self.family, self.stack, self.config, self.experts = family, stack, config, experts
        self.groups = {"heads": sizes.n_heads, "kv_heads": sizes.n_kv}
        d, hd = sizes.d, sizes.head_dim
        q_out, kv_out = sizes.n_heads * hd, sizes.n_kv * hd
        attn = {"q": (d, q_out, sizes.n_heads), "k": (d, kv_out, sizes.n_kv)}
        attn |= {"v": attn["k"], "o": (q_out, d, sizes.n_heads)}
        self.attention = {**attn, **{f"cross_{p}": shape for p, shape in attn.items()}}
        self.d = d
        self.dense = self._kind(stack.paths, sizes.intermediate)
        self.sparse = self.dense
        self.n_experts = 0
        self.top_k = 0
        if experts is not None:
            self.n_experts = int(family._need(config, experts.n_experts, "expert count"))
            self.top_k = int(family._need(config, experts.top_k, "experts per token"))
            width = int(family._need(config, experts.width, "expert width"))
            shared = first_attr(config, experts.shared_width) if experts.shared else None
            kept = {p: t for p, t in stack.paths.items() if p not in MLP_PROJECTIONS}
            kind = self._kind({**kept, **experts.shared}, shared)
            shapes = {
                proj: ((width, d, 0) if proj == "expert_down" else (d, width, 0))
                for proj in experts.params
            }
            self.sparse = _Kind(
                {**kind.paths, **{proj: experts.module for proj in experts.params}},
                {**kind.shapes, **shapes},
                {**kind.fused, **self._expert_fused(width)},
            )

    def _kind(self, paths: Mapping[str, str], intermediate: Any) -> _Kind:
        """Sites of ``paths`` whose widths are known (MLP ones need ``intermediate``)."""
        shapes = dict(self.attention)
        if intermediate is not None:
            i = int(intermediate)
            shapes |= {"up": (self.d, i, 0), "gate": (self.d, i, 0), "down": (i, self.d, 0)}
        kept = {p: t for p, t in paths.items() if p in shapes}
        return _Kind(kept, shapes, self._fused(kept, shapes))

    def _fused(
        self, paths: Mapping[str, str], shapes: Mapping[str, tuple[int, int, int]]
    ) -> dict[str, Fused]:
        """The :class:`Fused` of every projection that shares its template with another."""
        by_path: dict[str, list[str]] = {}
        for proj, template in paths.items():
            by_path.setdefault(template, []).append(proj)
        fused: dict[str, Fused] = {}
        for template, projs in by_path.items():
            if len(projs) < 2:
                continue
            spec = self.stack.interleave.get(template, 1)
            groups = self.groups[spec] if isinstance(spec, str) else spec
            try:
                fused |= zip(projs, pack([shapes[p][1] for p in projs], groups), strict=True)
            except ValueError as exc:
                raise ArchitectureError(
                    f"{self.family.name}: fused module {template} ({', '.join(projs)}): {exc}"
                ) from None
        return fused

    def _expert_fused(self, width: int) -> dict[str, Fused]:
        """Gate and up sharing one expert parameter: ``[gate; up]`` or alternating rows."""
        assert self.experts is not None
        by_param: dict[str, list[str]] = {}
        for proj, param in self.experts.params.items():
            by_param.setdefault(param, []).append(proj)
        fused: dict[str, Fused] = {}
        for projs in by_param.values():
            if len(projs) > 1:
                groups = width if self.experts.interleaved else 1
                fused |= zip(projs, pack([width] * len(projs), groups), strict=True)
        return fused

    def sites(self, layer: int, number: int) -> list[TargetSite]:
        """The sites of layer ``layer`` of this list, numbered ``number``."""
        experts = self.experts
        kind = self.sparse if experts and experts.sparse(self.config, layer) else self.dense
        out = []
        for proj in sorted(kind.paths, key=PROJECTIONS.index):
            d_in, d_out, heads = kind.shapes[proj]
            weights = None
            layout = self.family.weight_layout
            if experts is not None and proj in EXPERT_PROJECTIONS:
                param = experts.params[proj]
                weights = ExpertWeights(
                    param=param,
                    n_experts=self.n_experts,
                    top_k=self.top_k,
                    router=experts.router.format(l=layer),
                    bias=f"{param}_bias" if experts.bias else None,
                )
                layout = experts.layout
            out.append(
                TargetSite(
                    layer=number,
                    proj=proj,
                    module=kind.paths[proj].format(l=layer),
                    in_features=d_in,
                    out_features=d_out,
                    fused=kind.fused.get(proj),
                    layout=layout,
                    head_side=HEAD_SIDES.get(proj),
                    n_heads=heads,
                    experts=weights,
                )
            )
        return out


def first_attr(config: object, names: Iterable[str]) -> Any:
    """The first of ``names`` that ``config`` has with a value other than ``None``, else ``None``."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


@functools.cache
def _has_attribute(module: str, attribute: str) -> bool:
    """Whether ``module`` defines ``attribute``, read from its source without importing it.

    Importing a modeling file costs most of a second; reading it for ``class NAME`` costs a
    fraction of a millisecond. Without a readable source file the module is imported.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.origin and spec.origin.endswith(".py"):
        try:
            source = Path(spec.origin).read_text(encoding="utf-8")
        except OSError:
            pass
        else:
            pattern = rf"^(class|def) {re.escape(attribute)}\b|^{re.escape(attribute)}\s*[:=]"
            return re.search(pattern, source, re.MULTILINE) is not None
    try:
        return hasattr(importlib.import_module(module), attribute)
    except Exception:  # a broken modeling file means "not this layout"
        return False
