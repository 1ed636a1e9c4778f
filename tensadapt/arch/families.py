"""The table of known model families: config attribute names and module path templates.

Adding a family is one :class:`Family` entry in :data:`BUILTIN_FAMILIES` (or one passed to
:func:`tensadapt.arch.from_config` by a plugin); nothing else branches on the family name.

Widths come from the config alone: with ``H`` heads, ``KV`` key/value heads, head width ``hd``,
model width ``d`` and MLP width ``I``::

    q: d -> H*hd      k, v: d -> KV*hd      o: H*hd -> d
    up, gate: d -> I  down: I -> d
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ArchitectureError
from .base import PROJECTIONS, Architecture, Fused, TargetSite


@dataclass(frozen=True)
class Layout:
    """Where a family's projections live in one generation of ``transformers``' modeling code.

    Attributes:
        paths: projection name -> module path template below the backbone, ``{l}`` standing for
            the layer index. Projections that share one template are *fused* in one module, their
            outputs stacked along the output dimension in the order listed here (GPT-2's
            ``c_attn`` holds q, k, v; Phi-3's ``gate_up_proj`` holds gate, up).
        marker: ``(python module, name)``: this layout is the one the installed
            ``transformers`` builds iff that module defines that class (or function, or
            variable); read from the module's source, without importing it. ``None``:
            always applies (list such a layout last). Only :func:`from_config` needs markers;
            :func:`from_model` picks the layout whose paths resolve in the model.
    """

    paths: Mapping[str, str]
    marker: tuple[str, str] | None = None

    def installed(self) -> bool:
        """Whether the installed ``transformers`` builds modules at these paths."""
        return self.marker is None or _has_attribute(*self.marker)


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

    def installed_layout(self) -> Layout:
        """The layout the installed ``transformers`` builds (the first whose marker holds)."""
        for layout in self.layouts:
            if layout.installed():
                return layout
        return self.layouts[-1]

    def architecture(self, config: Any, layout: Layout | None = None) -> Architecture:
        """The :class:`Architecture` of ``config`` (a ``PretrainedConfig``) in this family.

        Args:
            config: the model's config; only attributes are read, nothing is built.
            layout: which module layout to use; default :meth:`installed_layout`.

        Returns:
            The architecture, its sites ordered by layer then :data:`PROJECTIONS` order.

        Raises:
            ArchitectureError: a required config attribute is missing.
        """
        layout = layout or self.installed_layout()
        model_type = str(getattr(config, "model_type", "") or "")
        n_layers = int(self._need(config, self.n_layers, "layer count"))
        d = int(self._need(config, self.hidden_size, "hidden size"))
        n_heads = int(self._need(config, self.n_heads, "attention heads"))
        n_kv = int(first_attr(config, self.n_kv_heads) or n_heads)
        head_dim = int(first_attr(config, self.head_dim) or d // n_heads)
        inter = first_attr(config, self.intermediate_size)
        if inter is None and self.intermediate_multiple is not None:
            inter = self.intermediate_multiple * d
        intermediate = None if inter is None else int(inter)

        # proj -> (in, out, head_side, heads on that side)
        shapes: dict[str, tuple[int, int, Literal["out", "in"] | None, int]] = {
            "q": (d, n_heads * head_dim, "out", n_heads),
            "k": (d, n_kv * head_dim, "out", n_kv),
            "v": (d, n_kv * head_dim, "out", n_kv),
            "o": (n_heads * head_dim, d, "in", n_heads),
        }
        if intermediate is not None:
            shapes.update(
                up=(d, intermediate, None, 0),
                gate=(d, intermediate, None, 0),
                down=(intermediate, d, None, 0),
            )
        paths = {p: t for p, t in layout.paths.items() if p in shapes}
        slices = _fused_slices(paths, {p: s[1] for p, s in shapes.items()})
        order = sorted(paths, key=PROJECTIONS.index)

        sites = []
        for layer in range(n_layers):
            for proj in order:
                d_in, d_out, side, heads = shapes[proj]
                sites.append(
                    TargetSite(
                        layer=layer,
                        proj=proj,
                        module=paths[proj].format(l=layer),
                        in_features=d_in,
                        out_features=d_out,
                        fused=slices.get(proj),
                        layout=self.weight_layout,
                        head_side=side,
                        n_heads=heads,
                    )
                )
        return Architecture(
            family=self.name,
            model_type=model_type,
            n_layers=n_layers,
            hidden_size=d,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=intermediate,
            sites=tuple(sites),
        )

    def _need(self, config: Any, names: tuple[str, ...], what: str) -> Any:
        value = first_attr(config, names)
        if value is None:
            raise ArchitectureError(
                f"{self.name} config (model_type {getattr(config, 'model_type', None)!r}) has no "
                f"{what}: none of the attributes {', '.join(names)} is set"
            )
        return value


def first_attr(config: Any, names: Iterable[str]) -> Any:
    """The first of ``names`` that ``config`` has with a value other than ``None``, else ``None``."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _fused_slices(paths: Mapping[str, str], widths: Mapping[str, int]) -> dict[str, Fused]:
    """Column blocks of projections that share a module path, stacked in listed order."""
    by_path: dict[str, list[str]] = {}
    for proj, template in paths.items():
        by_path.setdefault(template, []).append(proj)
    slices: dict[str, Fused] = {}
    for projs in by_path.values():
        if len(projs) < 2:
            continue
        total = sum(widths[p] for p in projs)
        start = 0
        for proj in projs:
            slices[proj] = Fused(1, total, 1, start, start + widths[proj])
            start += widths[proj]
    return slices


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


def _decoder(prefix: str, o: str = "o_proj") -> Layout:
    """LLaMA-style decoder layer: ``{prefix}.{l}.self_attn.q_proj`` ... ``mlp.down_proj``."""
    return Layout(
        {
            "q": f"{prefix}.{{l}}.self_attn.q_proj",
            "k": f"{prefix}.{{l}}.self_attn.k_proj",
            "v": f"{prefix}.{{l}}.self_attn.v_proj",
            "o": f"{prefix}.{{l}}.self_attn.{o}",
            "up": f"{prefix}.{{l}}.mlp.up_proj",
            "gate": f"{prefix}.{{l}}.mlp.gate_proj",
            "down": f"{prefix}.{{l}}.mlp.down_proj",
        }
    )


#: The built-in families, one entry each.
BUILTIN_FAMILIES: tuple[Family, ...] = (
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        (
            Layout(
                {
                    "q": "encoder.layer.{l}.attention.self.query",
                    "k": "encoder.layer.{l}.attention.self.key",
                    "v": "encoder.layer.{l}.attention.self.value",
                    "o": "encoder.layer.{l}.attention.output.dense",
                    "up": "encoder.layer.{l}.intermediate.dense",
                    "down": "encoder.layer.{l}.output.dense",
                }
            ),
        ),
    ),
    Family(
        "distilbert",
        ("distilbert",),
        (
            Layout(
                {
                    "q": "transformer.layer.{l}.attention.q_lin",
                    "k": "transformer.layer.{l}.attention.k_lin",
                    "v": "transformer.layer.{l}.attention.v_lin",
                    "o": "transformer.layer.{l}.attention.out_lin",
                    "up": "transformer.layer.{l}.ffn.lin1",
                    "down": "transformer.layer.{l}.ffn.lin2",
                }
            ),
        ),
        intermediate_size=("hidden_dim",),
    ),
    Family(
        "gpt2",
        ("gpt2",),
        (
            Layout(
                {
                    "q": "h.{l}.attn.c_attn",
                    "k": "h.{l}.attn.c_attn",
                    "v": "h.{l}.attn.c_attn",
                    "o": "h.{l}.attn.c_proj",
                    "up": "h.{l}.mlp.c_fc",
                    "down": "h.{l}.mlp.c_proj",
                }
            ),
        ),
        weight_layout="conv1d",
        intermediate_size=("n_inner",),
        intermediate_multiple=4,
    ),
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
        (_decoder("layers"),),
    ),
    Family(
        "phi3",
        ("phi3",),
        (
            Layout(
                {
                    "q": "layers.{l}.self_attn.qkv_proj",
                    "k": "layers.{l}.self_attn.qkv_proj",
                    "v": "layers.{l}.self_attn.qkv_proj",
                    "o": "layers.{l}.self_attn.o_proj",
                    "gate": "layers.{l}.mlp.gate_up_proj",
                    "up": "layers.{l}.mlp.gate_up_proj",
                    "down": "layers.{l}.mlp.down_proj",
                }
            ),
        ),
    ),
    Family(
        "opt",
        ("opt",),
        (
            Layout(
                {
                    "q": "decoder.layers.{l}.self_attn.q_proj",
                    "k": "decoder.layers.{l}.self_attn.k_proj",
                    "v": "decoder.layers.{l}.self_attn.v_proj",
                    "o": "decoder.layers.{l}.self_attn.out_proj",
                    "up": "decoder.layers.{l}.fc1",
                    "down": "decoder.layers.{l}.fc2",
                }
            ),
        ),
        intermediate_size=("ffn_dim",),
    ),
    Family(
        "vit",
        ("vit",),
        (
            # transformers 5.x rewrote ViT in the "modular" style (ViTAttention + ViTMLP).
            Layout(
                {
                    "q": "layers.{l}.attention.q_proj",
                    "k": "layers.{l}.attention.k_proj",
                    "v": "layers.{l}.attention.v_proj",
                    "o": "layers.{l}.attention.o_proj",
                    "up": "layers.{l}.mlp.fc1",
                    "down": "layers.{l}.mlp.fc2",
                },
                marker=("transformers.models.vit.modeling_vit", "ViTMLP"),
            ),
            # transformers 4.x: ViTSelfAttention / ViTSelfOutput / ViTIntermediate / ViTOutput.
            Layout(
                {
                    "q": "encoder.layer.{l}.attention.attention.query",
                    "k": "encoder.layer.{l}.attention.attention.key",
                    "v": "encoder.layer.{l}.attention.attention.value",
                    "o": "encoder.layer.{l}.attention.output.dense",
                    "up": "encoder.layer.{l}.intermediate.dense",
                    "down": "encoder.layer.{l}.output.dense",
                }
            ),
        ),
    ),
)


def family_for(model_type: str, families: Iterable[Family] | None = None) -> Family | None:
    """The family covering ``model_type``, or ``None`` if no family in ``families`` does.

    Args:
        model_type: a config's ``model_type``.
        families: families to search; default: every registered family, looked up in the plugin
            registry (built-ins first; plugins are loaded only if no built-in covers it).
    """
    if families is None:
        from ..plugins import family_for as registered_family_for

        return registered_family_for(model_type)
    for family in families:
        if model_type in family.model_types:
            return family
    return None


def known_model_types(families: Iterable[Family] | None = None) -> list[str]:
    """Every ``model_type`` a family in ``families`` (default: every registered one) covers."""
    if families is None:
        from ..plugins import families as registered_families

        families = registered_families()
    return [mt for family in families for mt in family.model_types]
