"""Compare the outputs of two runs: elementwise, and by task on the logits.

Elementwise figures cover every floating-point tensor the model returned: max
abs, relative L2, cosine, and the excess over the tolerance.

Task figures read the logits and say what changed in the predictions:

* ``"classification"``: logits ``(batch, classes)``; top-1 agreement, the share
  of rows whose argmax agree.
* ``"lm"``: logits ``(batch, seq, vocab)``; each position holds a next-token
  distribution. Top-1 agreement over all positions, and the mean
  ``KL(expected || actual)`` over them, in float64. An ``attention_mask`` among
  the keyword inputs, of shape ``(batch, seq)``, leaves padded positions out.
* ``"none"``: no task figures.

``task="auto"`` tells them apart by the output:

1. Output with ``logits`` (an attribute, as on transformers outputs, or a key):
   rank 2 is ``"classification"``, rank 3 is ``"lm"``.
2. A plain ``(batch, classes)`` tensor is ``"classification"``, unless the model
   declares ``num_classes == 0`` (a timm backbone returning pooled features).
3. Anything else is ``"none"``; pass ``task=`` to say otherwise (a plain
   ``(batch, seq, vocab)`` tensor, or a tuple whose first element is the logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from masasurgery.errors import ConfigError, VerificationError
from masasurgery.tolerances import Tolerance
from masasurgery.verify_report import Comparison

__all__ = ["TASKS", "RunOutput", "check_task", "compare", "logits_of", "resolve_task"]

#: The values ``verify(task=...)`` accepts.
TASKS = ("auto", "classification", "lm", "none")

# Rank of the logits of each task
_RANKS = {"classification": 2, "lm": 3}

_TINY = torch.finfo(torch.float64).tiny


@dataclass
class RunOutput:
    """What one run returned.

    Attributes:
        output: The model's return value, as is.
        tensors: Its floating-point tensors, in pytree order.
    """

    output: Any
    tensors: list[Tensor]

    @classmethod
    def of(cls, output: Any) -> RunOutput:
        leaves = pytree.tree_leaves(output)
        tensors = [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]
        return cls(output, tensors)


def logits_of(output: Any) -> Tensor | None:
    """The logits of a model output, or None.

    Looked up in order: the output itself if a tensor, its ``logits``
    attribute, its ``"logits"`` key, the first element of a tuple or list.

    Example:
        >>> logits_of({"logits": torch.zeros(2, 5)}).shape
        torch.Size([2, 5])
    """
    if isinstance(output, Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("logits")
    if found is None and isinstance(output, (tuple, list)) and output:
        found = output[0]
    return found if isinstance(found, Tensor) else None


def check_task(task: str) -> None:
    """Raise ConfigError unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {list(TASKS)}.")


def resolve_task(task: str, output: Any, model: nn.Module) -> str:
    """The task whose figures fit ``output``: ``task``, or detected for ``"auto"``.

    Raises:
        ConfigError: ``task`` is unknown, or the output has no logits of its rank.

    Example:
        >>> resolve_task("auto", torch.zeros(2, 10), nn.Identity())
        'classification'
        >>> resolve_task("auto", torch.zeros(2, 7, 10), nn.Identity())
        'none'
    """
    check_task(task)
    if task == "none":
        return task
    if task != "auto":
        logits = logits_of(output)
        if logits is None or logits.dim() != _RANKS[task]:
            got = "no tensor" if logits is None else f"shape {tuple(logits.shape)}"
            raise ConfigError(
                f"task={task!r} needs logits of rank {_RANKS[task]} (batch, "
                f"{'classes' if task == 'classification' else 'seq, vocab'}); the "
                f"model's output gave {got}. Pass task='none' to skip task figures."
            )
        return task
    return _detect(output, model)


