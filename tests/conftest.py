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


def tiny_llama(
    layers: int = 2, hidden: int = 32, vocab: int = 64, mlp: int = 64
) -> nn.Module:
    """A transformers Llama (GQA: 4 query heads, 2 key/value heads) with random
    weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def projection_inputs(model: nn.Module, target: str, batches) -> torch.Tensor:
    """The rows fed to ``target`` over ``batches``, as ``(tokens, in)``."""
    rows = []
    handle = model.get_submodule(target).register_forward_pre_hook(
        lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(rows)


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
