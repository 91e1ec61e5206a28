"""Materialize: turn a converted model back into plain dense modules.

Each :class:`SharedProjection` becomes the module type it replaced (an
``nn.Linear`` for the ``"linear"`` layout), holding the composed weight as an
ordinary parameter, and the dictionary store at ``model.masa`` is removed. The
result has no masasurgery module left in it, so it exports (``torch.export``,
ONNX) and deploys like the original model, with the converted model's weights.

The dense builders are data: a table from layout name to a function that turns a
replacement into its dense module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from masasurgery._checks import check_module
from masasurgery.errors import LayoutError
from masasurgery.modules import SharedProjection, shallow_copy_as
from masasurgery.passes.plans import layout_of, replaced_target
from masasurgery.passes.rewrite import STORE_NAME, _set_submodule

__all__ = ["DENSE_BUILDERS", "Materialized", "materialize"]

logger = logging.getLogger(__name__)


@dataclass
class Materialized:
    """What :func:`materialize` put into the model.

    Attributes:
        modules: The dense module now at each formerly shared qualified name.
        layouts: The layout of each, by qualified name.
    """

    modules: dict[str, nn.Module] = field(repr=False)
    layouts: dict[str, str] = field(repr=False)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for layout in self.layouts.values():
            counts[layout] = counts.get(layout, 0) + 1
        kinds = ", ".join(f"{n} {layout}" for layout, n in sorted(counts.items()))
        return f"materialized {len(self.modules)} projections ({kinds or 'none'})"


def _dense_linear(installed: nn.Module, module: SharedProjection) -> nn.Module:
    # Built on meta, then given the composed weight: no random init to pay for
    bias = module.bias is not None
    dense = nn.Linear(module.in_features, module.out_features, bias=bias, device="meta")
    dense.weight = _copy(module.weight, _trainable(module))
    if bias:
        dense.bias = _copy(module.bias, module.bias.requires_grad)
    return dense


def _dense_conv1d(installed: nn.Module, module: SharedProjection) -> nn.Module:
    # transformers' Conv1D stores (in, out): exactly what SharedConv1D.weight reads
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        dense = Conv1D(nf=module.out_features, nx=module.in_features)
    dense.weight = _copy(module.weight, _trainable(module))
    dense.bias = _copy(module.bias, module.bias.requires_grad)
    return dense


def _dense_conv1x1(installed: nn.Module, module: SharedProjection) -> nn.Module:
    # SharedConv2d.weight reads (out, in, 1, 1), as nn.Conv2d stores it
    bias = module.bias is not None
    dense = nn.Conv2d(
        module.in_features,
        module.out_features,
        kernel_size=1,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=bias,
        device="meta",
    )
    dense.weight = _copy(module.weight, _trainable(module))
    if bias:
        dense.bias = _copy(module.bias, module.bias.requires_grad)
    return dense


def _dense_multihead_attention(
    installed: nn.Module, module: SharedProjection
) -> nn.Module:
    # A plain nn.MultiheadAttention with the same settings and children, whose
    # in_proj_weight is the composed packed weight again
    dense = shallow_copy_as(installed, nn.MultiheadAttention)
    del dense._modules["in_proj"]
    dense.in_proj_weight = _copy(module.weight, _trainable(module))
    return dense


#: Layout name -> builder of the dense module a replacement came from. A builder
#: gets the module that took the original's place (the shared projection itself,
#: or the wrapper a layout installed around it) and the shared projection.
DENSE_BUILDERS: dict[str, Callable[[nn.Module, SharedProjection], nn.Module]] = {
    # SharedProjection (weight (out, in)) -> nn.Linear(in, out)
    "linear": _dense_linear,
    # SharedConv1D (weight read as (in, out)) -> transformers' Conv1D
    "conv1d": _dense_conv1d,
    # SharedConv2d (weight read as (out, in, 1, 1)) -> a 1x1 nn.Conv2d
    "conv1x1": _dense_conv1x1,
    # SharedMultiheadAttention -> nn.MultiheadAttention with a dense in_proj_weight
    "mha_in_proj": _dense_multihead_attention,
}


def materialize(model: nn.Module) -> Materialized:
    """Replace every shared projection of ``model`` by a dense module, in place.

    Each :class:`SharedProjection` becomes the module type its layout names (an
    ``nn.Linear`` for ``"linear"``) with the composed weight, a copy of its bias,
    and the same dtype, device and ``requires_grad``; then ``model.masa`` is
    removed. Outputs are unchanged (the dense weight is the very tensor the
    shared module composes). A model that holds no shared projection is left as it
    is. Every dense module is built before the model changes.

    Args:
        model: A converted model (or any model; one without shared projections is
            returned unchanged).

    Returns:
        The dense modules put in, by qualified name, and their layouts.

    Raises:
        ConfigError: ``model`` is not a ``torch.nn.Module``.
        LayoutError: A shared projection's layout has no dense builder in
            :data:`DENSE_BUILDERS`; nothing was changed.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> type(m.blocks[0].attn.qkv).__name__, hasattr(m, "masa")
        ('SharedProjection', True)
        >>> done = masasurgery.materialize(m)
        >>> type(m.blocks[0].attn.qkv).__name__, hasattr(m, "masa")
        ('Linear', False)
        >>> sorted(done.modules)[:2]
        ['blocks.0.attn.proj', 'blocks.0.attn.qkv']
    """
    # Build every dense module before the model changes; outer ones first
    check_module(model)
    order = _sites(model)
    layouts = [_layout(site) for site in order]
    with torch.no_grad():
        dense = [
            DENSE_BUILDERS[layout](site.installed, site.projection)
            for site, layout in zip(order, layouts, strict=True)
        ]

    # Swap them in, then drop the store
    _swap_dense(model, order, dense)
    if isinstance(getattr(model, STORE_NAME, None), nn.Module):
        delattr(model, STORE_NAME)
    logger.debug("materialized %d shared projections", len(dense))
    done = Materialized(modules={}, layouts={})
    for site, module, layout in zip(order, dense, layouts, strict=True):
        done.modules.update(dict.fromkeys(site.targets, module))
        done.layouts.update(dict.fromkeys(site.targets, layout))
    return done


@dataclass
class _Site:
    """A shared projection, the module in the original's place, and its names."""

    installed: nn.Module
    projection: SharedProjection
    targets: list[str]


