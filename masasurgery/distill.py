"""Distillation pieces: which output to match, the losses, and fidelity figures.

A model's output may be a tensor, a tuple, or a transformers ``ModelOutput``;
:func:`output_tensor` picks the one tensor a student is taught to reproduce. The
losses compare that tensor with the teacher's, position by position along the last
dimension, and leave out padded positions when an ``attention_mask`` of shape
``(batch, seq)`` came with the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from masasurgery.errors import ConfigError

__all__ = [
    "LOSSES",
    "Fidelity",
    "FidelitySum",
    "LossFn",
    "distill_loss",
    "output_tensor",
]

#: A loss: ``(student, teacher, mask or None) -> scalar``.
LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]

#: The losses :func:`distill_loss` knows by name.
LOSSES = ("mse", "cosine", "kl")

# Output fields tried in order on a transformers ModelOutput or a dict
_FIELDS = ("last_hidden_state", "logits")


def output_tensor(output: Any) -> Tensor:
    """The tensor of a model output that distillation compares.

    The rule, first match wins:

    1. a tensor is itself;
    2. ``last_hidden_state``, then ``logits`` (an attribute, as on transformers
       outputs, or a key of a dict);
    3. the first floating-point tensor of a tuple or list.

    Raises:
        ConfigError: The output holds no floating-point tensor.

    Example:
        >>> output_tensor((torch.zeros(2, 3), torch.ones(1))).shape
        torch.Size([2, 3])
        >>> output_tensor({"logits": torch.zeros(4, 10)}).shape
        torch.Size([4, 10])
    """
    if isinstance(output, Tensor):
        return output
    for name in _FIELDS:
        found = getattr(output, name, None)
        if found is None and isinstance(output, Mapping):
            found = output.get(name)
        if isinstance(found, Tensor):
            return found
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor) and item.is_floating_point():
                return item
    raise ConfigError(
        f"cannot tell which tensor of the model's output ({type(output).__name__}) "
        "to distill: expected a tensor, an output with last_hidden_state or logits, "
        "or a tuple starting with a tensor. Pass select= (a function from the "
        "output to the tensor)."
    )


def distill_loss(loss: str | Callable, temperature: float = 1.0) -> LossFn:
    """The loss function named by ``loss``, or the user's own.

    * ``"mse"``: mean squared difference of the outputs.
    * ``"cosine"``: ``1 - cos`` of each position's feature vector (scale-free).
    * ``"kl"``: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` of
      each position's logits, with ``T = temperature``.

    Positions are rows of the last dimension; the mask, when given, weights them.
    A callable is called as ``loss(student, teacher)`` and returns a scalar (no
    mask is applied).

    Raises:
        ConfigError: The name is unknown, or ``temperature`` is not positive.

    Example:
        >>> fn = distill_loss("cosine")
        >>> fn(torch.ones(2, 3), 2 * torch.ones(2, 3), None).abs().item() < 1e-6
        True
    """
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature!r}.")
    if callable(loss) and not isinstance(loss, str):
        return lambda student, teacher, mask: loss(student, teacher)
    per_position = {
        "mse": lambda s, t: (s - t).pow(2).mean(-1),
        "cosine": lambda s, t: 1.0 - F.cosine_similarity(s, t, dim=-1),
        "kl": lambda s, t: _kl(s, t, float(temperature)),
    }.get(loss)
    if per_position is None:
        raise ConfigError(
            f"unknown loss {loss!r}; expected one of {list(LOSSES)} or a function "
            "(student, teacher) -> scalar tensor."
        )
    return lambda student, teacher, mask: _masked_mean(
        per_position(student, teacher), mask
    )


def _kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    # KL(teacher || student) per position, scaled as in Hinton et al.
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl * temperature**2


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-position values; masked positions are left out."""
    if mask is None or mask.shape != values.shape:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


@dataclass
class Fidelity:
    """How close a student's outputs are to the teacher's.

    Attributes:
        relative_error: ``||student - teacher|| / ||teacher||`` over all
            positions, as one vector.
        cosine: Mean cosine of each position's vector (rows of the last
            dimension) with the teacher's.
        positions: Number of positions compared.
    """

    relative_error: float
    cosine: float
    positions: int


@dataclass
class FidelitySum:
    """Running sums of :class:`Fidelity`, batch by batch, in float64.

    Example:
        >>> acc = FidelitySum()
        >>> acc.add(torch.ones(2, 4), torch.ones(2, 4), None)
        >>> acc.result().relative_error, acc.result().cosine
        (0.0, 1.0)
    """

    squared_error: float = 0.0
    squared_norm: float = 0.0
    cosine: float = 0.0
    positions: int = 0

    def add(self, student: Tensor, teacher: Tensor, mask: Tensor | None) -> None:
        """Add one batch; masked positions are left out."""
        student, teacher = student.detach().double(), teacher.detach().double()
        error = (student - teacher).pow(2).sum(-1)  # one value per position
        norm = teacher.pow(2).sum(-1)
        cosine = F.cosine_similarity(student, teacher, dim=-1)
        keep = torch.ones_like(error, dtype=torch.bool)
        if mask is not None and mask.shape == error.shape:
            keep = mask.to(torch.bool)
        self.squared_error += error[keep].sum().item()
        self.squared_norm += norm[keep].sum().item()
        self.cosine += cosine[keep].sum().item()
        self.positions += int(keep.sum().item())

    def result(self) -> Fidelity:
        """The figures over everything added so far."""
        norm = max(self.squared_norm, torch.finfo(torch.float64).tiny)
        return Fidelity(
            relative_error=(self.squared_error / norm) ** 0.5,
            cosine=self.cosine / max(self.positions, 1),
            positions=self.positions,
        )
