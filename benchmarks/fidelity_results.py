"""Records of a fidelity run, the target verdicts, and their JSON form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fidelity_metrics import MetricSpec, loss_of

__all__ = ["Cell", "ModelResult", "Verdict", "load_results", "save_results", "verdict"]


@dataclass
class Cell:
    """One method at one budget.

    Attributes:
        method: Key of the method.
        budget: Nominal compression, e.g. 0.2.
        status: ``"ok"``, ``"n/a"`` (not available yet) or ``"error"``.
        note: Why a cell is n/a or failed.
        scores: The metrics, by key.
        parameters: Parameters of the q, k, v, o weights after (harness count).
        compression: Share of the dense q, k, v, o weights removed, achieved.
        seconds: Fit time.
        over_budget: True when ``parameters`` exceeds the budget.
        info: What the method chose (atoms, ranks, ...).
    """

    method: str
    budget: float
    status: str
    note: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    parameters: int | None = None
    compression: float | None = None
    seconds: float | None = None
    over_budget: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelResult:
    """Everything measured on one model in one run."""

    key: str
    title: str
    calibration: str
    evaluation: str
    metrics: list[MetricSpec]
    original: dict[str, float]
    dense_parameters: int
    budgets: list[float]
    methods: list[dict[str, Any]]
    cells: list[Cell]
    statistics_seconds: float
    setup_seconds: float
    total_seconds: float = 0.0
    run: dict[str, Any] = field(default_factory=dict)

    def cell(self, method: str, budget: float) -> Cell | None:
        for c in self.cells:
            if c.method == method and abs(c.budget - budget) < 1e-9:
                return c
        return None


@dataclass(frozen=True)
class Verdict:
    """Whether a method meets the issue's target at one budget.

    Attributes:
        met: True or False, or None when a needed row has no figure.
        detail: The numbers behind it.
    """

    met: bool | None
    detail: str

    @property
    def label(self) -> str:
        return {True: "yes", False: "no", None: "n/a"}[self.met]


def verdict(result: ModelResult, method: str, budget: float) -> Verdict:
    """Target: lose at most half of what "paper" loses, and beat "whitened".

    Losses are in the primary metric (first of ``result.metrics``) against the
    original; a cell over its budget never meets the target.
    """
    spec = result.metrics[0]
    cells = {k: result.cell(k, budget) for k in (method, "paper", "whitened")}
    missing = [k for k, c in cells.items() if c is None or c.status != "ok"]
    if missing:
        return Verdict(None, f"no figure for {', '.join(missing)}")
    original = result.original[spec.key]
    ours, paper, whitened = (cells[k].scores[spec.key] for k in cells)
    loss, paper_loss = loss_of(spec, ours, original), loss_of(spec, paper, original)
    beats = loss < loss_of(spec, whitened, original)
    halves = loss <= 0.5 * paper_loss
    met = halves and beats and not cells[method].over_budget
    return Verdict(
        met,
        f"loss {loss:.4g} vs paper {paper_loss:.4g} (needs <= {0.5 * paper_loss:.4g})"
        f"; {spec.label} {ours:.4g} vs whitened {whitened:.4g}",
    )


def save_results(path: Path, results: dict[str, ModelResult]) -> None:
    """Write the results as JSON, merged over what ``path`` already holds."""
    merged = {k: v for k, v in _read(path).items() if k not in results}
    merged.update({k: asdict(v) for k, v in results.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": merged}, indent=1) + "\n")


def load_results(path: Path) -> dict[str, ModelResult]:
    """The results stored at ``path``, in model order."""
    results = {}
    for key, data in _read(path).items():
        data = dict(data)
        data["metrics"] = [MetricSpec(**m) for m in data["metrics"]]
        data["cells"] = [Cell(**c) for c in data["cells"]]
        results[key] = ModelResult(**data)
    return results


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["models"]
