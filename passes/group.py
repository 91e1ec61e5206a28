"""Group: sort attention sites into groups of repeated blocks.

Two sites belong to one group when their attention subgraphs are isomorphic (same
ops wired the same way) and their projections have the same roles, rows and shapes.
Each group gets its own dictionary per role. A site that repeats nowhere forms no
group and is left alone.

The implementation hashes each subgraph with Weisfeiler-Lehman (networkx), then
confirms every match within a hash bucket with an exact isomorphism test, so a hash
collision can never merge different blocks. Cost: one hash per site, plus one VF2
test per site against its bucket's first member.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import networkx as nx
from masasurgery.passes.capture import Capture
from masasurgery.passes.find_attention import AttentionSite
from torch import fx, nn

__all__ = ["Group", "Grouping", "group_sites"]


@dataclass
class Group:
    """Sites (blocks) that share one dictionary per role, in graph order.

    Attributes:
        index: Position of the group in the model, from 0.
        sites: The blocks of the group, in graph order.
    """

    index: int
    sites: list[AttentionSite]

    @property
    def num_blocks(self) -> int:
        return len(self.sites)

    @property
    def blocks(self) -> list[str]:
        return [site.block for site in self.sites]

    @property
    def roles(self) -> list[str]:
        return self.sites[0].roles

    def role_shape(self, role: str) -> tuple[int, int]:
        """``(rows, in_features)`` of ``role``'s weight in every block."""
        projection = self.sites[0].projection_of(role)
        start, stop = projection.roles[role]
        return stop - start, projection.in_features


@dataclass
class Grouping:
    """Groups of two or more blocks, and the sites that repeat nowhere."""

    groups: list[Group]
    singletons: list[AttentionSite]


def group_sites(capture: Capture | None, sites: list[AttentionSite]) -> Grouping:
    """Group sites whose attention subgraphs and projection shapes match.

    Args:
        capture: The graph the sites were found in; None for sites read off the
            module tree, which group by kind and projection shapes alone.
        sites: The sites, in graph order.

    Returns:
        The groups (two or more blocks each) and the singletons.

    Example:
        >>> import timm
        >>> from masasurgery.passes import Inputs, capture, find_attention
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3)
        >>> cap = capture(m, Inputs.of(torch.randn(1, 3, 224, 224)))
        >>> group_sites(cap, find_attention(cap).sites).groups[0].blocks
        ['blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn']
    """
    # Sites read off the module tree (capture is None) have no graph
    modules = {} if capture is None else dict(capture.gm.named_modules())
    nodes = {} if capture is None else {n.name: n for n in capture.gm.graph.nodes}

    # Bucket by hash and projection signature, then confirm by isomorphism
    buckets: dict[tuple, list[list[tuple[AttentionSite, nx.DiGraph]]]] = {}
    for site in sites:
        dag = _site_dag(site, nodes, modules)
        key = (_signature(site), _wl_hash(dag))
        classes = buckets.setdefault(key, [])
        for members in classes:
            if nx.is_isomorphic(members[0][1], dag, node_match=_same_op):
                members.append((site, dag))
                break
        else:
            classes.append([(site, dag)])

    # Classes of two or more sites become groups, in order of their first block
    classes = [c for cs in buckets.values() for c in cs]
    classes.sort(key=lambda c: sites.index(c[0][0]))
    groups = [c for c in classes if len(c) > 1]
    return Grouping(
        groups=[Group(i, [s for s, _ in c]) for i, c in enumerate(groups)],
        singletons=[c[0][0] for c in classes if len(c) == 1],
    )


def _wl_hash(dag: nx.DiGraph) -> str:
    # The hashes are compared within one run only, so networkx's note that
    # directed hashes changed in 3.5 does not concern us
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The hashes produced")
        return nx.weisfeiler_lehman_graph_hash(dag, node_attr="op")


def _signature(site: AttentionSite) -> tuple:
    return tuple(p.signature() for p in site.projections)


def _site_dag(
    site: AttentionSite, nodes: dict[str, fx.Node], modules: dict[str, nn.Module]
) -> nx.DiGraph:
    """The attention subgraph of a site, each node labelled by its op."""
    dag = nx.DiGraph()
    if not site.nodes:  # no graph: the kind (with its module class) stands in
        dag.add_node("core", op=site.kind)
        return dag
    members = set(site.nodes)
    for name in site.nodes:
        node = nodes[name]
        dag.add_node(name, op=_op_label(node, modules))
        for arg in _member_inputs(node, members):
            dag.add_edge(arg.name, name)
    return dag


def _member_inputs(node: fx.Node, members: set[str], depth: int = 8) -> set[fx.Node]:
    """The nearest members upstream of ``node``, through nodes left out of the
    site's structure (masks, scales, norms)."""
    found: set[fx.Node] = set()
    frontier = list(node.all_input_nodes)
    for _ in range(depth):
        upstream = []
        for arg in frontier:
            if arg.name in members:
                found.add(arg)
            else:
                upstream.extend(arg.all_input_nodes)
        frontier = upstream
    return found


def _op_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module:{type(modules[node.target]).__name__}"
    if node.op == "call_function":
        return f"function:{getattr(node.target, '__name__', str(node.target))}"
    return f"{node.op}:{node.target}"


def _same_op(a: dict, b: dict) -> bool:
    return a["op"] == b["op"]
