"""Find attention: locate each attention core and the projections around it.

The finder works on the graph, not on module names:

1. Every attention core is found: a ``scaled_dot_product_attention`` call; a
   ``softmax`` fed by a matmul (through scaling, masks, biases and head-mixing
   Linears) whose probabilities reach a matmul with v (through dropout,
   transposes, gating and renormalisation); or a softmax over the keys whose
   context ``softmax(k)^T @ v`` is multiplied by q (factorized attention).
2. From the core's q, k and v inputs the finder walks back to the projection that
   produced each one (a ``Linear`` module, ``F.linear`` on a module's weight, or a
   plain 1x1 ``Conv2d``, a Linear over channels). The walk passes data movement
   (reshape, permute, unbind, cat, pad, unfold, ...), shape-preserving ops (norms,
   activations, scaling, rotary embeddings) and ops that keep channels apart while
   changing the tokens (pooling, depthwise convolutions, reductions over tokens).
   Arithmetic is followed into every operand computed from the model's inputs, so
   ``proj(x) + x`` is not a projection of q. A role whose walk fails is left out
   of the site (gcvit's global query is no projection); a core with no role left
   is skipped.
3. It then replays the walk on a tensor that holds each output row's index, so
   the rows of the projection that end up in q, k and v are read off exactly: a
   fused ``qkv`` Linear, a ``kv`` Linear and separate projections all come out of
   the same rule.
4. From the core's output it walks forward to the output projection (role ``o``).
5. A projection that feeds several cores (a module called at every depth, a
   query computed once per stage) belongs to no one block and is left out.

Cores whose projections cannot be read are kept as :class:`SkippedSite` with the
reason, and the reason is logged at debug level, as are the roles left out.

Cost: one pass over the graph's nodes; each core walks at most ``_MAX_WALK``
nodes per role, and each walk is replayed once on an index tensor of the
projection's output shape.
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections import Counter
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
        kind: ``"sdpa"``, ``"softmax"`` (scores between two matmuls) or
            ``"factorized"`` (``q @ (softmax(k)^T @ v)``).
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
    per_channel: set[fx.Node] = field(default_factory=set)


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
    sites = _drop_shared_projections(sites, skipped)
    return Findings(sites=sites, skipped=skipped)


def _drop_shared_projections(
    sites: list[AttentionSite], skipped: list[SkippedSite]
) -> list[AttentionSite]:
    """A projection that feeds several cores belongs to no one block: leave it.

    That is a module called once per block (ALBERT's shared layers) or a query
    computed once per stage for all its blocks; its weight is shared already.
    """
    owners = Counter(p.target for site in sites for p in site.projections)
    kept = []
    for site in sites:
        shared = [p.target for p in site.projections if owners[p.target] > 1]
        if not shared:
            kept.append(site)
            continue
        site.projections = [p for p in site.projections if owners[p.target] == 1]
        site.block = _common_prefix([p.target for p in site.projections])
        if not any(role in site.roles for role in ("q", "k", "v")):
            reason = f"its projections {shared} also feed other attention cores"
            logger.debug("skipped attention core %s: %s", site.core, reason)
            skipped.append(SkippedSite(core=site.core, reason=reason))
            continue
        logger.debug("core %s: left out %s, which feed other cores", site.core, shared)
        kept.append(site)
    return kept


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
    # Walk back from q, k and v to their projections; read the rows of each. A
    # role with no projection (gcvit's global query is a computed tensor) is
    # left out, and the site keeps the roles it could read
    projections: dict[str, Projection] = {}
    walks, missing = [], {}
    for role, arg in (("q", core.q), ("k", core.k), ("v", core.v)):
        try:
            walk = _walk_to_projection(arg, modules)
            rows = _rows_of(walk, arg)
        except _NotASite as e:
            missing[role] = str(e)
            continue
        _add_role(projections, walk, role, rows, modules)
        walks.append(walk)
    if len(missing) == 3:
        raise _NotASite(missing["q"])
    for role, why in missing.items():
        logger.debug("core %s: role %s left out: %s", core.node.name, role, why)

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
_CONV2D_FUNCTIONS = {F.conv2d, aten.conv2d}
# Ops that mix the elements of their input even where the shape is kept.
_MIXING_FUNCTIONS = {
    *_LINEAR_FUNCTIONS, *_CONV2D_FUNCTIONS, F.conv1d, aten.conv1d,
    aten.convolution, aten.mm, aten.addmm, torch.mm, torch.addmm, aten.baddbmm,
}  # fmt: skip
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
        core = _match_softmax_core(node, modules)
        return core or _match_factorized_core(node, modules)
    return None


def _match_softmax_core(
    softmax: fx.Node, modules: dict[str, nn.Module]
) -> _Core | None:
    # Back from the softmax, through scaling, masking, reshapes (Swin's shifted
    # windows add their mask per window) and head-mixing Linears (cait's
    # talking heads), to the scores matmul
    inner = []
    scores = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    while isinstance(scores, fx.Node) and not _is_matmul(scores):
        passes = _passes_through(scores, modules) or _moves_data(scores)
        if not (passes or _mixes_heads(scores, modules)) or len(inner) > 8:
            return None
        inner.append(scores)
        scores = _data_input(scores)
    if not isinstance(scores, fx.Node):
        return None

    # Forward from the softmax to the matmul that weighs v
    found = _probabilities_matmul(softmax, modules)
    if found is None:
        return None
    user, probs, path = found
    (q, k), v = _operands(scores), _operands(user)[1 - _operands(user).index(probs)]
    inner += [scores, softmax, *path]
    return _Core(softmax, "softmax", q, k, v, out=user, inner=inner)


def _match_factorized_core(
    softmax: fx.Node, modules: dict[str, nn.Module]
) -> _Core | None:
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
    v = _operands(context)[1 - _operands(context).index(keys)]
    found = _probabilities_matmul(context, modules)
    if found is None:
        return None
    out, ctx, tail = found
    q = _operands(out)[1 - _operands(out).index(ctx)]
    inner = [softmax, *path, context, *tail]
    return _Core(softmax, "factorized", q, k, v, out=out, inner=inner)


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
                if _is_matmul(user) and node in _operands(user):
                    return user, node, path
                if user not in path and _keeps_scores(user, node, modules):
                    path.append(user)
                    following.append(user)
        frontier = following
    return None


def _keeps_scores(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if _moves_data(user) and _data_input(user) is node:
        return True
    if _mixes_heads(user, modules):
        return _data_input(user) is node
    if user.op == "call_module":
        return _passes_through(user, modules)
    elementwise = _shape(user) is not None and _shape(user) == _shape(node)
    return elementwise and user.op in ("call_function", "call_method")


def _mixes_heads(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A Linear (or 1x1 conv) of width ``in == out`` on scores (talking heads)."""
    data = _data_input(node)
    if data is None or _shape(node) is None or _shape(node) != _shape(data):
        return False
    if node.op == "call_module":
        module = modules.get(node.target)
        conv = _is_conv1x1(module) and module.in_channels == module.out_channels
        return isinstance(module, nn.Linear) or conv
    return node.op == "call_function" and _packet(node.target) in _LINEAR_FUNCTIONS


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
        raise _NotASite(f"{start} mixes the outputs of projections {calls}")
    ((source, (target, layout)),) = walker.sources.items()
    return _Walk(target, layout, source, walker.chain, walker.per_channel)


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
            raise _NotASite(f"no projection before {self.start}: reached {node!r}")
        if node in self.seen:
            return
        self.seen.add(node)
        if len(self.seen) > _MAX_WALK:
            raise _NotASite(
                f"no projection found within {_MAX_WALK} nodes before {self.start}"
            )
        found = _projection(node, self.modules)
        if found is not None:
            self.sources[node] = found
            return

        # Follow the inputs that carry the data, then record the node
        inputs = _walk_inputs(node, self.modules)
        if inputs is None:
            raise _NotASite(
                f"no projection before {self.start}: stopped at {_describe(node)}"
            )
        if _reduces_tokens(node) or _keeps_channels(node, self.modules):
            if not _passes_through(node, self.modules):
                self.per_channel.add(node)
        if _is_arithmetic(node):
            self._visit_operands(inputs)
        else:
            for arg in inputs:
                self.visit(arg)
        self.chain.append(node)  # after its inputs: forward order

    def _visit_operands(self, inputs: list[fx.Node]) -> None:
        """Arithmetic: every data operand must reach the projection, except a
        statistic of the walked tensor itself (``x / x.norm()``)."""
        failed: list[tuple[fx.Node, _NotASite]] = []
        for arg in inputs:
            saved = self._save()
            try:
                self.visit(arg)
            except _NotASite as e:
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
    if _is_concat(node):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        return [t for t in tensors if isinstance(t, fx.Node)]
    if _is_arithmetic(node):
        data = _data_nodes(node.graph)
        inputs = node.all_input_nodes
        same = [a for a in inputs if _shape(a) == _shape(node) and a in data]
        return same or None
    if _moves_data(node) or _passes_through(node, modules):
        return [_data_input(node)]
    if _reduces_tokens(node) or _keeps_channels(node, modules):
        return [_data_input(node)]
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
        if isinstance(module, nn.Linear):
            return node.target, "linear"
        return (node.target, "conv1x1") if _is_conv1x1(module) else None
    if node.op != "call_function":
        return None

    # aten.conv2d on a 1x1 convolution's weight (export)
    if _packet(node.target) in _CONV2D_FUNCTIONS:
        owner = _weight_owner(_arg(node, 1, "weight"), modules)
        if owner is not None and _is_conv1x1(modules[owner]):
            return owner, "conv1x1"

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


def _is_conv1x1(module: nn.Module | None) -> bool:
    """A plain ``nn.Conv2d`` that is a Linear over channels: 1x1, one group.

    Subclasses are left out: timm's ``StdConv2d`` standardises its weight in
    forward, so the stored weight is not the one applied.
    """
    if type(module) is not nn.Conv2d:
        return False
    plain = module.groups == 1 and module.padding_mode == "zeros"
    return plain and tuple(module.kernel_size) == (1, 1)


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
    "__getitem__", "reshape_as", "view_as", "expand_as", "unfold",
}  # fmt: skip
# Methods that read only the shape of their second tensor argument.
_SHAPE_OF_OTHER = {"reshape_as", "view_as", "expand_as"}
# Concatenations: data movement with several tensor inputs.
_CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.stack, aten.cat, aten.stack}
# Padding: data movement that adds positions holding no row.
_PAD_FUNCTIONS = {F.pad, torch._C._nn.pad, aten.pad, aten.constant_pad_nd}
# Elementwise arithmetic, by name (operator.add, torch.add, aten.add, x.add).
_ARITHMETIC = {"add", "sub", "rsub", "mul", "div", "truediv", "iadd", "imul"}
# Reductions that keep channels when taken over token dims (hiera's q pooling).
_REDUCTIONS = {"amax", "amin", "mean", "sum"}
# Pooling, per channel over the trailing (spatial) dims.
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch._C._nn.avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
    aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d,
    aten.adaptive_max_pool2d, aten.avg_pool1d, aten.max_pool1d,
}  # fmt: skip
# Elementwise activation modules: they keep each element in place.
_ACTIVATION_MODULES = (
    nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.Mish,
)  # fmt: skip
_MOVE_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.unbind,
    torch.chunk, torch.split, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.movedim, torch.narrow, torch.select, torch.repeat_interleave,
    torch.swapaxes, torch.tensor_split,
    aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose,
    aten.t, aten.unbind, aten.chunk, aten.split, aten.split_with_sizes,
    aten.unflatten, aten.flatten, aten.squeeze, aten.unsqueeze, aten.expand,
    aten.movedim, aten.narrow, aten.select, aten.slice, aten.repeat_interleave,
    aten.clone, aten.contiguous, aten.alias, aten.tensor_split, aten.unfold,
    *_CONCAT_FUNCTIONS, *_PAD_FUNCTIONS,
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


