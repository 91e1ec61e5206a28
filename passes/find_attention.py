"""Find attention: locate each attention core and the projections around it.

The finder works on the graph, not on module names:

1. Every attention core is found: a ``scaled_dot_product_attention`` call, or a
   ``softmax`` fed by a matmul and feeding a matmul.
2. From the core's q, k and v inputs the finder walks back to the projection that
   produced each one (a ``Linear`` module, or ``F.linear`` on a module's weight),
   through data movement (reshape, permute, unbind, ...) and shape-preserving ops
   (norms, scaling, rotary embeddings).
3. It then replays the data movement on a tensor that holds each output row's index,
   so the rows of the projection that end up in q, k and v are read off exactly: a
   fused ``qkv`` Linear, a ``kv`` Linear and separate projections all come out of
   the same rule.
4. From the core's output it walks forward to the output projection (role ``o``).

Cores whose projections cannot be read are kept as :class:`SkippedSite` with the
reason, and the reason is logged at debug level.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from masasurgery.passes.capture import Capture
from masasurgery.passes.layouts import LAYOUTS
from torch import fx, nn

__all__ = [
    "AttentionSite",
    "Findings",
    "Projection",
    "SkippedSite",
    "find_attention",
]

logger = logging.getLogger(__name__)

# How many nodes a walk from a core to a projection may pass.
_MAX_WALK = 48


@dataclass
class Projection:
    """One projection module and the rows of its weight that each role owns.

    Attributes:
        target: Qualified name of the module that owns the weight.
        roles: Role to ``(start, stop)`` rows of the ``(out, in)`` weight.
        out_features: Rows of the weight.
        in_features: Columns of the weight.
        layout: How the weight is stored; ``"linear"`` is ``(out, in)``.
    """

    target: str
    roles: dict[str, tuple[int, int]]
    out_features: int
    in_features: int
    layout: str = "linear"

    def signature(self) -> tuple:
        """What two blocks must share for their projections to share atoms."""
        roles = tuple(sorted(self.roles.items(), key=lambda kv: kv[1]))
        return (roles, self.out_features, self.in_features, self.layout)


@dataclass
class AttentionSite:
    """One attention block: its core node and its projections.

    Attributes:
        core: Name of the core node (the SDPA call, or the softmax).
        kind: ``"sdpa"`` or ``"softmax"``.
        block: The longest module prefix shared by the projections (``blocks.3.attn``).
        projections: The projection modules, in role order.
        num_heads: Heads of q, read from its shape, when q is 4-D.
        head_dim: Width of one head of q.
        nodes: Names of the structural nodes between the projections and the
            output projection (projections, data movement, the core's matmuls
            and softmax): the attention subgraph, used to group blocks.
    """

    core: str
    kind: str
    block: str
    projections: list[Projection]
    num_heads: int | None = None
    head_dim: int | None = None
    nodes: list[str] = field(default_factory=list, repr=False)

    @property
    def roles(self) -> list[str]:
        found = [r for p in self.projections for r in p.roles]
        return [r for r in ("q", "k", "v", "o") if r in found]

    def projection_of(self, role: str) -> Projection | None:
        """The projection that holds ``role``, or None."""
        for projection in self.projections:
            if role in projection.roles:
                return projection
        return None


@dataclass
class SkippedSite:
    """An attention core whose projections could not be read, and why."""

    core: str
    reason: str


@dataclass
class _Walk:
    """A path from a projection node to a core input, in forward order."""

    target: str
    layout: str
    source: fx.Node
    chain: list[fx.Node]


@dataclass
class Findings:
    """What :func:`find_attention` found: sites in graph order, and skipped cores."""

    sites: list[AttentionSite]
    skipped: list[SkippedSite]


def find_attention(capture: Capture) -> Findings:
    """Find every attention site in a captured graph.

    Args:
        capture: A graph with shapes recorded (see :func:`capture`).

    Returns:
        The sites found, in graph order, and the cores that were skipped.

    Example:
        >>> import timm
        >>> from masasurgery.passes import Inputs, capture
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> x = torch.randn(1, 3, 224, 224)
        >>> found = find_attention(capture(m, Inputs.of(x)))
        >>> found.sites[0].projection_of("q").roles
        {'q': (0, 192), 'k': (192, 384), 'v': (384, 576)}
    """
    modules = dict(capture.gm.named_modules()) | dict(capture.model.named_modules())
    sites: list[AttentionSite] = []
    skipped: list[SkippedSite] = []
    for node in capture.gm.graph.nodes:
        core = _match_core(node, modules)
        if core is None:
            continue
        try:
            sites.append(_read_site(core, modules))
        except _NotASite as e:
            logger.debug("skipped attention core %s: %s", node.name, e)
            skipped.append(SkippedSite(core=node.name, reason=str(e)))
    return Findings(sites=sites, skipped=skipped)


class _NotASite(Exception):
    """Why a core's projections could not be read."""


