"""Heal a converted model: distil the original into it on the user's data.

The student is the converted model; the teacher is the original, either a module
the user kept (a copy made before :func:`masasurgery.convert`) or the conversion
record itself: the record keeps the replaced projections, and swapping them back
into the model for the teacher's pass (under ``torch.no_grad()``, swapped out again
also when the pass raises) gives the original without a second copy of the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from masasurgery._state import model_device, preserved
from masasurgery.convert import Conversion
from masasurgery.distill import distill_loss, output_tensor
from masasurgery.errors import ConfigError, ConversionMismatchError
from masasurgery.heal_data import Batches, call, held_out
from masasurgery.heal_loop import Run, Schedule, Teacher, eval_mode, train_loop
from masasurgery.heal_report import EvalPoint, HealReport
from masasurgery.modules import (
    DictionaryStore,
    SharedMultiheadAttention,
    SharedProjection,
)
from masasurgery.verify import _check_belongs, _swapped

__all__ = ["TRAIN", "heal"]

logger = logging.getLogger(__name__)

#: The values ``heal(train=...)`` accepts.
TRAIN = ("shared", "all")


def heal(
    model: nn.Module,
    teacher: nn.Module | Conversion,
    data: Iterable,
    *,
    steps: int,
    lr: float = 1e-4,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
    temperature: float = 1.0,
    train: str = "shared",
    eval_data: Iterable | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    max_seconds: float | None = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    select: Callable[[Any], Tensor] | None = None,
    dropout: bool = False,
    progress: bool = True,
    on_eval: Callable[[EvalPoint], None] | None = None,
) -> HealReport:
    """Train a converted model to reproduce the original's outputs.

    Each step runs the teacher (no grad) and the student on one batch, and takes
    one optimizer step on the distillation loss between their outputs (the tensor
    :func:`masasurgery.distill.output_tensor` picks, or ``select``'s). With
    ``eval_data`` the student is evaluated every ``eval_every`` steps (and before
    the first) and the best state on it is kept at the end, so a heal never
    leaves the held-out error above where it started.

    The student runs in eval mode by default (dropout and drop-path off): healing
    fits one deterministic map to another. ``dropout=True`` runs it in train mode.
    The teacher always runs in eval mode. Train/eval modes and ``requires_grad``
    of the model (and of a teacher module) are restored afterwards, and a heal that
    raises puts the trained parameters back as they were.

    Args:
        model: The converted model (the student), trained in place.
        teacher: The original model (a separate module, e.g. a
            ``copy.deepcopy`` made before converting), or the
            :class:`~masasurgery.convert.Conversion` record of ``model``, whose
            kept originals are swapped in for the teacher's passes.
        data: Batches: tensors, tuples of positional arguments, or dicts of
            keyword arguments. Iterated again when exhausted, unless it is a
            one-shot iterator. An ``attention_mask`` keyword ``(batch, seq)``
            leaves padded positions out of the loss and the figures.
        steps: Most optimizer steps to take.
        lr: Learning rate of the default optimizer, AdamW without weight decay.
        loss: ``"mse"`` (outputs), ``"cosine"`` (features, scale-free), ``"kl"``
            (logits, with ``temperature``), or ``f(student, teacher) -> scalar``.
        temperature: Softmax temperature of ``"kl"``.
        train: ``"shared"``: only the atoms and the replaced projections'
            parameters (coefficients, biases, rows left dense) train, the rest is
            frozen; ``"all"``: every floating-point parameter trains (needs a
            teacher module, since the record's teacher shares the rest).
        eval_data: Held-out batches, kept in memory; enables the figures, best-
            state restore and early stopping.
        eval_every: Steps between evaluations; default ``max(1, steps // 10)``.
        patience: Stop after this many evaluations without a lower held-out loss.
        max_seconds: Stop after this much training time: the teacher and
            student passes and the optimizer steps, the clock of
            :attr:`EvalPoint.seconds` (evaluations are not counted).
        optimizer: ``f(parameters) -> Optimizer``, replacing the default (``lr``
            is then unused).
        select: ``f(output) -> Tensor``: which output tensor to match.
        dropout: Run the student in train mode.
        progress: Show a tqdm bar on stderr with the current loss.
        on_eval: Called with each :class:`EvalPoint`, the model in eval mode
            under ``torch.no_grad()`` (to measure more figures).

    Returns:
        Steps, timings, losses, held-out figures before and after.

    Raises:
        ConfigError: An option is out of range, the data is empty, the teacher is
            no module nor a record, shares parameters with the student, or gives
            outputs of another shape.
        ConversionMismatchError: The record belongs to another model or released
            its originals.
        ModelRunError: The student or teacher failed on a batch.

    Example:
        >>> import copy, timm, masasurgery
        >>> from masasurgery.heal import heal
        >>> m = timm.create_model(
        ...     "vit_tiny_patch16_224", depth=3, img_size=32, patch_size=8
        ... ).eval()
        >>> original = copy.deepcopy(m)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> images = [torch.randn(2, 3, 32, 32) for _ in range(2)]
        >>> report = heal(m, original, images, steps=2, eval_data=images[:1],
        ...               progress=False)
        >>> report.steps, report.before.step
        (2, 0)
    """
    # Options and inputs first: a bad one fails before anything changes
    _check_options(steps, lr, train, eval_every, patience, max_seconds)
    if patience is not None and eval_data is None:
        raise ConfigError(
            f"patience={patience} needs eval_data: early stopping watches the "
            "held-out loss. Pass eval_data= (held-out batches) or drop patience."
        )
    params = _trainable(model, train)
    _check_teacher(model, teacher, train, params)
    loss_fn = distill_loss(loss, temperature)
    batches = Batches(model, data)
    evals = held_out(model, eval_data) if eval_data is not None else None
    every = eval_every or max(1, steps // 10)

    # Train, with every flag put back afterwards
    with preserved(model), _teaching(model, teacher) as run_teacher:
        run = Run(model, run_teacher, loss_fn, select or output_tensor, evals)
        _freeze_all_but(model, params)
        model.train(dropout)
        return train_loop(
            run,
            params,
            batches,
            optimizer(params) if optimizer else _adamw(params, lr),
            Schedule(steps, every, patience, max_seconds, train, progress, on_eval),
        )


def _check_options(
    steps: int,
    lr: float,
    train: str,
    eval_every: int | None,
    patience: int | None,
    max_seconds: float | None,
) -> None:
    positive_ints = {"steps": steps, "eval_every": eval_every, "patience": patience}
    for name, value in positive_ints.items():
        if value is None and name != "steps":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}.")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}.")
    if max_seconds is not None and not (
        isinstance(max_seconds, (int, float)) and max_seconds > 0
    ):
        raise ConfigError(
            f"max_seconds must be a positive number or None, got {max_seconds!r}."
        )
    if train not in TRAIN:
        raise ConfigError(f"unknown train={train!r}; expected one of {list(TRAIN)}.")


def _adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _trainable(model: nn.Module, train: str) -> list[nn.Parameter]:
    """The parameters that train, each once."""
    if train == "all":
        return [p for p in model.parameters() if p.is_floating_point()]
    owners = [
        m
        for m in model.modules()
        if isinstance(m, (DictionaryStore, SharedProjection, SharedMultiheadAttention))
    ]
    found = {id(p): p for m in owners for p in m.parameters()}
    if not found:
        raise ConfigError(
            f"{type(model).__name__} holds no masasurgery dictionaries, so "
            "train='shared' has nothing to train; convert it first "
            "(masasurgery.convert) or pass train='all'."
        )
    return list(found.values())


def _check_teacher(
    model: nn.Module, teacher: Any, train: str, params: list[nn.Parameter]
) -> None:
    if isinstance(teacher, Conversion):
        _check_belongs(model, teacher)
        if teacher.rewrite.originals_released:
            raise ConversionMismatchError(
                "this conversion released its original projections "
                "(keep_originals=False), so it cannot act as the teacher; pass a "
                "copy of the original model as teacher instead."
            )
        if train == "all":
            raise ConfigError(
                "train='all' needs a separate teacher module: the conversion "
                "record's teacher runs on the student's own non-attention "
                "parameters, which would train too. Pass a copy of the original "
                "model (copy.deepcopy before convert), or train='shared'."
            )
        return
    if not isinstance(teacher, nn.Module):
        raise ConfigError(
            "teacher must be the original model (an nn.Module) or the Conversion "
            f"record of the student, got {type(teacher).__name__}."
        )
    trained = {id(p) for p in params}
    if teacher is model or any(id(p) in trained for p in teacher.parameters()):
        raise ConfigError(
            "the teacher shares trainable parameters with the student, so it would "
            "change while the student learns; pass a copy of the original made "
            "before converting (copy.deepcopy(model)), or the Conversion record."
        )


@contextlib.contextmanager
def _teaching(model: nn.Module, teacher: Any) -> Iterator[Teacher]:
    """A function running the teacher on some inputs, in eval mode, no grad."""
    # A separate module: run it as it is
    if isinstance(teacher, nn.Module):
        with preserved(teacher):
            teacher.eval()
            yield lambda inputs: call(teacher, inputs, "teacher")
        return

    # The record: swap the originals in for each pass, on the model's device
    originals = teacher.rewrite.originals
    with preserved(*originals.values()):
        device = model_device(model)
        if device is not None:
            for module in originals.values():
                module.to(device)

        def run(inputs: Any) -> Any:
            with _swapped(model, originals), eval_mode(model):
                return call(model, inputs, "teacher (original projections)")

        yield run


def _freeze_all_but(model: nn.Module, params: list[nn.Parameter]) -> None:
    trained = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