def _detect(output: Any, model: nn.Module) -> str:
    # Named logits say what they are by their rank
    named = None
    if not isinstance(output, (Tensor, tuple, list)):
        named = logits_of(output)
    if named is not None and named.is_floating_point():
        return {2: "classification", 3: "lm"}.get(named.dim(), "none")

    # A plain 2-D tensor is class logits, unless the model has no classifier
    if isinstance(output, Tensor) and output.dim() == 2:
        return "none" if getattr(model, "num_classes", None) == 0 else "classification"
    return "none"


def compare(
    actual: RunOutput,
    expected: RunOutput,
    tolerance: Tolerance,
    task: str = "none",
    mask: Tensor | None = None,
) -> Comparison:
    """Elementwise figures over all outputs, and the task figures on the logits.

    Args:
        actual: The run under test.
        expected: The run it should match.
        tolerance: The elementwise tolerance.
        task: ``"classification"``, ``"lm"`` or ``"none"`` (already resolved).
        mask: LMs: ``(batch, seq)``, nonzero at the positions to count.

    Raises:
        VerificationError: The two outputs differ in structure, or hold no
            floating-point tensor.

    Example:
        >>> e = RunOutput.of(torch.tensor([[2.0, 1.0], [0.0, 1.0]]))
        >>> a = RunOutput.of(torch.tensor([[2.0, 1.0], [1.0, 0.0]]))
        >>> c = compare(a, e, Tolerance(1e-4, 1e-4), task="classification")
        >>> c.max_abs, c.top1_agreement
        (1.0, 0.5)
    """
    comparison = _elementwise(actual.tensors, expected.tensors, tolerance)
    if task == "none":
        return comparison

    a, e = logits_of(actual.output), logits_of(expected.output)
    if a is None or e is None:
        raise VerificationError(f"task {task!r} but a run returned no logits.")
    weights = _weights(mask, a)
    a = a.detach().double().cpu().flatten(0, -2)  # (positions, classes)
    e = e.detach().double().cpu().flatten(0, -2)
    comparison.top1_agreement = _mean((a.argmax(-1) == e.argmax(-1)).double(), weights)
    if task == "lm":
        comparison.kl = _mean(_kl(e, a), weights)
    return comparison


def _elementwise(
    actual: list[Tensor], expected: list[Tensor], tolerance: Tolerance
) -> Comparison:
    shapes = [tuple(t.shape) for t in actual], [tuple(t.shape) for t in expected]
    if shapes[0] != shapes[1]:
        raise VerificationError(
            f"the runs' outputs differ in structure: {shapes[0]} vs {shapes[1]}"
        )
    if not actual:
        raise VerificationError(
            "the model returned no floating-point tensor to compare."
        )
    a = torch.cat([t.detach().double().flatten().cpu() for t in actual])
    e = torch.cat([t.detach().double().flatten().cpu() for t in expected])
    diff = a - e
    return Comparison(
        max_abs=diff.abs().max().item(),
        rel_l2=(diff.norm() / e.norm().clamp_min(_TINY)).item(),
        cosine=(a @ e / (a.norm() * e.norm()).clamp_min(_TINY)).item(),
        excess=max(
            tolerance.excess(x, y) for x, y in zip(actual, expected, strict=True)
        ),
    )


def _kl(expected: Tensor, actual: Tensor) -> Tensor:
    """KL(p || q) per row from logits, with 0 log 0 = 0 (masked vocabulary)."""
    log_p, log_q = expected.log_softmax(-1), actual.log_softmax(-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)  # (positions,)


def _weights(mask: Tensor | None, logits: Tensor) -> Tensor | None:
    # An attention mask counts only the positions it keeps
    if mask is None or tuple(mask.shape) != tuple(logits.shape[:-1]):
        return None
    return (mask.detach().cpu() != 0).double().flatten()


def _mean(values: Tensor, weights: Tensor | None) -> float:
    if weights is None:
        return values.mean().item()
    return ((values * weights).sum() / weights.sum().clamp_min(1.0)).item()
