"""Attention cores: the node where q, k and v meet, and the nodes inside it.

A core is a ``scaled_dot_product_attention`` call; a ``softmax`` fed by a
matmul (through scaling, masks, biases and head-mixing Linears) whose
probabilities reach a matmul with v (through dropout, transposes, gating and
renormalisation); or a softmax over the keys whose context ``softmax(k)^T @ v``
is multiplied by q (factorized attention). :func:`match_core` reads one node and
returns the core's q, k and v inputs and its output, or None.
"""

from __future__ import annotations

from dataclasses import dataclass

from masasurgery.passes.ops import (
    LINEAR_FUNCTIONS,
    SDPA,
    _arg,
    _shape,
    data_input,
    is_conv1x1,
    is_matmul,
    is_softmax,
    moves_data,
    operands,
    packet,
    passes_through,
)
from torch import fx, nn

__all__ = ["Core", "match_core"]


@dataclass
class Core:
    node: fx.Node  # the SDPA call or the softmax
    kind: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node  # the node whose output leaves the core
    inner: list[fx.Node]  # core nodes between the inputs and ``out``


def match_core(node: fx.Node, modules: dict[str, nn.Module]) -> Core | None:
    if node.op == "call_function" and packet(node.target) in SDPA:
        q, k, v = (
            _arg(node, i, name) for i, name in enumerate(("query", "key", "value"))
        )
        return Core(node, "sdpa", q, k, v, out=node, inner=[])
    if is_softmax(node):
        core = _match_softmax_core(node, modules)
        return core or _match_factorized_core(node, modules)
    return None


def _match_softmax_core(softmax: fx.Node, modules: dict[str, nn.Module]) -> Core | None:
    # Back from the softmax, through scaling, masking, reshapes (Swin's shifted
    # windows add their mask per window) and head-mixing Linears (cait's
    # talking heads), to the scores matmul
    inner = []
    scores = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    while isinstance(scores, fx.Node) and not is_matmul(scores):
        passes = passes_through(scores, modules) or moves_data(scores)
        if not (passes or _mixes_heads(scores, modules)) or len(inner) > 8:
            return None
        inner.append(scores)
        scores = data_input(scores)
    if not isinstance(scores, fx.Node):
        return None

    # Forward from the softmax to the matmul that weighs v
    found = _probabilities_matmul(softmax, modules)
    if found is None:
        return None
    user, probs, path = found
    (q, k), v = operands(scores), operands(user)[1 - operands(user).index(probs)]
    inner += [scores, softmax, *path]
    return Core(softmax, "softmax", q, k, v, out=user, inner=inner)


def _match_factorized_core(
    softmax: fx.Node, modules: dict[str, nn.Module]
) -> Core | None:
    """Factorized attention (CoaT, efficient attention): ``q @ (softmax(k)^T @ v)``.

    The softmax normalises the keys themselves, not scores: its input is k, the
    matmul it reaches is the context ``softmax(k)^T @ v``, and the next matmul
    that the context reaches multiplies it by q.
    """
    k = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    found = _probabilities_matmul(softmax, modules)
    if not isinstance(k, fx.Node) or found is None:
        return None
    context, keys, path = found
    v = operands(context)[1 - operands(context).index(keys)]
    found = _probabilities_matmul(context, modules)
    if found is None:
        return None
    out, ctx, tail = found
    q = operands(out)[1 - operands(out).index(ctx)]
    inner = [softmax, *path, context, *tail]
    return Core(softmax, "factorized", q, k, v, out=out, inner=inner)


def _probabilities_matmul(
    softmax: fx.Node, modules: dict[str, nn.Module]
) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """The matmul that the probabilities reach, its operand on the path, the path.

    A breadth-first walk over the users of the softmax, through ops that keep
    the probabilities' elements apart: dropout, reshapes and transposes
    (``v @ attn.transpose(-2, -1)``), elementwise mixing with other scores
    (convit's gated positional attention), renormalisation, head-mixing Linears.
    """
    path, frontier = [softmax], [softmax]
    for _ in range(8):
        following = []
        for node in frontier:
            for user in node.users:
                if is_matmul(user) and node in operands(user):
                    return user, node, path
                if user not in path and _keeps_scores(user, node, modules):
                    path.append(user)
                    following.append(user)
        frontier = following
    return None


def _keeps_scores(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if moves_data(user) and data_input(user) is node:
        return True
    if _mixes_heads(user, modules):
        return data_input(user) is node
    if user.op == "call_module":
        return passes_through(user, modules)
    elementwise = _shape(user) is not None and _shape(user) == _shape(node)
    return elementwise and user.op in ("call_function", "call_method")


def _mixes_heads(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A Linear (or 1x1 conv) of width ``in == out`` on scores (talking heads)."""
    data = data_input(node)
    if data is None or _shape(node) is None or _shape(node) != _shape(data):
        return False
    if node.op == "call_module":
        module = modules.get(node.target)
        conv = is_conv1x1(module) and module.in_channels == module.out_channels
        return isinstance(module, nn.Linear) or conv
    return node.op == "call_function" and packet(node.target) in LINEAR_FUNCTIONS