def _is_concat(node: fx.Node) -> bool:
    return node.op == "call_function" and _packet(node.target) in _CONCAT_FUNCTIONS


def _is_pad(node: fx.Node) -> bool:
    return node.op == "call_function" and _packet(node.target) in _PAD_FUNCTIONS


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target.strip("_")
    if node.op == "call_function":
        return getattr(_packet(node.target), "__name__", "").strip("_")
    return ""


def _is_arithmetic(node: fx.Node) -> bool:
    return _op_name(node) in _ARITHMETIC and _shape(node) is not None


def _reduces_tokens(node: fx.Node) -> bool:
    """A reduction over given dims (``q.amax(dim=3)``); replay checks which."""
    if _op_name(node) not in _REDUCTIONS or _shape(node) is None:
        return False
    dims, _ = _reduction_dims(node)
    return bool(dims)


def _reduction_dims(node: fx.Node) -> tuple[tuple[int, ...], bool]:
    # (input, dim, keepdim) for methods, torch and aten functions alike
    args, kwargs = node.args, node.kwargs
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not all(isinstance(d, int) for d in dim):
        return (), False
    return tuple(dim), bool(keepdim)


def _keeps_channels(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Pooling or a depthwise convolution: per channel, over the spatial dims."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, _POOL_MODULES) or _is_depthwise(module)
    if node.op != "call_function":
        return False
    if _packet(node.target) in _POOL_FUNCTIONS:
        return True
    if _packet(node.target) not in _CONV2D_FUNCTIONS:
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    shape, out = _shape(_data_input(node)), _shape(node)
    return shape is not None and out is not None and groups == shape[1] == out[1]


def _passes_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Shape-preserving ops that keep each element in place (norms, scaling)."""
    data = _data_input(node)
    if data is None or _shape(node) is None or _shape(node) != _shape(data):
        return False
    if node.op == "call_module":
        module = modules.get(node.target)
        layout = isinstance(module, (*_LAYOUT_MODULES, *_ACTIVATION_MODULES))
        return layout or _is_small_norm(module) or _is_depthwise(module)
    if node.op == "call_function" and _packet(node.target) in _MIXING_FUNCTIONS:
        return False  # a Linear or convolution of width ``in == out`` mixes rows
    return node.op in ("call_function", "call_method") and not _is_matmul(node)


def _is_depthwise(module: nn.Module | None) -> bool:
    # One filter per channel: each output channel reads its own input channel
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    return module.groups == module.in_channels == module.out_channels


def _is_small_norm(module: nn.Module | None) -> bool:
    # Norm-like leaf modules of other libraries: only vector parameters
    if module is None or "norm" not in type(module).__name__.lower():
        return False
    return all(p.dim() <= 1 for p in module.parameters())


# ---------------------------------------------------------------------------
# Row provenance


def _rows_of(walk: _Walk, arg: fx.Node) -> tuple[int, int]:
    """The ``[start, stop)`` rows of the projection that ``arg`` carries.

    The walk is replayed on a tensor that holds, in each element, the row of the
    projection's weight it came from (float64, exact for any width); padding
    holds -1, no row.
    """
    shape = _shape(walk.source)
    if shape is None:
        raise _NotASite(f"no recorded shape for {walk.source.name}")
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
        raise _NotASite(
            f"{arg.name} reads rows of {walk.target} that are not contiguous"
        )
    return start, stop


def _replay(node: fx.Node, values: dict[fx.Node, Any], walk: _Walk) -> Any:
    """Run one node of a walk on row indices."""
    if node in walk.per_channel:
        return _replay_per_channel(node, values[_data_input(node)], walk)
    if not _moves_data(node):
        # Shape-preserving: every element stays; merged branches must agree
        inputs = [values[a] for a in node.all_input_nodes if a in values]
        rows = [torch.unique(v) for v in inputs]
        if any(not torch.equal(rows[0], r) for r in rows[1:]):
            raise _NotASite(f"{node.name} mixes different rows of {walk.target}")
        return inputs[0]

    def concrete(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a in values:
            return values[a]
        if "value" in a.meta:
            return a.meta["value"]
        if _shape(a) is not None and node.target in _SHAPE_OF_OTHER:
            return torch.empty(_shape(a), device="meta")  # only its shape is read
        raise _NotASite(f"{node.name} depends on tensor {a.name}")

    args = fx.node.map_aggregate(node.args, concrete)
    kwargs = fx.node.map_aggregate(node.kwargs, concrete)
    if _is_pad(node):
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


def _replay_per_channel(node: fx.Node, value: torch.Tensor, walk: _Walk) -> Any:
    """Pooling, depthwise convolution, reduction: each output channel reads the
    rows of its own input channel, so rows must not vary over what is reduced."""
    if _reduces_tokens(node):
        dims, keepdim = _reduction_dims(node)
    else:
        dims, keepdim = tuple(range(2, value.dim())), True
    high = torch.amax(value, dim=dims, keepdim=keepdim)
    if not torch.equal(high, torch.amin(value, dim=dims, keepdim=keepdim)):
        raise _NotASite(f"{node.name} mixes different rows of {walk.target}")
    shape = _shape(node)
    return high if _reduces_tokens(node) or shape is None else high.expand(shape)


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
