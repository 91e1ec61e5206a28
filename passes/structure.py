"""Structure: find attention in the module tree, for models no graph captures.

The last capture path. When neither torch.fx nor torch.export can read a model
(data-dependent Python control flow, say), masasurgery still knows the layouts
people write: an attention module's projections carry conventional names. Each
rule below maps child names to roles; the first rule whose children all exist,
with the widths the roles need, wins.

The roles a rule assigns are a reading of names, not of the graph, so this path
is marked ``"structure"`` in the analysis. A wrong guess cannot corrupt the model:
the rewrite is checked per projection and end to end either way, and a lossless
conversion (as many atoms as blocks) is exact whatever the roles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from masasurgery.passes.find_attention import AttentionSite, Findings, Projection
from torch import nn

__all__ = ["RULES", "StructureRule", "find_by_structure"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StructureRule:
    """Child names of an attention module and the roles they hold.

    Attributes:
        children: Child name -> the roles it holds, in row order; a fused child
            (``qkv``) splits its rows evenly between its roles.
    """

    children: dict[str, tuple[str, ...]]


#: Conventional projection names, tried in order (timm, transformers, torch).
RULES: list[StructureRule] = [
    # timm ViT and most vision models: fused qkv, then proj
    StructureRule({"qkv": ("q", "k", "v"), "proj": ("o",)}),
    # a q Linear and a fused kv (PVT, Twins, cross-attention)
    StructureRule({"q": ("q",), "kv": ("k", "v"), "proj": ("o",)}),
    # Llama, Qwen, CLIP, OPT style
    StructureRule(
        {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",)}
    ),
    StructureRule(
        {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "out_proj": ("o",)}
    ),
    # T5, and plain handwritten blocks
    StructureRule({"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",)}),
    # DistilBERT
    StructureRule(
        {"q_lin": ("q",), "k_lin": ("k",), "v_lin": ("v",), "out_lin": ("o",)}
    ),
    # BERT / ViT self-attention (the output projection lives one module up)
    StructureRule({"query": ("q",), "key": ("k",), "value": ("v",)}),
]


def find_by_structure(model: nn.Module) -> Findings:
    """Attention sites read off the module tree by :data:`RULES`.

    Args:
        model: Any model; it is only read.

    Returns:
        The sites, in module order (``kind`` is ``"structure:<class name>"``).

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> [s.block for s in find_by_structure(m).sites]
        ['blocks.0.attn', 'blocks.1.attn']
    """
    sites = []
    for name, module in model.named_modules():
        for rule in RULES:
            site = _match(name, module, rule)
            if site is not None:
                sites.append(site)
                break
    logger.debug("structure: %d attention modules by name", len(sites))
    return Findings(sites=sites, skipped=[])


def _match(name: str, module: nn.Module, rule: StructureRule) -> AttentionSite | None:
    children = dict(module.named_children())
    if not all(isinstance(children.get(c), nn.Linear) for c in rule.children):
        return None

    # Each child's rows split evenly between its roles; widths must agree
    projections = []
    for child, roles in rule.children.items():
        linear = children[child]
        rows = linear.out_features // len(roles)
        if rows * len(roles) != linear.out_features:
            return None
        target = f"{name}.{child}" if name else child
        spans = {r: (i * rows, (i + 1) * rows) for i, r in enumerate(roles)}
        projections.append(
            Projection(target, spans, linear.out_features, linear.in_features)
        )
    return AttentionSite(
        core=name or "<root>",
        kind=f"structure:{type(module).__name__}",
        block=name,
        projections=projections,
    )
