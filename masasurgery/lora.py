"""LoRA from ``peft`` on a converted model, the shared projections included.

peft puts LoRA on the ``nn.Linear`` layers of a converted model (the MLPs) as on
any model. It does not know :class:`~masasurgery.modules.SharedProjection`;
:func:`register_shared_lora` maps it to
:class:`~masasurgery.lora_layer.SharedLoraLinear` through peft's custom-module
API, so ``target_modules`` may name the attention projections too. The adapter
adds ``B(A(x)) * scaling`` to the projection's output; the projection's weight
is still composed from the shared atoms, which peft freezes with the rest.

Merging is refused for shared projections: the update of one block cannot be
folded into atoms that every block of its group shares. ``merge_and_unload``
works when LoRA sits on dense layers only (the model keeps its shared
projections); with LoRA on the shared projections, keep the adapters.

Experimental: peft marks its custom-module API experimental; it may change.
This module imports peft only when :func:`register_shared_lora` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from masasurgery._uses import shared_projections
from masasurgery.modules import SharedConv2d, SharedProjection

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["lora_targets", "register_shared_lora"]

# Kept in step with masasurgery.lora_layer.UNCALLED_LAYOUTS (which imports peft)
_UNCALLED_LAYOUTS = ("mha_in_proj",)


def register_shared_lora(config: LoraConfig) -> LoraConfig:
    """Let a peft ``LoraConfig`` put LoRA on shared projections too.

    Args:
        config: The LoRA config; its ``target_modules`` may name shared
            projections (e.g. those :func:`lora_targets` lists).

    Returns:
        The same config, with ``SharedProjection`` mapped to ``SharedLoraLinear``.

    Example:
        >>> import timm, masasurgery
        >>> from peft import LoraConfig, get_peft_model
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> config = LoraConfig(r=4, target_modules=[*lora_targets(m), "fc1"])
        >>> peft_model = get_peft_model(m, register_shared_lora(config))
        >>> type(m.blocks[0].attn.qkv).__name__, type(m.blocks[0].mlp.fc1).__name__
        ('SharedLoraLinear', 'Linear')
    """
    from masasurgery.lora_layer import SharedLoraLinear

    config._register_custom_module({SharedProjection: SharedLoraLinear})
    return config


def lora_targets(model: nn.Module) -> list[str]:
    """The shared projections a LoRA adapter can wrap, for ``target_modules``.

    Every shared projection its owner calls: the packed ``in_proj`` of a shared
    ``nn.MultiheadAttention`` (read, never called) and 1x1 convolutions are left
    out.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> lora_targets(m)[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
    """
    return [
        name
        for name, module in shared_projections(model)
        if not isinstance(module, SharedConv2d)
        and getattr(module, "layout", None) not in _UNCALLED_LAYOUTS
    ]
