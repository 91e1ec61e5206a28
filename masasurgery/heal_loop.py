"""The training loop of :func:`masasurgery.heal.heal`: steps, evaluations, the
best state and the reason to stop."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from masasurgery.distill import FidelitySum, LossFn
from masasurgery.errors import ConfigError, MasaWarning
from masasurgery.heal_data import Batches, call, mask_of
from masasurgery.heal_report import EvalPoint, HealReport

__all__ = ["Run", "Schedule", "eval_mode", "train_loop"]

logger = logging.getLogger(__name__)

#: Runs the teacher on a batch, in eval mode and without grad.
Teacher = Callable[[Any], Any]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside; each module's own flag back after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@dataclass
class Schedule:
    """When to evaluate and stop, and what to show."""

    steps: int
    every: int
    patience: int | None
    max_seconds: float | None
    train: str
    progress: bool
    on_eval: Callable[[EvalPoint], None] | None


class Run:
    """One student, one teacher, one loss: a training step and an evaluation."""

    def __init__(
        self,
        model: nn.Module,
        teacher: Teacher,
        loss_fn: LossFn,
        select: Callable[[Any], Tensor],
        evals: list | None,
    ) -> None:
        self.model, self.teacher, self.loss_fn = model, teacher, loss_fn
        self.select, self.evals = select, evals
        self.targets: list[Tensor] | None = None

    def pair(self, inputs: Any) -> tuple[Tensor, Tensor]:
        """The student's output (with grad) and the teacher's, checked."""
        with torch.no_grad():
            target = self.select(self.teacher(inputs)).detach()
        output = self.select(call(self.model, inputs, "student"))
        _check_shapes(output, target)
        return output, target

    def loss(self, output: Tensor, target: Tensor, inputs: Any) -> Tensor:
        value = self.loss_fn(output, target, mask_of(inputs))
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise ConfigError(
                "the loss must return a scalar tensor, got "
                f"{getattr(value, 'shape', type(value).__name__)}."
            )
        return value

    def evaluate(self, step: int, seconds: float) -> EvalPoint:
        """Loss and fidelity on the held-out batches; teacher outputs cached."""
        with torch.no_grad(), eval_mode(self.model):
            if self.targets is None:
                self.targets = [self.select(self.teacher(x)) for x in self.evals]
            figures, losses = FidelitySum(), []
            for inputs, target in zip(self.evals, self.targets, strict=True):
                output = self.select(call(self.model, inputs, "student"))
                _check_shapes(output, target)
                losses.append(self.loss(output, target, inputs).item())
                figures.add(output, target, mask_of(inputs))
            fidelity = figures.result()
        return EvalPoint(
            step=step,
            seconds=seconds,
            loss=sum(losses) / len(losses),
            relative_error=fidelity.relative_error,
            cosine=fidelity.cosine,
        )


def _check_shapes(output: Tensor, target: Tensor) -> None:
    if output.shape != target.shape:
        raise ConfigError(
            f"the student's output has shape {tuple(output.shape)}, the teacher's "
            f"{tuple(target.shape)}; distillation needs the same shape. Pass the "
            "original of this very model as teacher, or select= the tensors to "
            "compare."
        )


def train_loop(
    run: Run,
    params: list[nn.Parameter],
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
) -> HealReport:
    """The training loop; the trained parameters come back as they were if it
    raises, and as the best held-out state when it ends."""
    initial = _snapshot(params)
    grads = [p.grad for p in params]
    bar = tqdm(
        total=schedule.steps,
        desc="heal",
        disable=not schedule.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        loop = _Loop(run, params, initial, schedule, bar)
        loop.run(batches, optimizer)
    except BaseException:
        _load(params, initial)
        raise
    finally:
        bar.close()
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
    return loop.report(sum(p.numel() for p in params))


class _Loop:
    """Steps, evaluations, the best state and the reason to stop."""

    def __init__(
        self,
        run: Run,
        params: list[nn.Parameter],
        initial: list[Tensor],
        schedule: Schedule,
        bar: tqdm,
    ) -> None:
        self.session, self.params, self.schedule, self.bar = run, params, schedule, bar
        self.best_state, self.best_loss, self.best_step = initial, math.inf, 0
        self.losses: list[float] = []
        self.points: list[EvalPoint] = []
        self.stale, self.reason = 0, "steps"
        self.start, self.trained = time.perf_counter(), 0.0

    def run(self, batches: Batches, optimizer: torch.optim.Optimizer) -> None:
        # Figures before healing, then one step after another
        self.evaluate()
        for step in range(1, self.schedule.steps + 1):
            self.reason = self.step(batches, optimizer)
            if self.reason == "steps" and step % self.schedule.every == 0:
                self.reason = self.evaluate()
            if self.reason == "steps" and self._out_of_time():
                self.reason = "time"
            if self.reason != "steps":
                break

        # The last state evaluated too, then the best one kept
        last = self.points[-1].step if self.points else len(self.losses)
        if self.reason != "diverged" and last != len(self.losses):
            self.evaluate()
        if self.session.evals is not None or self.reason == "diverged":
            _load(self.params, self.best_state)
        else:
            self.best_step = len(self.losses)

    def step(self, batches: Batches, optimizer: torch.optim.Optimizer) -> str:
        tick = time.perf_counter()
        inputs = batches.next()
        if inputs is None:
            return "data"
        output, target = self.session.pair(inputs)
        loss = self.session.loss(output, target, inputs)
        if not torch.isfinite(loss):
            warnings.warn(
                f"the distillation loss became {loss.item()} after "
                f"{len(self.losses)} steps; healing stopped and the parameters "
                "went back to the best held-out state (without eval_data: to "
                "where they started). Lower lr.",
                MasaWarning,
                stacklevel=4,
            )
            return "diverged"
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.trained += time.perf_counter() - tick
        self.losses.append(loss.item())
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4g}", refresh=False)
        return "steps"

    def evaluate(self) -> str:
        if self.session.evals is None:
            return "steps"
        point = self.session.evaluate(len(self.losses), self.trained)
        self.points.append(point)
        if self.schedule.on_eval is not None:
            with torch.no_grad(), eval_mode(self.session.model):
                self.schedule.on_eval(point)
        logger.debug("heal eval %s", point)
        if point.loss < self.best_loss:
            self.best_state, self.best_loss = _snapshot(self.params), point.loss
            self.best_step, self.stale = point.step, 0
            return "steps"
        self.stale += 1
        patience = self.schedule.patience
        return (
            "patience" if patience is not None and self.stale >= patience else "steps"
        )

    def _out_of_time(self) -> bool:
        limit = self.schedule.max_seconds
        return limit is not None and self.trained >= limit

    def report(self, trained_parameters: int) -> HealReport:
        return HealReport(
            steps=len(self.losses),
            requested_steps=self.schedule.steps,
            stop_reason=self.reason,
            seconds=time.perf_counter() - self.start,
            train=self.schedule.train,
            trained_parameters=trained_parameters,
            losses=self.losses,
            evals=self.points,
            best_step=self.best_step,
        )


def _snapshot(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def _load(params: list[nn.Parameter], state: list[Tensor]) -> None:
    with torch.no_grad():
        for p, saved in zip(params, state, strict=True):
            p.copy_(saved)
