"""Example inputs: what the user gave, or what the model's own config implies."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from masasurgery.errors import ConfigError
from masasurgery.passes.capture import Inputs

__all__ = ["resolve_inputs"]


def resolve_inputs(model: nn.Module, example_inputs: Any | None) -> Inputs:
    """Normalise the user's example inputs, or build one from the model's config.

    Decoder language models (a forward with ``use_cache``) run with
    ``use_cache=False`` unless the user says otherwise: a key/value cache is not
    part of what a conversion changes, and capture cannot return it.

    A timm model declares its input size (its patch embedding's ``img_size``, else
    ``pretrained_cfg["input_size"]``); a random image of that size (batch 1, seed 0)
    is used when no input is given.

    Raises:
        ConfigError: No input was given and the model declares none.
    """
    if example_inputs is not None:
        return _without_cache(model, Inputs.of(example_inputs))

    size = _timm_input_size(model)
    if size is not None:
        generator = torch.Generator().manual_seed(0)
        param = next(model.parameters(), None)
        image = torch.randn(1, *size, generator=generator)
        if param is not None:
            image = image.to(device=param.device, dtype=param.dtype)
        return Inputs.of(image)

    raise ConfigError(
        f"{type(model).__name__} declares no input size, so masasurgery cannot "
        "make an example input; pass example_inputs= (a tensor, a tuple of "
        "positional arguments, or a dict of keyword arguments for forward)."
    )


def _timm_input_size(model: nn.Module) -> tuple[int, ...] | None:
    # The patch embedding knows the size the model was built for
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    if isinstance(img_size, tuple) and isinstance(proj, nn.Conv2d):
        return (proj.in_channels, *img_size)

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return tuple(size) if size is not None else None


def _without_cache(model: nn.Module, inputs: Inputs) -> Inputs:
    if "use_cache" in inputs.kwargs:
        return inputs
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return inputs
    accepts = "use_cache" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    if (
        not accepts
        or getattr(getattr(model, "config", None), "use_cache", None) is None
    ):
        return inputs
    return Inputs(args=inputs.args, kwargs={**inputs.kwargs, "use_cache": False})
