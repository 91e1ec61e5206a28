"""The record of a compression: what :func:`masasurgery.compress` chose."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from masasurgery.budget import Allocation, Choice
from masasurgery.config import ROLES
from masasurgery.report import format_table
from masasurgery.sequential import SequentialReport

__all__ = ["Compression"]


@dataclass
class Compression:
    """What :func:`compress` chose, and what it cost to choose.

    Attributes:
        target: The budget as the user gave it (``"ratio=0.3"``).
        allocation: Atoms and residual ranks of every dictionary, with the
            predicted error of each.
        grouping: ``"structure"`` or ``"divergence"``.
        metric: ``"fisher"`` (errors in the readout's units) or ``"output"``
            (relative errors of each projection's output).
        loss: With ``"fisher"``: the readout metric the probes stood for
            (``"mse"`` or ``"kl"``).
        runs: The blocks of each group after grouping.
        seconds: Time of each step.
        sequential: What the sequential refit changed, when it ran.
    """

    target: str
    allocation: Allocation
    grouping: str
    runs: list[list[str]]
    seconds: dict[str, float] = field(default_factory=dict)
    sequential: SequentialReport | None = None
    metric: str = "output"
    loss: str | None = None

    def __str__(self) -> str:
        rows = [
            [
                g,
                role,
                c.atoms,
                _ranks(c),
                _removed(c),
            ]
            + [f"{c.error:.4g}"]
            for (g, role), c in _in_role_order(self.allocation.choices)
        ]
        a = self.allocation
        error = "readout error" if self.metric == "fisher" else "output error"
        return "\n".join(
            [
                f"Budget {self.target}: {a.parameters:,} of {a.dense_parameters:,} "
                f"parameters ({a.compression:.1%} removed), grouping "
                f"{self.grouping}, {len(self.runs)} groups, metric {self.metric}"
                + (f" ({self.loss} of the readout)" if self.loss else ""),
                "",
                format_table(
                    ["group", "role", "atoms", "rank", "removed", error],
                    rows,
                ),
            ]
            + ([] if self.sequential is None else ["", str(self.sequential)])
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "target": self.target,
            "grouping": self.grouping,
            "metric": self.metric,
            "loss": self.loss,
            "runs": self.runs,
            "parameters": self.allocation.parameters,
            "dense_parameters": self.allocation.dense_parameters,
            "compression": self.allocation.compression,
            "choices": [
                {"group": g, "role": role} | vars(c)
                for (g, role), c in _in_role_order(self.allocation.choices)
            ],
            "seconds": self.seconds,
            "sequential": None
            if self.sequential is None
            else {
                "blocks": self.sequential.blocks,
                "chains": self.sequential.chains,
                "skipped": self.sequential.skipped,
                "parts": [vars(p) for p in self.sequential.parts],
            },
        }


def _removed(choice: Choice) -> str:
    """``"63.5%"``; a fit that costs more than dense says how much it adds."""
    added = choice.parameters - choice.dense_parameters
    if added > 0:
        return f"+{added:,} params"
    return f"{1 - choice.parameters / choice.dense_parameters:.1%}"


def _ranks(choice: Choice) -> str:
    """``"12"``, or ``"4..20 (mean 11.3)"`` when the layers differ."""
    if choice.ranks is None or len(set(choice.ranks)) == 1:
        return str(choice.rank)
    mean = sum(choice.ranks) / len(choice.ranks)
    return f"{min(choice.ranks)}..{max(choice.ranks)} (mean {mean:.1f})"


def _in_role_order(choices: dict[tuple[int, str], Choice]) -> list:
    """The choices by group, then in the order q, k, v, o."""
    return sorted(choices.items(), key=lambda kv: (kv[0][0], ROLES.index(kv[0][1])))
