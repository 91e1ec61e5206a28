"""The plan of a compression: everything before a budget, reusable across budgets.

:func:`prepare_compression` analyses the model, collects the calibration
statistics (``X^T X`` of every projection's input and, for the readout metric,
``G`` of the readout's gradient at its output), groups the blocks, whitens
every layer of every dictionary once and tabulates the error of every choice.
:func:`masasurgery.compress` then only allocates, fits and rewrites.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from masasurgery.analyze import Analysis, analyze
from masasurgery.calibrate import Calibration, collect_statistics
from masasurgery.config import ROLES, MasaConfig
from masasurgery.convert import (
    _check_convertible,
    _check_model,
    role_weights,
)
from masasurgery.errors import ConfigError
from masasurgery.fit_data import ErrorTable, error_table
from masasurgery.grouping import (
    block_divergences,
    regroup,
    segment_by_divergence,
)
from masasurgery.inputs import resolve_inputs
from masasurgery.passes.capture import Inputs
from masasurgery.passes.find_attention import Projection
from masasurgery.passes.group import Group
from masasurgery.passes.layouts import LAYOUTS
from masasurgery.sensitivity import Readout, Sensitivity, collect_sensitivity
from masasurgery.whiten import Whitening, sensitivity_whitening, whitening

logger = logging.getLogger(__name__)

__all__ = ["GROUPINGS", "METRICS", "CompressionPlan", "prepare_compression"]

GROUPINGS = ("structure", "divergence")

#: What a fit keeps: the model's readout (``"fisher"``) or each projection's own
#: output (``"output"``).
METRICS = ("fisher", "output")


@dataclass
class CompressionPlan:
    """Everything :func:`compress` needs before a budget: reusable across budgets.

    Built once by :func:`prepare_compression` on the original model; each call
    of ``compress(copy, plan, ratio=...)`` then only allocates, fits and
    rewrites (the copy must have the original's module names and weights).

    Attributes:
        analysis: The analysis, with the groups after grouping.
        statistics: The input statistics of every projection.
        sensitivity: The output-gradient statistics (``metric="fisher"``), or
            None.
        tables: The error table of every ``(group, role)``.
        layers: Each layer's whitening of every ``(group, role)``, factored
            once here and reused by every budget's fit.
        grouping: How the groups were cut.
        inputs: The example inputs (for capture and verification).
        seconds: Time of each step.
        batches: The calibration batches, when the plan was made from batches
            (the sequential refit runs the model on them); None otherwise.
        means: The mean input of every projection fitted about it
            (``center=True``: those with a bias), by target. Their fits leave
            the mean's share of the error to the bias, which :func:`compress`
            shifts by ``(W - W^) mean``.
    """

    analysis: Analysis
    statistics: Calibration
    tables: dict[tuple[int, str], ErrorTable] = field(repr=False)
    grouping: str
    inputs: Inputs = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    batches: list[Any] | None = field(default=None, repr=False)
    sensitivity: Sensitivity | None = field(default=None, repr=False)
    layers: dict[tuple[int, str], list[Whitening]] = field(
        default_factory=dict, repr=False
    )
    means: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def metric(self) -> str:
        return "output" if self.sensitivity is None else "fisher"

    @property
    def weighting(self) -> str:
        """How the fits weigh layers: relative output energy, or readout units."""
        return "energy" if self.sensitivity is None else "absolute"


def prepare_compression(
    model: nn.Module,
    calibration: Iterable[Any] | Calibration,
    *,
    roles: Sequence[str] = ROLES,
    residual: bool = True,
    grouping: str = "structure",
    runs: int | None = None,
    example_inputs: Any | None = None,
    statistics: Calibration | None = None,
    metric: str | None = None,
    readout: Readout | None = None,
    loss: str | None = None,
    probes: int = 4,
    sensitivity: Sensitivity | None = None,
    center: bool = True,
) -> CompressionPlan:
    """Analyse, calibrate, group and tabulate, without changing ``model``.

    Args:
        model: The original model.
        calibration: Model inputs to calibrate on, or collected statistics.
        roles: The roles to share.
        residual: Tabulate per-layer low-rank residuals too.
        grouping: ``"structure"`` or ``"divergence"`` (see :func:`compress`).
        runs: Runs per group for ``"divergence"``.
        example_inputs: Inputs for capture; default the first calibration batch.
        statistics: Statistics already collected on ``model`` (e.g. a
            :meth:`Calibration.load`), used instead of collecting them again
            while the batches still serve ``grouping="divergence"``.
        metric: ``"fisher"``: weigh every error by how much it moves the
            model's readout (:mod:`masasurgery.sensitivity`; one backward pass
            per probe and batch). ``"output"``: by each projection's own output.
            Default: ``"fisher"``, or ``"output"`` where the gradients cannot
            be had (statistics alone, ``nn.MultiheadAttention``).
        readout: For ``"fisher"``: what to keep close, from the model's output
            and the batch; default its logits, last hidden state or output.
        loss: For ``"fisher"``: ``"mse"`` or ``"kl"`` (logits); default by the
            readout (:func:`masasurgery.sensitivity.collect_sensitivity`).
        probes: For ``"fisher"``: probe vectors per batch.
        sensitivity: For ``"fisher"``: statistics already collected, used
            instead of running the batches.
        center: Fit every projection that has a bias about its mean input,
            and let the bias absorb the mean's share of the error (free: no
            parameter is added). Projections without a bias are fitted as they
            are either way.

    Returns:
        The plan; pass it to :func:`compress` in place of the calibration.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32,
        ...                       patch_size=8).eval()
        >>> plan = prepare_compression(m, [torch.randn(4, 3, 32, 32)], roles="q")
        >>> sorted(plan.tables), plan.tables[0, "q"].errors.shape[0]
        ([(0, 'q')], 3)
    """
    # Options and inputs
    if grouping not in GROUPINGS:
        raise ConfigError(f"grouping must be one of {GROUPINGS}, got {grouping!r}.")
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}.")
    if not isinstance(center, bool):
        raise ConfigError(f"center must be True or False, got {center!r}.")
    if metric == "output" and (readout, loss, sensitivity) != (None, None, None):
        raise ConfigError(
            "readout=, loss= and sensitivity= serve metric='fisher', but "
            "metric='output' was asked for; drop them, or use metric='fisher'."
        )
    if not isinstance(calibration, Calibration):
        calibration = list(calibration)
    _check_model(model)
    if example_inputs is None and isinstance(calibration, list) and calibration:
        example_inputs = calibration[0]
    inputs = resolve_inputs(model, example_inputs)
    roles = MasaConfig(atoms=1, roles=tuple(roles)).roles

    # Steps: analyse, calibrate, group, tabulate
    seconds: dict[str, float] = {}
    clock = _Clock(seconds)
    with clock("analyze"):
        analysis = analyze(model, inputs)
        _check_convertible(analysis, MasaConfig(atoms=1, roles=roles))
    if metric is None:
        metric = _default_metric(analysis, calibration, sensitivity)
    with clock("calibrate"):
        given = calibration if statistics is None else statistics
        stats = _statistics(model, analysis, given)
    if metric == "fisher":
        with clock("sensitivity"):
            sensitivity = _sensitivity(
                model, analysis, calibration, sensitivity, readout, loss, probes
            )
    else:
        sensitivity = None
    with clock("group"):
        groups = _group(model, analysis, calibration, grouping, runs)
        analysis = replace(analysis, groups=groups)
    with clock("tabulate"):
        means = _means(model, analysis, stats) if center else {}
        layers = _whitenings(groups, roles, stats, sensitivity, means)
        weighting = "energy" if sensitivity is None else "absolute"
        tables = _tables(model, groups, layers, weighting, residual)
    batches = calibration if isinstance(calibration, list) else None
    return CompressionPlan(
        analysis,
        stats,
        tables,
        grouping,
        inputs,
        seconds,
        batches,
        sensitivity,
        layers,
        means,
    )


class _Clock:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def __call__(self, step: str) -> _Clock:
        self.step = step
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        logger.info("compress: %s", self.step)

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.step] = time.perf_counter() - self.start


def _default_metric(
    analysis: Analysis, calibration: list | Calibration, given: Sensitivity | None
) -> str:
    """``"fisher"`` where the readout's gradients can be had, else ``"output"``."""
    if given is not None:
        return "fisher"
    if isinstance(calibration, Calibration):
        logger.info("compress: statistics alone, so metric='output'")
        return "output"
    packed = [p.target for p in _projections(analysis) if p.layout == "mha_in_proj"]
    if packed:
        logger.info(
            "compress: %s is an nn.MultiheadAttention (no hook reaches its "
            "in_proj output), so metric='output'",
            packed[0],
        )
        return "output"
    return "fisher"


