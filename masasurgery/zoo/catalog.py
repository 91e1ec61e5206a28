"""Which real model families have attention: read from timm itself.

The coverage benchmark and the coverage tests share this list, so the supported
share written in docs/ is the share the tests check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = ["FamilyModel", "has_attention", "smallest_variant", "timm_families"]

# Size words in timm model names, smallest first; unnamed sizes sort last.
_SIZES = (
    "atto", "femto", "pico", "nano", "xxxs", "xxs", "tiny", "xs", "xsmall",
    "small", "s", "t", "b0", "0", "base", "b",
)  # fmt: skip


@dataclass(frozen=True)
class FamilyModel:
    """One timm family (its source module) and the variant that stands for it."""

    family: str
    model: str


def smallest_variant(names: list[str]) -> str:
    """The name that looks smallest: by size word, then by length, then by name.

    Example:
        >>> smallest_variant(["vit_base_patch16_224", "vit_tiny_patch16_224"])
        'vit_tiny_patch16_224'
    """

    def key(name: str) -> tuple[int, int, str]:
        words = re.split(r"[_.]", name)
        ranks = [_SIZES.index(w) for w in words if w in _SIZES]
        return (min(ranks) if ranks else len(_SIZES), len(name), name)

    return min(names, key=key)


def has_attention(model: nn.Module) -> bool:
    """True when any submodule is an attention block (by timm's class names)."""
    return any(
        isinstance(m, nn.MultiheadAttention)
        or re.search(r"Attention|Attn", type(m).__name__) is not None
        for m in model.modules()
    )


def timm_families() -> list[FamilyModel]:
    """One small variant of every timm model family, as timm registers them.

    Families are timm's model modules (``vision_transformer``, ``swin_transformer``,
    ...). Whether a family has attention is decided by instantiating its variant,
    so this list is a superset; filter with :func:`has_attention`.
    """
    from timm.models import _registry

    families = []
    for module, names in sorted(_registry._module_to_models.items()):
        if names:
            families.append(FamilyModel(module, smallest_variant(sorted(names))))
    return families
