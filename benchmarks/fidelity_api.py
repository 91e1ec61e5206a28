"""What a compression method gets and returns in the fidelity benchmark.

A method is a function ``fit(model, budget, data) -> Fitted``:

* ``model`` is a fresh deep copy of the original, to edit in place (or replace);
* ``budget`` says how many parameters the q, k, v and o weights may cost after;
* ``data`` holds the calibration batches, the projection names and roles, the
  original model (a teacher for healing; never edit it) and the statistics
  ``X^T X`` of every projection's input, collected once per model and shared.

The harness times the call and counts the parameters itself (every unique
parameter of the fitted model, less those outside the q, k, v, o weights), so a
method only has to return the fitted model. It may add its own figures in
``Fitted.info`` (atoms, ranks, groups chosen), which the report prints.

Register a method in ``fidelity_methods.METHODS``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from masasurgery.calibrate import Calibration, collect_statistics

__all__ = [
    "Budget",
    "CalibrationData",
    "Fitted",
    "Method",
    "attention_weights",
    "call_model",
    "unique_parameters",
]


#: Share of the dense count a method may exceed its budget by (rounding slack).
SLACK = 1e-4


@dataclass(frozen=True)
class Budget:
    """A target compression of the attention projections.

    Attributes:
        compression: Share of the q, k, v, o weight parameters to remove, e.g.
            0.2. Biases are not counted: every method keeps them as they are.
        dense_parameters: The q, k, v, o weight parameters of the original.
    """

    compression: float
    dense_parameters: int

    @property
    def max_parameters(self) -> int:
        """Most parameters the fitted q, k, v, o weights may cost.

        ``(1 - compression)`` of the dense count, plus a slack of ``SLACK`` of
        it: the ``L * S`` coefficients of ``S = L / 3`` atoms would otherwise
        put MASA a few hundred parameters over a budget of two thirds.
        """
        share = 1.0 - self.compression + SLACK
        return math.floor(share * self.dense_parameters)

    @property
    def label(self) -> str:
        return f"{100 * self.compression:.3g}%"


@dataclass
class CalibrationData:
    """The calibration side of one model, shared by every method.

    Attributes:
        batches: Model inputs, each a tensor or a dict of keyword arguments.
        targets: Qualified names of the projection modules, to their role
            (``"q"``, ``"k"``, ``"v"`` or ``"o"``), in block order.
        reference: The original model. Read it (a teacher, a source of
            weights); never edit it.
        description: What the batches are, for the report.
        heal_lr: Learning rate of the healing row (AdamW on the shared
            parameters); DINOv2's features move at a tenth of MiniLM's.
        readout: What the model's metric reads, ``readout(output, batch)``:
            the features scored, or None for the logits (perplexity). Methods
            that weigh errors by the readout's gradients use it.
        heal_loss: The healing row's loss between student and teacher outputs
            (``f(student, teacher) -> scalar``), or None for MSE (KL for
            language models).
        heal_batches: What the healing row trains on, or None for the last
            three quarters of ``batches``.
        heal_eval: What it keeps its best state by, or None for the first
            quarter of ``batches``. Never in ``heal_batches``.
    """

    batches: list[Any]
    targets: dict[str, str]
    reference: nn.Module
    description: str
    heal_lr: float = 1e-4
    readout: Callable[[Any, Any], torch.Tensor] | None = None
    heal_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    heal_batches: list[Any] | None = field(default=None, repr=False)
    heal_eval: list[Any] | None = field(default=None, repr=False)
    _statistics: Calibration | None = field(default=None, repr=False)
    statistics_seconds: float = 0.0

    def heal_split(self) -> tuple[list[Any], list[Any]]:
        """The healing row's training batches and its held-out batches."""
        quarter = max(1, len(self.batches) // 4)
        train = self.heal_batches or self.batches[quarter:]
        return train, self.heal_eval or self.batches[:quarter]

    @property
    def example(self) -> Any:
        """One batch, for ``example_inputs=`` of masasurgery calls."""
        return self.batches[0]

    def statistics(self) -> Calibration:
        """``X^T X`` (float64) and token count of each target's input, cached.

        Collected once with :func:`masasurgery.calibrate.collect_statistics` on
        the original model; the first call pays for it (``statistics_seconds``).
        """
        if self._statistics is None:
            start = time.perf_counter()
            self._statistics = collect_statistics(
                self.reference, self.batches, list(self.targets)
            )
            self.statistics_seconds = time.perf_counter() - start
        return self._statistics


@dataclass
class Fitted:
    """What a method returns.

    Attributes:
        model: The fitted model (usually the one it was given, edited).
        parameters: The method's own count of its q, k, v, o parameters, if it
            keeps one; the harness counts anyway and reports its own figure.
        seconds: The method's own timing, if it wants to report part of its
            run only; the harness reports its wall-clock time otherwise.
        info: Free-form figures for the report, e.g. ``{"atoms": 8}``.
    """

    model: nn.Module
    parameters: int | None = None
    seconds: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


FitFn = Callable[[nn.Module, Budget, CalibrationData], Fitted]


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    Attributes:
        key: Short name, used on the command line and in the JSON.
        label: Name in tables and plots.
        fit: The method, or None when it is not available yet (an "n/a" row).
            It may also raise NotImplementedError to say so.
        start_from: Key of another method whose fitted model (at the same
            budget) this one starts from instead of the original, e.g. healing
            after "best". Its time is then this step's time only.
        uses_statistics: True when the method reads ``data.statistics()``;
            the report adds their collection time to its fit time.
    """

    key: str
    label: str
    fit: FitFn | None
    start_from: str | None = None
    uses_statistics: bool = False


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: a dict as keyword arguments, else positional."""
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def attention_weights(model: nn.Module, targets: dict[str, str]) -> int:
    """Parameters of the weights of the target projections (biases excluded)."""
    return sum(model.get_submodule(t).weight.numel() for t in targets)


def unique_parameters(model: nn.Module) -> int:
    """Every parameter of the model, shared tensors counted once."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def no_grad_fit(fit: FitFn) -> FitFn:
    """Run a method under ``torch.no_grad()`` (for closed-form fits)."""

    def wrapped(model: nn.Module, budget: Budget, data: CalibrationData) -> Fitted:
        with torch.no_grad():
            return fit(model, budget, data)

    wrapped.__name__ = fit.__name__
    wrapped.__doc__ = fit.__doc__
    return wrapped