def _sites(model: nn.Module) -> list[_Site]:
    """Each module standing in for an original, with its names, outer ones first."""
    sites: dict[int, _Site] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SharedProjection):
            target = replaced_target(model, name)
            installed = model.get_submodule(target)
            site = sites.setdefault(id(installed), _Site(installed, module, []))
            if target not in site.targets:
                site.targets.append(target)
    return sorted(sites.values(), key=lambda site: site.targets[0].count("."))


def _layout(site: _Site) -> str:
    layout = layout_of(site.projection)
    if layout not in DENSE_BUILDERS:
        raise LayoutError(
            f"{site.targets[0]} has layout {layout!r}, which materialize cannot turn "
            f"back into a dense module yet (it knows {sorted(DENSE_BUILDERS)}). "
            "Nothing was changed."
        )
    return layout


def _swap_dense(model: nn.Module, order: list[_Site], dense: list[nn.Module]) -> None:
    # All or nothing: a failure puts back the modules already swapped out
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for site, module in zip(order, dense, strict=True):
            for target in site.targets:
                swapped.append((target, model.get_submodule(target)))
                _set_submodule(model, target, module)
    except BaseException:
        for target, old in reversed(swapped):
            _set_submodule(model, target, old)
        raise


def _trainable(module: SharedProjection) -> bool:
    tensors = [*module.coefficients.values(), *module.dense.values()]
    tensors += [*module.residual_up.values(), *module.residual_down.values()]
    tensors += [d.atoms for d in module.dictionaries.values()]
    return any(t.requires_grad for t in tensors)


def _copy(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=requires_grad)
