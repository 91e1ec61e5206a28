"""Real pretrained models and real images for demos, tests and benchmarks."""

from masasurgery.zoo.dinov2 import ZooWeightsNotFound as ZooWeightsNotFound
from masasurgery.zoo.dinov2 import dinov2_vits14 as dinov2_vits14
from masasurgery.zoo.dinov2 import dinov2_vits14_onnx_path as dinov2_vits14_onnx_path
from masasurgery.zoo.dinov2 import (
    dinov2_vits14_state_dict as dinov2_vits14_state_dict,
)
from masasurgery.zoo.images import IMAGENET_MEAN as IMAGENET_MEAN
from masasurgery.zoo.images import IMAGENET_STD as IMAGENET_STD
from masasurgery.zoo.images import sample_images as sample_images
from masasurgery.zoo.minilm import embed_sentences as embed_sentences
from masasurgery.zoo.minilm import minilm as minilm
from masasurgery.zoo.minilm import minilm_path as minilm_path
from masasurgery.zoo.minilm import minilm_tokenizer as minilm_tokenizer

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZooWeightsNotFound",
    "dinov2_vits14",
    "dinov2_vits14_onnx_path",
    "dinov2_vits14_state_dict",
    "embed_sentences",
    "minilm",
    "minilm_path",
    "minilm_tokenizer",
    "sample_images",
]
