"""Walks between an attention core and its projections.

A walk goes back from one of the core's q, k and v inputs to the projection that
produced it, or forward from the core's output to the output projection, through
data movement, shape-preserving ops and ops that keep channels apart. A
projection is recognised by the weight it reads, not by the calling module: a
``Linear``, ``F.linear`` on a module's weight, a plain 1x1 ``Conv2d``, the packed
``in_proj_weight`` of ``nn.MultiheadAttention``, or GPT-2's ``Conv1D``. The
:class:`Walk` that comes out is replayed on row indices by
:mod:`masasurgery.passes.provenance`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from masasurgery.passes.layouts import LAYOUTS
from masasurgery.passes.ops import (
    CONV2D_FUNCTIONS,
    LINEAR_FUNCTIONS,
    MATMUL_WEIGHT_ARG,
    _arg,
    _shape,
    data_input,
    is_arithmetic,
    is_concat,
    is_conv1x1,
    keeps_channels,
    moves_data,
    packet,
    passes_through,
    reduces_tokens,
)
from torch import fx, nn

__all__ = [
    "NotASite",
    "Walk",
    "walk_to_output",
    "walk_to_projection",
    "weight_shape",
]

# How many nodes a walk from a core to a projection may pass.
_MAX_WALK = 48


class NotASite(Exception):
    """Why a core's projections could not be read."""


@dataclass
class Walk:
    """A path from a projection node to a core input, in forward order."""

    target: str
    layout: str
    source: fx.Node
    chain: list[fx.Node]
    per_channel: set[fx.Node] = field(default_factory=set)


def walk_to_projection(start: Any, modules: dict[str, nn.Module]) -> Walk:
    """The subgraph between one projection call and a core input.

    A depth-first walk back through data movement and shape-preserving ops (see
    :func:`_walk_inputs`); a concatenation or arithmetic on several inputs is
    followed into each, and all branches must end at the same projection call.
    The chain comes out in forward order.
    """
    walker = _Walker(start, modules)
    walker.visit(start)
    if len(walker.sources) != 1:
        calls = sorted(f"{n.name} ({t})" for n, (t, _) in walker.sources.items())
        raise NotASite(f"{start} mixes the outputs of projections {calls}")
    ((source, (target, layout)),) = walker.sources.items()
    return Walk(target, layout, source, walker.chain, walker.per_channel)


class _Walker:
    """The state of one walk back from a core input."""

    def __init__(self, start: Any, modules: dict[str, nn.Module]) -> None:
        self.start, self.modules = start, modules
        self.chain: list[fx.Node] = []
        self.sources: dict[fx.Node, tuple[str, str]] = {}
        self.seen: set[fx.Node] = set()
        self.per_channel: set[fx.Node] = set()

    def visit(self, node: Any) -> None:
        if not isinstance(node, fx.Node):
            raise NotASite(f"no projection before {self.start}: reached {node!r}")
        if node in self.seen:
            return
        self.seen.add(node)
        if len(self.seen) > _MAX_WALK:
            raise NotASite(
                f"no projection found within {_MAX_WALK} nodes before {self.start}"
            )
        found = _projection(node, self.modules)
        if found is not None:
            self.sources[node] = found
            return

        # Follow the inputs that carry the data, then record the node
        inputs = _walk_inputs(node, self.modules)
        if inputs is None:
            raise NotASite(
                f"no projection before {self.start}: stopped at {_describe(node)}"
            )
        if reduces_tokens(node) or keeps_channels(node, self.modules):
            if not passes_through(node, self.modules):
                self.per_channel.add(node)
        if is_arithmetic(node):
            self._visit_operands(inputs)
        else:
            for arg in inputs:
                self.visit(arg)
        self.chain.append(node)  # after its inputs: forward order

    def _visit_operands(self, inputs: list[fx.Node]) -> None:
        """Arithmetic: every data operand must reach the projection, except a
        statistic of the walked tensor itself (``x / x.norm()``)."""
        failed: list[tuple[fx.Node, NotASite]] = []
        for arg in inputs:
            saved = self._save()
            try:
                self.visit(arg)
            except NotASite as e:
                self._restore(saved)
                failed.append((arg, e))
        if len(failed) == len(inputs):
            raise failed[0][1]
        for arg, error in failed:
            if not _derives_from(arg, self.seen):
                raise error

    def _save(self) -> tuple:
        return (
            len(self.chain),
            set(self.seen),
            dict(self.sources),
            set(self.per_channel),
        )

    def _restore(self, saved: tuple) -> None:
        length, self.seen, self.sources, self.per_channel = saved
        del self.chain[length:]


