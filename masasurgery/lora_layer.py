"""The peft LoRA layer for a shared projection (imports ``peft``).

Registered by :func:`masasurgery.lora.register_shared_lora`; see that module.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora import Linear
from torch import nn

from masasurgery.errors import LayoutError
from masasurgery.modules import SharedConv2d

__all__ = ["UNCALLED_LAYOUTS", "SharedLoraLinear", "check_wrappable"]

#: Layouts whose projection is never called: its owner reads the weight itself.
UNCALLED_LAYOUTS = ("mha_in_proj",)


class SharedLoraLinear(Linear):
    """peft's LoRA ``Linear`` layer on a :class:`~masasurgery.SharedProjection`.

    The forward is peft's: ``base_layer(x) + lora_B(lora_A(dropout(x))) *
    scaling`` for each active adapter, the base weight still composed from the
    shared atoms. :meth:`merge` raises, since one block's update cannot be
    folded into atoms its whole group shares.

    Args:
        base_layer: The shared projection (or a peft layer around it).
        adapter_name: The adapter's name.
        **kwargs: peft's LoRA options (``config``, ``r``, ``lora_alpha``, ...).

    Raises:
        LayoutError: The projection is a 1x1 convolution, or never called.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any):
        check_wrappable(adapter_name, _base(base_layer))
        super().__init__(base_layer, adapter_name, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # peft warns on layer types it does not know; this one is a plain Linear
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        raise LayoutError(
            "cannot merge a LoRA adapter into a SharedProjection: its weight is "
            "composed from atoms shared by every block of the group, and one "
            "block's update cannot be folded into them. Keep the adapter unmerged, "
            "or call masasurgery.materialize(model) on the base model first and "
            "put the adapters on its dense weights."
        )

    def __repr__(self) -> str:
        return "masasurgery." + super().__repr__()


def _base(layer: nn.Module) -> nn.Module:
    get_base_layer = getattr(layer, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else layer


def check_wrappable(name: str, module: nn.Module) -> None:
    """Refuse the shared projections a Linear LoRA adapter cannot act on."""
    if isinstance(module, SharedConv2d):
        raise LayoutError(
            f"adapter {name!r}: a SharedConv2d (a 1x1 convolution) takes (B, C, H, "
            "W) inputs, which peft's Linear LoRA cannot wrap; leave it out of "
            "target_modules (lora_targets(model) does)."
        )
    if getattr(module, "layout", None) in UNCALLED_LAYOUTS:
        raise LayoutError(
            f"adapter {name!r}: the packed in_proj of nn.MultiheadAttention is "
            "never called (the attention reads its weight), so a LoRA adapter "
            "there would be ignored; leave it out of target_modules "
            "(lora_targets(model) does)."
        )