@dataclass
class _Core:
    node: fx.Node  # the SDPA call or the softmax
    kind: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node  # the node whose output leaves the core
    inner: list[fx.Node]  # core nodes between the inputs and ``out``


def _read_site(core: _Core, modules: dict[str, nn.Module]) -> AttentionSite:
    # Walk back from q, k and v to their projections; read the rows of each
    projections: dict[str, Projection] = {}
    walks = []
    for role, arg in (("q", core.q), ("k", core.k), ("v", core.v)):
        walk = _walk_to_projection(arg, modules)
        rows = _rows_of(walk, arg)
        _add_role(projections, walk, role, rows, modules)
        walks.append(walk)

    # Walk forward from the core to the output projection
    o_walk = _walk_to_output(core.out, modules)
    if o_walk is not None:
        width = _weight_shape(o_walk, modules)[0]
        _add_role(projections, o_walk, "o", (0, width), modules)
        walks.append(o_walk)

    # The attention subgraph, for grouping, and the head layout of q
    # The structure of the site: projections, data movement and the core. Masks,
    # scales and norms are left out, so Swin's shifted and plain windows match
    nodes = [
        n
        for w in walks
        for n in [w.source, *w.chain]
        if n is w.source or _moves_data(n)
    ]
    nodes = list(dict.fromkeys([*nodes, *_core_structure(core)]))
    shape = _shape(core.q)
    heads = (shape[1], shape[-1]) if shape is not None and len(shape) == 4 else None
    ordered = sorted(projections.values(), key=lambda p: _first_role(p))
    return AttentionSite(
        core=core.node.name,
        kind=core.kind,
        block=_common_prefix([p.target for p in ordered]),
        projections=ordered,
        num_heads=heads[0] if heads else None,
        head_dim=heads[1] if heads else None,
        nodes=[n.name for n in nodes],
    )


def _core_structure(core: _Core) -> list[fx.Node]:
    if core.kind == "sdpa":
        return [core.node]
    scores = [n for n in core.inner if _is_matmul(n)]
    return [*scores, core.node, core.out]


def _add_role(
    projections: dict[str, Projection],
    walk: _Walk,
    role: str,
    rows: tuple[int, int],
    modules: dict[str, nn.Module],
) -> None:
    out_features, in_features = _weight_shape(walk, modules)
    projection = projections.setdefault(
        walk.target,
        Projection(walk.target, {}, out_features, in_features, walk.layout),
    )
    for other, (start, stop) in projection.roles.items():
        if start < rows[1] and rows[0] < stop:
            raise _NotASite(
                f"roles {other!r} and {role!r} overlap in {walk.target} rows "
                f"{(start, stop)} and {rows}"
            )
    projection.roles[role] = rows


def _first_role(projection: Projection) -> int:
    return min(("q", "k", "v", "o").index(r) for r in projection.roles)


# ---------------------------------------------------------------------------
# Cores


aten = torch.ops.aten

# Ops are compared by packet, so every overload of an aten op matches.
_SDPA = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    aten.scaled_dot_product_attention,
}
_SOFTMAX_FUNCTIONS = {
    F.softmax, torch.softmax, torch.Tensor.softmax,
    aten.softmax, aten._softmax, aten._safe_softmax,
}  # fmt: skip
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, aten.matmul, aten.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_EINSUM_FUNCTIONS = {torch.einsum, aten.einsum}
_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear}
# Ops that multiply by a weight at this argument position: x @ W (+ bias)
_MATMUL_WEIGHT_ARG = {aten.addmm: 2, aten.mm: 1, aten.matmul: 1, torch.addmm: 2}
# Ops whose data input is not their first node argument
_DATA_ARG = {aten.addmm: 1, torch.addmm: 1}


def _match_core(node: fx.Node, modules: dict[str, nn.Module]) -> _Core | None:
    if node.op == "call_function" and _packet(node.target) in _SDPA:
        q, k, v = (
            _arg(node, i, name) for i, name in enumerate(("query", "key", "value"))
        )
        return _Core(node, "sdpa", q, k, v, out=node, inner=[])
    if _is_softmax(node):
        return _match_softmax_core(node, modules)
    return None


