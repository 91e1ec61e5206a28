"""The example inputs the command line feeds a model: images or token ids.

Image models get a batch of images of the size they declare (timm's patch
embedding, a transformers config's ``image_size``, torchvision's ``image_size``)
or of ``--input-size``: random noise, or real photos with ``--images photos``.
Text models get random token ids from their vocabulary, ``--seq-len`` long;
``zoo:minilm`` gets real sentences through its own tokenizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from masasurgery.cli.sources import ModelSource
from masasurgery.errors import ConfigError
from masasurgery.inputs import resolve_inputs

__all__ = ["IMAGES", "InputSpec", "example_inputs", "input_spec", "to_model"]

#: What ``--images`` accepts.
IMAGES = ("random", "photos")

# Photos bundled with scikit-image (masasurgery.zoo.sample_images)
_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "horse", "cat", "clock", "camera",
)  # fmt: skip
_SENTENCES = (
    "Attention weights of repeated blocks are often alike.",
    "A dictionary of shared matrices can stand in for them.",
    "The cat sat on the warm windowsill all afternoon.",
    "Stock markets closed higher after a quiet session.",
    "She tuned the old piano before the evening concert.",
    "Heavy rain is expected across the north tomorrow.",
    "The recipe needs two eggs, flour and a pinch of salt.",
    "Compilers turn source code into machine instructions.",
)


@dataclass(frozen=True)
class InputSpec:
    """How to make the example inputs.

    Attributes:
        batch_size: Examples in the batch.
        input_size: ``(H, W)`` or ``(C, H, W)`` of images; None: what the model
            declares.
        seq_len: Tokens per example for text models.
        images: ``"random"`` noise or real ``"photos"``.
        seed: Seed of the random inputs.
    """

    batch_size: int = 2
    input_size: tuple[int, ...] | None = None
    seq_len: int = 16
    images: str = "random"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        data = asdict(self)
        data["input_size"] = None if self.input_size is None else list(self.input_size)
        return data


def input_spec(
    given: dict[str, Any], recorded: dict[str, Any], source: ModelSource
) -> InputSpec:
    """The options given on the command line, else those recorded with a
    checkpoint, else the defaults (real photos for ``zoo:dinov2_vits14``).

    Example:
        >>> source = ModelSource("zoo", "dinov2_vits14")
        >>> input_spec({"batch_size": 4}, {}, source)
        InputSpec(batch_size=4, input_size=None, seq_len=16, images='photos', seed=0)
    """
    spec = InputSpec(seed=source.seed)
    if source.label == "zoo:dinov2_vits14":
        spec = replace(spec, images="photos")
    for options in (recorded, given):
        spec = replace(spec, **{k: v for k, v in options.items() if v is not None})
    if spec.input_size is not None:
        spec = replace(spec, input_size=tuple(spec.input_size))
    if spec.images not in IMAGES or spec.batch_size < 1 or spec.seq_len < 1:
        raise ConfigError(
            f"expected --images in {IMAGES}, --batch-size and --seq-len of at least "
            f"1; got {spec.images!r}, {spec.batch_size}, {spec.seq_len}."
        )
    return spec


def example_inputs(model: nn.Module, spec: InputSpec, source: ModelSource) -> Any:
    """A batch for ``model.forward``: a tensor, or a dict of keyword arguments.

    Raises:
        ConfigError: The model's input cannot be told (pass ``--input-size``),
            or ``--images photos`` does not fit it.

    Example:
        >>> source = ModelSource("timm", "vit_tiny_patch16_224", {"depth": 2})
        >>> example_inputs(source.build(), InputSpec(batch_size=3), source).shape
        torch.Size([3, 3, 224, 224])
    """
    generator = torch.Generator().manual_seed(spec.seed)
    if source.label == "zoo:minilm":
        return _sentences(spec)
    main_input = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    if main_input == "input_ids" and config is not None:
        return _tokens(config, spec, generator)
    if main_input not in (None, "pixel_values"):
        raise ConfigError(
            f"{type(model).__name__} takes {main_input!r} as its main input; the "
            "command line makes images and token ids only. Use the Python API with "
            "example_inputs= for this model."
        )
    images = _images(_image_size(model, spec), spec, generator)
    return {"pixel_values": images} if main_input == "pixel_values" else images


def to_model(inputs: Any, model: nn.Module) -> Any:
    """The inputs on the model's device, floating tensors in its dtype."""
    param = next(model.parameters())

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        dtype = param.dtype if x.is_floating_point() else x.dtype
        return x.to(device=param.device, dtype=dtype)

    return pytree.tree_map(move, inputs)


def _tokens(config: Any, spec: InputSpec, generator: torch.Generator) -> dict:
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ConfigError(
            f"{type(config).__name__} has no vocab_size, so no token ids can be made; "
            "use the Python API with example_inputs=."
        )
    longest = getattr(config, "max_position_embeddings", None) or spec.seq_len
    shape = (spec.batch_size, min(spec.seq_len, longest))
    ids = torch.randint(0, vocab, shape, generator=generator)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.clone()
    return inputs


def _sentences(spec: InputSpec) -> dict:
    from masasurgery.zoo import minilm_tokenizer

    if spec.batch_size > len(_SENTENCES):
        raise ConfigError(
            f"zoo:minilm has {len(_SENTENCES)} sample sentences, got --batch-size "
            f"{spec.batch_size}."
        )
    texts = list(_SENTENCES[: spec.batch_size])
    tokens = minilm_tokenizer()(
        texts, padding=True, truncation=True, max_length=spec.seq_len * 4
    )
    return {k: torch.tensor(v) for k, v in tokens.items()}


def _image_size(model: nn.Module, spec: InputSpec) -> tuple[int, int, int]:
    """``(C, H, W)``: the option, else what the model declares."""
    size = spec.input_size
    if size is not None and len(size) in (1, 2, 3):
        size = tuple(size)
        return (
            (3, size[0], size[0]) if len(size) == 1 else (size[:-2] or (3,)) + size[-2:]
        )
    if size is not None:
        raise ConfigError(f"--input-size takes H, H,W or C,H,W, got {size}.")

    config = getattr(model, "config", None)
    side = getattr(config, "image_size", None) or getattr(model, "image_size", None)
    if side is not None:
        h, w = (side, side) if isinstance(side, int) else tuple(side)
        return (getattr(config, "num_channels", 3), h, w)
    try:
        return tuple(resolve_inputs(model, None).args[0].shape[1:])
    except ConfigError as e:
        raise ConfigError(
            f"{type(model).__name__} declares no input size; pass --input-size "
            "(e.g. --input-size 224)."
        ) from e


def _images(
    size: tuple[int, int, int], spec: InputSpec, generator: torch.Generator
) -> torch.Tensor:
    channels, height, width = size
    if spec.images == "random":
        return torch.randn(spec.batch_size, *size, generator=generator)

    from masasurgery.zoo import sample_images

    if channels != 3 or height != width or spec.batch_size > len(_PHOTOS):
        raise ConfigError(
            f"--images photos gives up to {len(_PHOTOS)} square RGB images; the "
            f"model takes {size} and --batch-size is {spec.batch_size}. Use "
            "--images random."
        )
    return sample_images(_PHOTOS[: spec.batch_size], size=height)
