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

Cost: one pass over the graph's nodes; each core walks at most ``walks._MAX_WALK``
nodes per role, and each walk is replayed once on an index tensor of the
projection's output shape.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from masasurgery.passes.capture import Capture
from masasurgery.passes.cores import Core, match_core
from masasurgery.passes.ops import _shape, is_matmul, moves_data
from masasurgery.passes.provenance import rows_of
from masasurgery.passes.walks import (
    NotASite,
    Walk,
    walk_to_output,
    walk_to_projection,
    weight_shape,
)
from torch import fx, nn

__all__ = [
    "AttentionSite",
    "Findings",
    "Projection",
    "SkippedSite",
    "find_attention",
]

logger = logging.getLogger(__name__)


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
        core = match_core(node, modules)
        if core is None:
            continue
        try:
            sites.append(_read_site(core, modules))
        except NotASite as e:
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


def _read_site(core: Core, modules: dict[str, nn.Module]) -> AttentionSite:
    # Walk back from q, k and v to their projections; read the rows of each. A
    # role with no projection (gcvit's global query is a computed tensor) is
    # left out, and the site keeps the roles it could read
    projections: dict[str, Projection] = {}
    walks, missing = [], {}
    for role, arg in (("q", core.q), ("k", core.k), ("v", core.v)):
        try:
            walk = walk_to_projection(arg, modules)
            rows = rows_of(walk, arg)
        except NotASite as e:
            missing[role] = str(e)
            continue
        _add_role(projections, walk, role, rows, modules)
        walks.append(walk)
    if len(missing) == 3:
        raise NotASite(missing["q"])
    for role, why in missing.items():
        logger.debug("core %s: role %s left out: %s", core.node.name, role, why)

    # Walk forward from the core to the output projection
    o_walk = walk_to_output(core.out, modules)
    if o_walk is not None:
        width = weight_shape(o_walk, modules)[0]
        _add_role(projections, o_walk, "o", (0, width), modules)
        walks.append(o_walk)

    # The attention subgraph, for grouping, and the head layout of q
    # The structure of the site: projections, data movement and the core. Masks,
    # scales and norms are left out, so Swin's shifted and plain windows match
    nodes = [
        n for w in walks for n in [w.source, *w.chain] if n is w.source or moves_data(n)
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


def _core_structure(core: Core) -> list[fx.Node]:
    if core.kind == "sdpa":
        return [core.node]
    scores = [n for n in core.inner if is_matmul(n)]
    return [*scores, core.node, core.out]


def _add_role(
    projections: dict[str, Projection],
    walk: Walk,
    role: str,
    rows: tuple[int, int],
    modules: dict[str, nn.Module],
) -> None:
    out_features, in_features = weight_shape(walk, modules)
    projection = projections.setdefault(
        walk.target,
        Projection(walk.target, {}, out_features, in_features, walk.layout),
    )
    for other, (start, stop) in projection.roles.items():
        if start < rows[1] and rows[0] < stop:
            raise NotASite(
                f"roles {other!r} and {role!r} overlap in {walk.target} rows "
                f"{(start, stop)} and {rows}"
            )
    projection.roles[role] = rows


def _first_role(projection: Projection) -> int:
    return min(("q", "k", "v", "o").index(r) for r in projection.roles)


def _common_prefix(targets: list[str]) -> str:
    parts = [t.split(".")[:-1] for t in targets]
    prefix = []
    for names in zip(*parts, strict=False):
        if len(set(names)) != 1:
            break
        prefix.append(names[0])
    return ".".join(prefix)