def _projections(analysis: Analysis) -> Iterator[Projection]:
    for group in analysis.groups:
        for site in group.sites:
            yield from site.projections


def _targets(analysis: Analysis) -> list[str]:
    return sorted({p.target for p in _projections(analysis)})


def _check_covers(
    statistics: Calibration | Sensitivity, targets: list[str], what: str
) -> None:
    missing = [t for t in targets if t not in statistics]
    if missing:
        raise ConfigError(
            f"the {what} has no statistics for {len(missing)} projections "
            f"(first: {missing[0]!r}); collect them on this model."
        )


def _statistics(
    model: nn.Module, analysis: Analysis, calibration: list | Calibration
) -> Calibration:
    targets = _targets(analysis)
    if isinstance(calibration, Calibration):
        _check_covers(calibration, targets, "calibration")
        return calibration
    if not calibration:
        raise ConfigError("compress needs calibration batches, got none.")
    return collect_statistics(model, calibration, targets)


def _sensitivity(
    model: nn.Module,
    analysis: Analysis,
    calibration: list | Calibration,
    given: Sensitivity | None,
    readout: Readout | None,
    loss: str | None,
    probes: int,
) -> Sensitivity:
    targets = _targets(analysis)
    if given is not None:
        _check_covers(given, targets, "sensitivity")
        return given
    if isinstance(calibration, Calibration):
        raise ConfigError(
            "metric='fisher' runs the model on the calibration batches to see how "
            "much each projection moves its readout, but got statistics alone; "
            "pass the batches, a sensitivity=, or metric='output'."
        )
    return collect_sensitivity(
        model, calibration, targets, readout=readout, loss=loss, probes=probes
    )


