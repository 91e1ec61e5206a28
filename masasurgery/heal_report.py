"""What :func:`masasurgery.heal.heal` did, in records and figures."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from masasurgery.report import format_count, format_table

__all__ = ["STOP_REASONS", "EvalPoint", "HealReport"]

#: Why a heal stopped: all steps run, no held-out progress for ``patience``
#: evaluations, ``max_seconds`` spent, a one-shot data iterator ran out, or the
#: loss stopped being finite.
STOP_REASONS = ("steps", "patience", "time", "data", "diverged")


@dataclass
class EvalPoint:
    """One evaluation of the student against the teacher on the held-out data.

    Attributes:
        step: Optimizer steps taken before it (0: before healing).
        seconds: Training time before it, in seconds: the teacher and student
            passes and the optimizer steps, without the evaluations.
        loss: The distillation loss, averaged over the held-out batches.
        relative_error: ``||student - teacher|| / ||teacher||`` of the outputs.
        cosine: Mean cosine of each output position with the teacher's.
    """

    step: int
    seconds: float
    loss: float
    relative_error: float
    cosine: float


@dataclass
class HealReport:
    """What a heal did.

    Attributes:
        steps: Optimizer steps taken.
        requested_steps: The ``steps`` asked for.
        stop_reason: One of :data:`STOP_REASONS`.
        seconds: Wall time of the whole call, evaluations included.
        train: Which parameters trained (``"shared"`` or ``"all"``).
        trained_parameters: Number of parameter elements that trained.
        losses: The training loss of every step.
        evals: Every held-out evaluation, the first one before any step; empty
            without ``eval_data``.
        best_step: The step whose state the model holds now: the best held-out
            loss, or the last step without ``eval_data``.
    """

    steps: int
    requested_steps: int
    stop_reason: str
    seconds: float
    train: str
    trained_parameters: int
    losses: list[float] = field(repr=False)
    evals: list[EvalPoint]
    best_step: int

    @property
    def stopped_early(self) -> bool:
        """True when the heal stopped before ``steps``: see :attr:`stop_reason`."""
        return self.stop_reason != "steps"

    @property
    def before(self) -> EvalPoint | None:
        """The held-out figures before healing; None without ``eval_data``."""
        return self.evals[0] if self.evals else None

    @property
    def after(self) -> EvalPoint | None:
        """The held-out figures of the state kept; None without ``eval_data``."""
        kept = [e for e in self.evals if e.step == self.best_step]
        return kept[-1] if kept else None

    def __str__(self) -> str:
        lines = [
            f"Healed {self.steps}/{self.requested_steps} steps in "
            f"{self.seconds:.1f} s (stop: {self.stop_reason}), training "
            f"{format_count(self.trained_parameters)} parameters ({self.train}); "
            f"kept step {self.best_step}",
        ]
        if self.losses:
            lines.append(f"training loss {self.losses[0]:.4g} -> {self.losses[-1]:.4g}")
        if self.evals:
            rows = [
                [
                    e.step,
                    f"{e.seconds:.1f}",
                    f"{e.loss:.4g}",
                    f"{e.relative_error:.4f}",
                    f"{e.cosine:.4f}",
                    "*" if e.step == self.best_step else "",
                ]
                for e in self.evals
            ]
            headers = ["step", "seconds", "loss", "rel. error", "cosine", "kept"]
            lines += ["", format_table(headers, rows)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return dataclasses.asdict(self) | {"stopped_early": self.stopped_early}
