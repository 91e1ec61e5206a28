"""Row provenance: which rows of a projection's weight reach a core input.

A walk is replayed on a tensor that holds, in each element, the row of the
projection's weight it came from, so the rows that end up in q, k and v are read
off exactly: a fused ``qkv`` Linear, a ``kv`` Linear and separate projections
all come out of the same rule. Padding holds -1, no row; ops that mix rows, or
a core input that reads rows that are not contiguous, stop the site.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from masasurgery.passes.layouts import LAYOUTS
from masasurgery.passes.ops import (
    SHAPE_OF_OTHER,
    _shape,
    data_input,
    is_pad,
    moves_data,
    reduces_tokens,
    reduction_dims,
)
from masasurgery.passes.walks import NotASite, Walk
from torch import fx

__all__ = ["rows_of"]


def rows_of(walk: Walk, arg: fx.Node) -> tuple[int, int]:
    """The ``[start, stop)`` rows of the projection that ``arg`` carries.

    The walk is replayed on a tensor that holds, in each element, the row of the
    projection's weight it came from (float64, exact for any width); padding
    holds -1, no row.
    """
    shape = _shape(walk.source)
    if shape is None:
        raise NotASite(f"no recorded shape for {walk.source.name}")
    dim = LAYOUTS[walk.layout].out_dim % len(shape)
    index = torch.arange(shape[dim], dtype=torch.float64)
    index = index.view(-1, *[1] * (len(shape) - dim - 1))
    values: dict[fx.Node, Any] = {walk.source: index.expand(shape)}
    for node in walk.chain:
        values[node] = _replay(node, values, walk)

    rows = torch.unique(values[arg])
    rows = rows[rows >= 0]
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if rows.numel() != stop - start:
        # TODO(issue 3): interleaved layouts (GPT-NeoX's per-head qkv, levit's
        # and tiny_vit's per-head q|k|v) need a row permutation in
        # SharedProjection; skipped until then.
        raise NotASite(
            f"{arg.name} reads rows of {walk.target} that are not contiguous"
        )
    return start, stop


def _replay(node: fx.Node, values: dict[fx.Node, Any], walk: Walk) -> Any:
    """Run one node of a walk on row indices."""
    if node in walk.per_channel:
        return _replay_per_channel(node, values[data_input(node)], walk)
    if not moves_data(node):
        # Shape-preserving: every element stays; merged branches must agree
        inputs = [values[a] for a in node.all_input_nodes if a in values]
        rows = [torch.unique(v) for v in inputs]
        if any(not torch.equal(rows[0], r) for r in rows[1:]):
            raise NotASite(f"{node.name} mixes different rows of {walk.target}")
        return inputs[0]

    def concrete(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a in values:
            return values[a]
        if "value" in a.meta:
            return a.meta["value"]
        if _shape(a) is not None and node.target in SHAPE_OF_OTHER:
            return torch.empty(_shape(a), device="meta")  # only its shape is read
        raise NotASite(f"{node.name} depends on tensor {a.name}")

    args = fx.node.map_aggregate(node.args, concrete)
    kwargs = fx.node.map_aggregate(node.kwargs, concrete)
    if is_pad(node):
        return _replay_pad(args, kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _replay_pad(args: tuple, kwargs: dict) -> torch.Tensor:
    # Constant padding holds no row: -1
    x, pad = args[0], args[1]
    mode = args[2] if len(args) > 2 and isinstance(args[2], str) else "constant"
    mode = kwargs.get("mode", mode)
    if mode == "constant":
        return F.pad(x, pad, value=-1.0)
    return F.pad(x, pad, mode=mode)


def _replay_per_channel(node: fx.Node, value: torch.Tensor, walk: Walk) -> Any:
    """Pooling, depthwise convolution, reduction: each output channel reads the
    rows of its own input channel, so rows must not vary over what is reduced."""
    if reduces_tokens(node):
        dims, keepdim = reduction_dims(node)
    else:
        dims, keepdim = tuple(range(2, value.dim())), True
    high = torch.amax(value, dim=dims, keepdim=keepdim)
    if not torch.equal(high, torch.amin(value, dim=dims, keepdim=keepdim)):
        raise NotASite(f"{node.name} mixes different rows of {walk.target}")
    shape = _shape(node)
    return high if reduces_tokens(node) or shape is None else high.expand(shape)
