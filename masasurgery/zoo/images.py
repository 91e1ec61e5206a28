"""Real photos from ``skimage.data``, preprocessed for ImageNet-trained models."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from masasurgery.errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "sample_images"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 2D images bundled with scikit-image; they load without a network connection.
_BUNDLED = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


def sample_images(
    names: Sequence[str] = ("astronaut", "chelsea", "coffee", "rocket"),
    size: int = 224,
) -> torch.Tensor:
    """Load real photos from ``skimage.data`` as a normalized image batch.

    Each image is converted to RGB (grayscale is repeated over three channels,
    an alpha channel is dropped), center-cropped to a square, resized to
    ``size`` x ``size`` (bilinear with antialiasing) and normalized with the
    ImageNet mean and std. The result is deterministic.

    DINOv2 needs ``size`` to be a multiple of its patch size 14 (224 or 518, for
    instance); this function does not enforce it, so it can feed other models.

    Args:
        names: Names of 2D images bundled with scikit-image, e.g. ``"camera"``
            or ``"coins"``, in batch order.
        size: Height and width of the output images, in pixels.

    Returns:
        Float32 tensor of shape ``(len(names), 3, size, size)``.

    Raises:
        TypeError: If ``names`` is a single string rather than a sequence.
        ConfigError: If ``names`` is empty, names an image that is not bundled
            with scikit-image, or ``size`` is not a positive integer. It is a
            ``ValueError``.

    Example:
        >>> x = sample_images(("camera", "coffee"), size=28)
        >>> tuple(x.shape), x.dtype
        ((2, 3, 28, 28), torch.float32)
    """
    # Check the arguments before loading anything.
    _check_names(names)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(
            f"Expected size to be a positive int (pixels), got {size!r}. Use e.g. "
            "224, a multiple of the DINOv2 patch size 14."
        )

    # Load, square and resize every image, then normalize the batch.
    batch = torch.cat([_load_square(name, size) for name in names])  # (N, 3, S, S)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    logger.debug("Loaded %d skimage images at %dx%d", len(names), size, size)
    return ((batch - mean) / std).contiguous()


def _check_names(names: Sequence[str]) -> None:
    """Reject a bare string, an empty list and images that need a download."""
    if isinstance(names, str):
        raise TypeError(
            f"Expected names to be a sequence of image names, got the string "
            f"{names!r}. Wrap it in a tuple: sample_images(({names!r},))."
        )
    if len(names) == 0:
        raise ConfigError("Expected at least one image name, got an empty sequence.")
    unknown = [name for name in names if name not in _BUNDLED]
    if unknown:
        raise ConfigError(
            f"Expected names of images bundled with scikit-image, got {unknown}. "
            f"Choose from: {', '.join(_BUNDLED)}."
        )


def _load_square(name: str, size: int) -> torch.Tensor:
    """Return one image as a (1, 3, size, size) float tensor in [0, 1]."""
    from skimage import data, util

    # Read the image and bring it to RGB floats in [0, 1].
    image = util.img_as_float32(getattr(data, name)())  # (H, W) or (H, W, C)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = np.ascontiguousarray(image[..., :3])  # drop alpha

    # Center-crop to a square.
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]

    # Resize; bilinear with antialias stays inside [0, 1] when shrinking.
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    x = F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )  # (1, 3, size, size)
    return x.clamp(0.0, 1.0)
