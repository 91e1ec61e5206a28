"""Layouts: how each kind of projection stores its weight, read and written.

A layout knows how to read the ``(rows, in)`` block of one role out of a projection
module, and how to build the :class:`SharedProjection` that replaces the module.
Layouts are data: a table from name to reader and builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from masasurgery.modules import (
    SharedConv1D,
    SharedConv2d,
    SharedMultiheadAttention,
    SharedProjection,
)

__all__ = ["LAYOUTS", "Layout", "read_rows"]


@dataclass(frozen=True)
class Layout:
    """How one projection layout is read and replaced.

    Attributes:
        weight: The module's weight as ``(out, in)``, a view where possible.
        bias: The module's bias over the same rows, or None.
        replacement: An empty :class:`SharedProjection` standing in for the module.
        install: Turns a filled replacement into the module that takes the
            original's place (the replacement itself, for plain projections).
        called: True when the model calls the module on the projection's input,
            so its output can be checked against a reference in a hook.
        out_dim: The dimension of the module's output that holds the weight's
            rows (the last for a Linear; 1, the channels, for a convolution).
    """

    weight: Callable[[nn.Module], Tensor]
    replacement: Callable[[nn.Module], SharedProjection]
    bias: Callable[[nn.Module], Tensor | None] = lambda m: m.bias
    install: Callable[[nn.Module, SharedProjection], nn.Module] = lambda m, new: new
    called: bool = True
    out_dim: int = -1


def _linear_weight(module: nn.Module) -> Tensor:
    return module.weight


def _linear_replacement(module: nn.Module) -> SharedProjection:
    return SharedProjection(module.weight.shape[1], bias=_bias_copy(module))


def _conv1d_weight(module: nn.Module) -> Tensor:
    return module.weight.T


def _conv1d_replacement(module: nn.Module) -> SharedProjection:
    return SharedConv1D(module.weight.shape[0], bias=_bias_copy(module))


def _bias_copy(module: nn.Module) -> nn.Parameter | None:
    # A copy: the original module is kept, untouched, for verify and undo
    bias = getattr(module, "bias", None)
    if bias is None:
        return None
    return nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)


def _conv1x1_weight(module: nn.Module) -> Tensor:
    return module.weight.flatten(1)  # (out, in, 1, 1) -> (out, in), a view


def _conv1x1_replacement(module: nn.Module) -> SharedProjection:
    return SharedConv2d(
        module.weight.shape[1],
        bias=_bias_copy(module),
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
    )


def _mha_weight(module: nn.Module) -> Tensor:
    return module.in_proj_weight


def _mha_bias(module: nn.Module) -> Tensor | None:
    return module.in_proj_bias


def _mha_replacement(module: nn.Module) -> SharedProjection:
    # The packed bias stays on the attention module as in_proj_bias
    return SharedProjection(module.embed_dim, bias=None)


def _mha_install(module: nn.Module, in_proj: SharedProjection) -> nn.Module:
    new = SharedMultiheadAttention.from_module(module, in_proj)
    if module.in_proj_bias is not None:
        bias = module.in_proj_bias
        new.in_proj_bias = nn.Parameter(bias.detach().clone(), bias.requires_grad)
    return new


#: Layout name -> reader and builder.
LAYOUTS: dict[str, Layout] = {
    # nn.Linear / F.linear on a module's weight: stored (out, in)
    "linear": Layout(weight=_linear_weight, replacement=_linear_replacement),
    # transformers' Conv1D (GPT-2): stored (in, out), computes x @ W + b
    "conv1d": Layout(weight=_conv1d_weight, replacement=_conv1d_replacement),
    # A 1x1 nn.Conv2d with one group: a Linear over channels, rows on dim 1
    "conv1x1": Layout(
        weight=_conv1x1_weight,
        replacement=_conv1x1_replacement,
        out_dim=1,
    ),
    # nn.MultiheadAttention's packed in_proj_weight (3E, E): q, k, v rows
    "mha_in_proj": Layout(
        weight=_mha_weight,
        replacement=_mha_replacement,
        bias=_mha_bias,
        install=_mha_install,
        called=False,
    ),
}


def read_rows(module: nn.Module, layout: str, start: int, stop: int | None) -> Tensor:
    """The rows ``[start, stop)`` of a projection's ``(out, in)`` weight, a view."""
    return LAYOUTS[layout].weight(module)[start:stop]
