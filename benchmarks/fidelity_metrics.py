"""The fidelity metrics: how close a compressed model stays to the original.

Each model has a primary metric (the one the target is judged on) and may have
secondary ones. "Loss" is how much worse than the original a method is in the
primary metric: ``original - value`` when higher is better, ``value - original``
when lower is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MetricSpec",
    "feature_cosine",
    "loss_of",
    "neighbour_agreement",
    "relative_error",
]


@dataclass(frozen=True)
class MetricSpec:
    """One metric of a model.

    Attributes:
        key: Key in the scores dict.
        label: Name in tables and plots.
        higher_is_better: Direction of "better".
        digits: Decimals shown in tables.
    """

    key: str
    label: str
    higher_is_better: bool
    digits: int = 3


def feature_cosine(features: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity of matching rows, ``(N, C)`` against ``(N, C)``."""
    return (
        F.cosine_similarity(features.double(), reference.double(), dim=-1).mean().item()
    )


def relative_error(features: Tensor, reference: Tensor) -> float:
    """Mean over rows of ``||f - f0|| / ||f0||``."""
    diff = (features.double() - reference.double()).norm(dim=-1)
    return (diff / reference.double().norm(dim=-1).clamp_min(1e-12)).mean().item()


def neighbour_agreement(embeddings: Tensor, reference: Tensor) -> float:
    """Share of rows whose nearest other row (cosine) is the same as the reference's.

    Both are ``(N, C)``; each row's nearest neighbour is sought among the other
    ``N - 1`` rows of the same matrix.
    """
    return (_nearest(embeddings) == _nearest(reference)).double().mean().item()


def _nearest(embeddings: Tensor) -> Tensor:
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T  # (N, N)
    similarity.fill_diagonal_(-torch.inf)
    return similarity.argmax(dim=-1)


def loss_of(spec: MetricSpec, value: float, original: float) -> float:
    """How much worse than the original ``value`` is, in the metric's own units."""
    return original - value if spec.higher_is_better else value - original