def _match_softmax_core(
    softmax: fx.Node, modules: dict[str, nn.Module]
) -> _Core | None:
    # Back from the softmax, through scaling, masking and reshapes (Swin's
    # shifted windows add their mask per window), to the scores matmul
    inner = []
    scores = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    while isinstance(scores, fx.Node) and not _is_matmul(scores):
        layout_op = _passes_through(scores, modules) or _moves_data(scores)
        if not layout_op or len(inner) > 8:
            return None
        inner.append(scores)
        scores = _data_input(scores)
    if not isinstance(scores, fx.Node):
        return None

    # Forward from the softmax, through dropout, to the matmul with v
    probs = softmax
    while len(probs.users) == 1:
        user = next(iter(probs.users))
        if _is_matmul(user) and _operands(user)[0] is probs:
            (q, k), v = _operands(scores), _operands(user)[1]
            inner += [scores, softmax, probs]
            return _Core(softmax, "softmax", q, k, v, out=user, inner=inner)
        if not _passes_through(user, modules):
            return None
        probs = user
    return None


def _operands(matmul: fx.Node) -> tuple[Any, Any]:
    """The two tensors a matmul (or a two-operand einsum) multiplies."""
    if _packet(matmul.target) in _EINSUM_FUNCTIONS:
        operands = matmul.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]  # aten.einsum(equation, [a, b])
        return (operands[0], operands[1]) if len(operands) == 2 else (None, None)
    return matmul.args[0], matmul.args[1]


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function":
        return _packet(node.target) in _SOFTMAX_FUNCTIONS
    return node.op == "call_method" and node.target == "softmax"


def _is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function" and _packet(node.target) in _EINSUM_FUNCTIONS:
        return _operands(node)[1] is not None
    if node.op == "call_function":
        return _packet(node.target) in _MATMUL_FUNCTIONS
    return node.op == "call_method" and node.target in _MATMUL_METHODS


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs[name]


# ---------------------------------------------------------------------------
# Walks between cores and projections


def _walk_to_projection(start: Any, modules: dict[str, nn.Module]) -> _Walk:
    chain: list[fx.Node] = []
    node = start
    while isinstance(node, fx.Node) and len(chain) < _MAX_WALK:
        found = _projection(node, modules)
        if found is not None:
            return _Walk(*found, source=node, chain=chain[::-1])
        if not (_moves_data(node) or _passes_through(node, modules)):
            raise _NotASite(
                f"no projection before {start}: stopped at {_describe(node)}"
            )
        chain.append(node)
        node = _data_input(node)
    raise _NotASite(f"no projection found within {_MAX_WALK} nodes before {start}")


def _walk_to_output(start: fx.Node, modules: dict[str, nn.Module]) -> _Walk | None:
    chain: list[fx.Node] = []
    node = start
    while len(node.users) == 1 and len(chain) < _MAX_WALK:
        user = next(iter(node.users))
        if _data_input(user) is not node:
            return None
        found = _projection(user, modules)
        if found is not None:
            return _Walk(*found, source=user, chain=chain)
        if not (_moves_data(user) or _passes_through(user, modules)):
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
        return (node.target, "linear") if isinstance(module, nn.Linear) else None
    if node.op != "call_function":
        return None

    # F.linear / aten.linear on a Linear's weight (out, in), or on the packed
    # in_proj_weight (3E, E) of nn.MultiheadAttention
    if _packet(node.target) in _LINEAR_FUNCTIONS:
        weight = _arg(node, 1, "weight")
        owner = _weight_owner(weight, modules)
        if owner is not None and isinstance(modules[owner], nn.Linear):
            return owner, "linear"
        owner = _weight_owner(weight, modules, name="in_proj_weight")
        if owner is not None and isinstance(modules[owner], nn.MultiheadAttention):
            return owner, "mha_in_proj"

    # x @ W (+ b) on a weight stored (in, out), as GPT-2's Conv1D does
    index = _MATMUL_WEIGHT_ARG.get(_packet(node.target))
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