def _group(
    model: nn.Module,
    analysis: Analysis,
    calibration: list | Calibration,
    grouping: str,
    runs: int | None,
) -> list[Group]:
    if grouping == "structure":
        return list(analysis.groups)
    if isinstance(calibration, Calibration):
        raise ConfigError(
            "grouping='divergence' runs the model on the calibration batches; "
            "pass the batches rather than collected statistics."
        )
    cuts = {}
    for group in analysis.groups:
        blocks = [_parent(site.block) for site in group.sites]
        count = runs or max(1, round(group.num_blocks / 6))
        count = min(count, group.num_blocks // 2)
        if count <= 1:
            continue
        distances = block_divergences(model, blocks, calibration)
        cuts[group.index] = segment_by_divergence(distances, count)
    return regroup(analysis.groups, cuts)


def _parent(name: str) -> str:
    return name.rpartition(".")[0] if "." in name else name


def _tables(
    model: nn.Module,
    groups: list[Group],
    layers: dict[tuple[int, str], list[Whitening]],
    weighting: str,
    residual: bool,
) -> dict[tuple[int, str], ErrorTable]:
    tables = {}
    for (g, role), whitenings in layers.items():
        weights = role_weights(model, groups[g], role)
        ranks = _rank_grid(*weights[0].shape) if residual else [0]
        with torch.no_grad():
            tables[g, role] = error_table(
                weights,
                whitenings,
                _atom_grid(len(weights)),
                ranks,
                weighting=weighting,
            )
    return tables


def _means(
    model: nn.Module, analysis: Analysis, stats: Calibration
) -> dict[str, Tensor]:
    """The mean input of every projection whose bias can absorb it."""
    means, older = {}, []
    for projection in _projections(analysis):
        module = model.get_submodule(projection.target)
        if LAYOUTS[projection.layout].bias(module) is None:
            continue
        mean = stats[projection.target].mean
        if mean is None:
            older.append(projection.target)
        else:
            means[projection.target] = mean
    if older:
        logger.info(
            "compress: %d projections fitted without centering: their statistics "
            "hold no input sum (e.g. %s); collect them again to center them",
            len(older),
            older[0],
        )
    return means


def _whitenings(
    groups: list[Group],
    roles: Sequence[str],
    stats: Calibration,
    sensitivity: Sensitivity | None,
    means: dict[str, Tensor],
) -> dict[tuple[int, str], list[Whitening]]:
    """Each layer's whitening of every shared role: input side, or both sides."""
    layers = {}
    for group in groups:
        for role in group.roles:
            if role in roles:
                layers[group.index, role] = [
                    _whitening(
                        site.projection_of(role), role, stats, sensitivity, means
                    )
                    for site in group.sites
                ]
    return layers


def _whitening(
    projection: Projection,
    role: str,
    stats: Calibration,
    sensitivity: Sensitivity | None,
    means: dict[str, Tensor],
) -> Whitening:
    # About the mean input where the bias takes the mean's share of the error
    inputs = stats[projection.target]
    xtx = inputs.centered() if projection.target in means else inputs.xtx
    name = f"{projection.target} ({role})"
    if sensitivity is None:
        return whitening(xtx, name=name)
    start, stop = projection.roles[role]
    gtg = sensitivity[projection.target][start:stop, start:stop]
    return sensitivity_whitening(xtx, inputs.tokens, gtg, sensitivity.probes, name=name)


def _atom_grid(num_layers: int) -> list[int]:
    # Every count up to 4, then steps of about a quarter more
    grid, count = {0, num_layers}, 1
    while count < num_layers:
        grid.add(count)
        count = count + 1 if count < 4 else count + max(1, count // 4)
    return sorted(grid)


def _rank_grid(out_features: int, in_features: int) -> list[int]:
    # Every rank up to 64, then steps of 2: one SVD per layer prices them all,
    # and a fine grid lets the solver spend the budget layer by layer
    top = min(out_features, in_features)
    return sorted({*range(min(top, 64) + 1), *range(64, top + 1, 2), top})
