"""Shared fixtures: small real models, built fresh for each test."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_vit(name: str = "vit_tiny_patch16_224", depth: int = 3, **kwargs) -> nn.Module:
    """A timm ViT with random weights, small enough for a unit test, in eval mode."""
    kwargs.setdefault("img_size", 32)
    kwargs.setdefault("patch_size", 8)
    model = timm.create_model(name, pretrained=False, depth=depth, **kwargs)
    return model.eval()


def image_batch(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def set_fused_attn(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """True when the model's state has exactly the keys and values of ``state``."""
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        torch.equal(now[k], state[k]) for k in now
    )