def _weight_shape(walk: _Walk, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """``(out, in)`` of a projection's weight, whatever its storage layout."""
    rows, cols = LAYOUTS[walk.layout].weight(modules[walk.target]).shape
    return rows, cols


def _data_input(node: fx.Node) -> fx.Node | None:
    """The tensor a unary-like op transforms: its first node argument, except
    for ops like ``addmm(bias, x, W)`` whose data comes later."""
    index = _DATA_ARG.get(_packet(node.target)) if node.op == "call_function" else None
    if index is not None:
        arg = node.args[index] if len(node.args) > index else None
        return arg if isinstance(arg, fx.Node) else None
    for arg in node.args:
        if isinstance(arg, fx.Node):
            return arg
    return None


def _packet(target: Any) -> Any:
    """An aten overload's packet (``aten.view``), anything else as it is."""
    return getattr(target, "overloadpacket", target)


# Ops that only move data: replaying them on row indices is exact.
_MOVE_METHODS = {
    "reshape", "view", "permute", "transpose", "unbind", "chunk", "split",
    "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
    "movedim", "narrow", "select", "repeat_interleave", "swapaxes", "tensor_split",
    "__getitem__",
}  # fmt: skip
_MOVE_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.unbind,
    torch.chunk, torch.split, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.movedim, torch.narrow, torch.select, torch.repeat_interleave,
    torch.swapaxes, torch.tensor_split,
    aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose,
    aten.t, aten.unbind, aten.chunk, aten.split, aten.split_with_sizes,
    aten.unflatten, aten.flatten, aten.squeeze, aten.unsqueeze, aten.expand,
    aten.movedim, aten.narrow, aten.select, aten.slice, aten.repeat_interleave,
    aten.clone, aten.contiguous, aten.alias, aten.tensor_split,
}  # fmt: skip
# Modules a walk may pass: they keep a tensor's layout (norms, dropout, identity).
_LAYOUT_MODULES = (
    nn.Identity, nn.Dropout, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)  # fmt: skip


def _moves_data(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _MOVE_METHODS
    if node.op == "call_function":
        if node.target is getattr and node.args[1] in ("T", "mT"):
            return True
        return _packet(node.target) in _MOVE_FUNCTIONS
    return False


def _passes_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Shape-preserving ops that keep each element in place (norms, scaling)."""
    data = _data_input(node)
    if data is None or _shape(node) is None or _shape(node) != _shape(data):
        return False
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, _LAYOUT_MODULES) or _is_small_norm(module)
    if node.op == "call_function" and _packet(node.target) in _LINEAR_FUNCTIONS:
        return False  # a Linear of width ``in == out`` is no layout op
    return node.op in ("call_function", "call_method") and not _is_matmul(node)


def _is_small_norm(module: nn.Module | None) -> bool:
    # Norm-like leaf modules of other libraries: only vector parameters
    if module is None or "norm" not in type(module).__name__.lower():
        return False
    return all(p.dim() <= 1 for p in module.parameters())


# ---------------------------------------------------------------------------
# Row provenance


def _rows_of(walk: _Walk, arg: fx.Node) -> tuple[int, int]:
    """The ``[start, stop)`` rows of the projection that ``arg`` carries."""
    shape = _shape(walk.source)
    if shape is None:
        raise _NotASite(f"no recorded shape for {walk.source.name}")
    value: Any = torch.arange(shape[-1]).expand(shape)
    previous = walk.source
    for node in walk.chain:
        value = _replay(node, previous, value)
        previous = node

    rows = torch.unique(value)
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if rows.numel() != stop - start:
        # TODO(issue 3): interleaved layouts (GPT-NeoX's per-head qkv) need a
        # row permutation in SharedProjection; skipped until then.
        raise _NotASite(
            f"{arg.name} reads rows of {walk.target} that are not contiguous"
        )
    return start, stop


def _replay(node: fx.Node, data: fx.Node, value: Any) -> Any:
    if not _moves_data(node):
        return value  # shape-preserving: every element stays in place

    def concrete(a: Any) -> Any:
        if a is data:
            return value
        if isinstance(a, fx.Node):
            if "value" not in a.meta:
                raise _NotASite(f"{node.name} depends on tensor {a.name}")
            return a.meta["value"]
        return a

    args = fx.node.map_aggregate(node.args, concrete)
    kwargs = fx.node.map_aggregate(node.kwargs, concrete)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _shape(node: Any) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _describe(node: fx.Node) -> str:
    return f"{node.op} {node.target!s} ({node.name})"


def _common_prefix(targets: list[str]) -> str:
    parts = [t.split(".")[:-1] for t in targets]
    prefix = []
    for names in zip(*parts, strict=False):
        if len(set(names)) != 1:
            break
        prefix.append(names[0])
    return ".".join(prefix)
