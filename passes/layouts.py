"""Layouts: how each kind of projection stores its weight, read and written.

A layout knows how to read the ``(rows, in)`` block of one role out of a projection
module, and how to build the :class:`SharedProjection` that replaces the module.
Layouts are data: a table from name to reader and builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from masasurgery.modules import SharedProjection

__all__ = ["LAYOUTS", "Layout", "read_rows"]


@dataclass(frozen=True)
class Layout:
    """How one projection layout is read and replaced.

    Attributes:
        weight: The module's weight as ``(out, in)``, a view where possible.
        replacement: An empty :class:`SharedProjection` standing in for the module.
    """

    weight: Callable[[nn.Module], Tensor]
    replacement: Callable[[nn.Module], SharedProjection]


def _linear_weight(module: nn.Module) -> Tensor:
    return module.weight


def _linear_replacement(module: nn.Module) -> SharedProjection:
    bias = module.bias
    if bias is not None:
        bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return SharedProjection(module.weight.shape[1], bias=bias)


#: Layout name -> reader and builder. TODO(issue 3): GPT-2 Conv1D (weight stored
#: ``(in, out)``), nn.MultiheadAttention's packed in_proj, 1x1 convolutions.
LAYOUTS: dict[str, Layout] = {
    # nn.Linear / F.linear on a module's weight: (out, in)
    "linear": Layout(weight=_linear_weight, replacement=_linear_replacement),
}


def read_rows(module: nn.Module, layout: str, start: int, stop: int) -> Tensor:
    """The rows ``[start, stop)`` of a projection's ``(out, in)`` weight, a view."""
    return LAYOUTS[layout].weight(module)[start:stop]
