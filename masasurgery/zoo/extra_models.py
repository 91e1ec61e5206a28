"""Small torchvision and transformers models that the coverage checks convert.

Each builds a randomly initialised model with a tiny config and its inputs; they
stand beside the timm families in ``benchmarks/coverage.py`` and
``tests/test_coverage.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["EXTRA_MODELS", "ExtraModel"]


@dataclass(frozen=True)
class ExtraModel:
    """One non-timm model: where it comes from and how to build it.

    Attributes:
        source: ``"torchvision"`` or ``"transformers"``.
        name: A short id (``"llama"``).
        model: The class or builder it stands for (``LlamaForCausalLM``).
        make: Builds the model, in eval mode, with random weights.
        inputs: Builds example inputs for it.
    """

    source: str
    name: str
    model: str
    make: Callable[[], nn.Module] = field(repr=False)
    inputs: Callable[[], Any] = field(repr=False)

    def build(self) -> tuple[nn.Module, Any]:
        """The model (seed 0) and its example inputs.

        Example:
            >>> model, inputs = EXTRA_MODELS[-1].build()
            >>> type(model).__name__, sorted(inputs)
            ('DistilBertModel', ['input_ids'])
        """
        torch.manual_seed(0)
        model = self.make().eval()
        return model, self.inputs()


def _image(size: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(1, 3, size, size)


def _tokens() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (1, 7))}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, 3, 32, 32)}


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return make


# Tiny transformers configs: width 32, 4 heads, 3 layers, vocabulary 100
_TINY = {"num_hidden_layers": 3, "num_attention_heads": 4}


def _transformers(model: str, config: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config)(**kwargs)
        return getattr(transformers, model)(cfg)

    return make


def _hf(name: str, model: str, config: str, inputs: Callable, **kw: Any) -> ExtraModel:
    return ExtraModel(
        "transformers", name, model, _transformers(model, config, **kw), inputs
    )


_DECODER = {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 100, **_TINY}
_ENCODER = {"hidden_size": 32, "intermediate_size": 64, **_TINY}
_VISION = {"image_size": 32, "patch_size": 8, **_ENCODER}

#: The torchvision and transformers models of the coverage checks.
EXTRA_MODELS: list[ExtraModel] = [
    ExtraModel(
        "torchvision",
        "vit_b_16",
        "vit_b_16",
        _torchvision("vit_b_16", image_size=64),
        _image(64),
    ),
    ExtraModel("torchvision", "swin_t", "swin_t", _torchvision("swin_t"), _image(112)),
    ExtraModel(
        "torchvision", "maxvit_t", "maxvit_t", _torchvision("maxvit_t"), _image(224)
    ),
    _hf("bert", "BertModel", "BertConfig", _tokens, vocab_size=100, **_ENCODER),
    _hf(
        "gpt2",
        "GPT2LMHeadModel",
        "GPT2Config",
        _tokens,
        n_embd=32,
        n_layer=3,
        n_head=4,
        vocab_size=100,
    ),
    # Grouped-query attention: 2 key/value heads for 4 query heads
    _hf(
        "llama",
        "LlamaForCausalLM",
        "LlamaConfig",
        _tokens,
        num_key_value_heads=2,
        **_DECODER,
    ),
    # Biases on q, k and v; one key/value head
    _hf(
        "qwen2",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        _tokens,
        num_key_value_heads=1,
        **_DECODER,
    ),
    _hf(
        "opt",
        "OPTForCausalLM",
        "OPTConfig",
        _tokens,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=100,
        word_embed_proj_dim=32,
    ),
    _hf(
        "t5_encoder",
        "T5EncoderModel",
        "T5Config",
        _tokens,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_heads=4,
        vocab_size=100,
    ),
    _hf("vit", "ViTModel", "ViTConfig", _pixels, **_VISION),
    _hf("clip_vision", "CLIPVisionModel", "CLIPVisionConfig", _pixels, **_VISION),
    _hf(
        "distilbert",
        "DistilBertModel",
        "DistilBertConfig",
        _tokens,
        dim=32,
        n_layers=3,
        n_heads=4,
        hidden_dim=64,
        vocab_size=100,
    ),
]