def _derives_from(node: fx.Node, targets: set[fx.Node], depth: int = 16) -> bool:
    """Whether ``node`` is computed from one of ``targets`` within ``depth`` steps."""
    frontier, visited = [node], set()
    for _ in range(depth):
        upstream = []
        for n in frontier:
            if n in targets:
                return True
            if n not in visited:
                visited.add(n)
                upstream.extend(n.all_input_nodes)
        frontier = upstream
    return False


def _walk_inputs(node: fx.Node, modules: dict[str, nn.Module]) -> list[Any] | None:
    """The inputs a walk back from ``node`` follows; None where it must stop.

    * A concatenation: every input.
    * Arithmetic (``x * cos + rotate(x) * sin``): every input that has the
      output's shape and depends on the model's inputs; broadcast operands and
      tables computed from constants (rotary ``cos``, ``sin``) are not data. A
      residual ``proj(x) + x`` thus fails, as the shortcut reaches no projection.
    * Data movement, shape-preserving ops, and ops that keep each channel apart
      while changing the tokens (pooling, depthwise convolutions, reductions over
      tokens): the data input.
    """
    if is_concat(node):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        return [t for t in tensors if isinstance(t, fx.Node)]
    if is_arithmetic(node):
        data = _data_nodes(node.graph)
        inputs = node.all_input_nodes
        same = [a for a in inputs if _shape(a) == _shape(node) and a in data]
        return same or None
    if moves_data(node) or passes_through(node, modules):
        return [data_input(node)]
    if reduces_tokens(node) or keeps_channels(node, modules):
        return [data_input(node)]
    return None


_DATA_NODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _data_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The tensors computed from the model's tensor inputs; sizes read off a
    tensor (``x.shape``) are not data. Cached per graph."""
    if graph not in _DATA_NODES:
        data: set[fx.Node] = set()
        for node in graph.nodes:
            is_tensor = "tensor_meta" in node.meta
            if node.op == "placeholder":
                if is_tensor:
                    data.add(node)
            elif is_tensor and any(a in data for a in node.all_input_nodes):
                data.add(node)
        _DATA_NODES[graph] = data
    return _DATA_NODES[graph]


def walk_to_output(start: fx.Node, modules: dict[str, nn.Module]) -> Walk | None:
    chain: list[fx.Node] = []
    node = start
    while len(node.users) == 1 and len(chain) < _MAX_WALK:
        user = next(iter(node.users))
        if data_input(user) is not node:
            return None
        found = _projection(user, modules)
        if found is not None:
            return Walk(*found, source=user, chain=chain)
        if not (moves_data(user) or passes_through(user, modules)):
            return None
        chain.append(user)
        node = user
    return None


def _projection(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    """``(owner, layout)`` when ``node`` multiplies by a projection's weight.

    Projections are recognised by the weight they read, not by the calling
    module: ``F.linear(x, self.qkv.weight, bias)`` counts as ``qkv``.
    """
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, nn.Linear):
            return node.target, "linear"
        return (node.target, "conv1x1") if is_conv1x1(module) else None
    if node.op != "call_function":
        return None

    # aten.conv2d on a 1x1 convolution's weight (export)
    if packet(node.target) in CONV2D_FUNCTIONS:
        owner = _weight_owner(_arg(node, 1, "weight"), modules)
        if owner is not None and is_conv1x1(modules[owner]):
            return owner, "conv1x1"

    # F.linear / aten.linear on a Linear's weight (out, in), or on the packed
    # in_proj_weight (3E, E) of nn.MultiheadAttention
    if packet(node.target) in LINEAR_FUNCTIONS:
        weight = _arg(node, 1, "weight")
        owner = _weight_owner(weight, modules)
        if owner is not None and isinstance(modules[owner], nn.Linear):
            return owner, "linear"
        owner = _weight_owner(weight, modules, name="in_proj_weight")
        if owner is not None and isinstance(modules[owner], nn.MultiheadAttention):
            return owner, "mha_in_proj"

    # x @ W (+ b) on a weight stored (in, out), as GPT-2's Conv1D does
    index = MATMUL_WEIGHT_ARG.get(packet(node.target))
    if index is not None and len(node.args) > index:
        owner = _weight_owner(node.args[index], modules)
        if owner is not None and type(modules[owner]).__name__ == "Conv1D":
            return owner, "conv1d"
    return None


def _weight_owner(
    weight: Any, modules: dict[str, nn.Module], name: str = "weight"
) -> str | None:
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    owner, _, attr = weight.target.rpartition(".")
    return owner if attr == name and owner in modules else None


def weight_shape(walk: Walk, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """``(out, in)`` of a projection's weight, whatever its storage layout."""
    rows, cols = LAYOUTS[walk.layout].weight(modules[walk.target]).shape
    return rows, cols


def _describe(node: fx.Node) -> str:
    return f"{node.op} {node.target!s} ({node.name})"
