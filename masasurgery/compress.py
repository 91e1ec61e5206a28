"""Compress: calibrated MASA under a parameter budget.

:func:`convert` shares every role with the same number of atoms, fitted to the
weights. :func:`compress` spends a budget where the data says it matters:

1. **calibrate**: ``X^T X`` of every projection's input (:mod:`.calibrate`)
   and, with ``metric="fisher"`` (the default), ``G`` of the readout's
   gradient at every projection's output (:mod:`.sensitivity`), so that every
   error below is how far the model's readout moves;
2. **group**: keep the structural groups, or cut them into runs of consecutive
   blocks (:mod:`.grouping`);
3. **tabulate**: the output error of every ``(atoms, residual rank)`` choice of
   every dictionary (:func:`.fit_data.error_table`);
4. **allocate**: one atom count per dictionary and one residual rank per layer,
   least total error within the budget (:func:`.budget.solve_budget`);
5. **fit**: shared atoms in the output metric and per-layer whitened low-rank
   residuals (:func:`.fit_data.fit_calibrated`);
6. **rewrite** and **verify**, as :func:`convert` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from masasurgery.analyze import Analysis, analyze
from masasurgery.budget import Allocation, Choice, solve_budget
from masasurgery.calibrate import Calibration, collect_statistics
from masasurgery.config import ROLES, MasaConfig
from masasurgery.convert import (
    Conversion,
    _check_convertible,
    _check_model,
    apply_fits,
    finish,
    role_weights,
)
from masasurgery.errors import ConfigError
from masasurgery.fit import MatrixPCA
from masasurgery.fit_data import ErrorTable, error_table, fit_calibrated
from masasurgery.grouping import (
    block_divergences,
    regroup,
    segment_by_divergence,
)
from masasurgery.inputs import resolve_inputs
from masasurgery.passes.capture import Inputs
from masasurgery.passes.group import Group
from masasurgery.report import format_table
from masasurgery.sensitivity import Readout, Sensitivity, collect_sensitivity
from masasurgery.sequential import SequentialReport, refit_sequentially
from masasurgery.whiten import Whitening, sensitivity_whitening

__all__ = ["Compression", "CompressionPlan", "compress", "prepare_compression"]

logger = logging.getLogger(__name__)

GROUPINGS = ("structure", "divergence")

#: What a fit keeps: the model's readout (``"fisher"``) or each projection's own
#: output (``"output"``).
METRICS = ("fisher", "output")


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
                f"{1 - c.parameters / c.dense_parameters:.1%}",
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


def _ranks(choice: Choice) -> str:
    """``"12"``, or ``"4..20 (mean 11.3)"`` when the layers differ."""
    if choice.ranks is None or len(set(choice.ranks)) == 1:
        return str(choice.rank)
    mean = sum(choice.ranks) / len(choice.ranks)
    return f"{min(choice.ranks)}..{max(choice.ranks)} (mean {mean:.1f})"


def _in_role_order(choices: dict[tuple[int, str], Choice]) -> list:
    """The choices by group, then in the order q, k, v, o."""
    return sorted(choices.items(), key=lambda kv: (kv[0][0], ROLES.index(kv[0][1])))


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
        grouping: How the groups were cut.
        inputs: The example inputs (for capture and verification).
        seconds: Time of each step.
        batches: The calibration batches, when the plan was made from batches
            (the sequential refit runs the model on them); None otherwise.
    """

    analysis: Analysis
    statistics: Calibration
    tables: dict[tuple[int, str], ErrorTable] = field(repr=False)
    grouping: str
    inputs: Inputs = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    batches: list[Any] | None = field(default=None, repr=False)
    sensitivity: Sensitivity | None = field(default=None, repr=False)

    @property
    def metric(self) -> str:
        return "output" if self.sensitivity is None else "fisher"


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
        tables = _tables(model, groups, roles, stats, sensitivity, residual)
    batches = calibration if isinstance(calibration, list) else None
    return CompressionPlan(
        analysis, stats, tables, grouping, inputs, seconds, batches, sensitivity
    )


def compress(
    model: nn.Module,
    calibration: Iterable[Any] | Calibration | CompressionPlan,
    *,
    ratio: float | None = None,
    parameters: int | None = None,
    atoms: int | None = None,
    roles: Sequence[str] = ROLES,
    residual: bool = True,
    grouping: str = "structure",
    runs: int | None = None,
    sequential: bool = False,
    example_inputs: Any | None = None,
    verify: bool = True,
    device: torch.device | str | None = None,
    keep_originals: bool = True,
    metric: str | None = None,
    readout: Readout | None = None,
    loss: str | None = None,
    probes: int = 4,
) -> Conversion:
    """Share the attention projections under a budget, fitted to data.

    Give exactly one target: ``ratio`` (share of the shared roles' parameters to
    remove), ``parameters`` (most parameters their fits may cost), or ``atoms``
    (atoms per dictionary and no residual: :func:`convert`, fitted to data).

    Args:
        model: The model to compress, in place.
        calibration: Model inputs (tensors, tuples or dicts) to calibrate on,
            statistics already collected, or a :class:`CompressionPlan`.
        ratio: Target compression of the shared roles, in ``(0, 1)``.
        parameters: Target parameter count of the shared roles' fits.
        atoms: Fixed atoms per dictionary instead of a budget.
        roles: The roles to share; the others stay dense.
        residual: Allow per-layer low-rank residuals (with a budget).
        grouping: ``"structure"`` keeps the analysis' groups; ``"divergence"``
            cuts each into ``runs`` runs where consecutive blocks differ most
            (:mod:`masasurgery.grouping`).
        runs: Runs per group for ``"divergence"``; default one per six blocks.
        sequential: After the fit, refit each block's coefficients and
            residuals, in order, for the inputs the compressed blocks before it
            give (:mod:`masasurgery.sequential`): a few more passes over the
            calibration batches, which must be batches (or a plan made from
            them), not statistics alone.
        example_inputs: Inputs for capture and verification; default the first
            calibration batch.
        verify: Check the rewrite; on failure the model is restored.
        device: Where to verify.
        keep_originals: Keep the replaced projections in the record.
        metric: ``"fisher"``: every error is how far it moves the model's
            readout, estimated from the readout's gradients on the calibration
            batches, so the budget goes to the roles and layers the model is
            sensitive to. ``"output"``: each projection's own output error (no
            backward pass). Default: ``"fisher"``, or ``"output"`` where the
            gradients cannot be had (statistics alone, or an
            ``nn.MultiheadAttention``, whose packed projection no hook
            reaches); ``conversion.compression.metric`` says which ran.
        readout: For ``"fisher"``: what to keep close, ``readout(output,
            batch) -> Tensor``; default the logits, the last hidden state or the
            output itself. Give the features you use (e.g. a ViT's normalised
            CLS token) for the best fit of those.
        loss: For ``"fisher"``: ``"mse"`` or ``"kl"``; default ``"kl"`` for
            logits, else ``"mse"``.
        probes: For ``"fisher"``: probe vectors per calibration batch.

    Returns:
        The conversion; ``conversion.compression`` says what was chosen (and
        ``conversion.compression.sequential`` what the refit changed).

    Raises:
        ConfigError: No target, several, or one out of range; bad ``grouping``;
            ``sequential=True`` without calibration batches.
        NoAttentionError: No group of repeated attention blocks.
        VerificationError: The rewrite failed verification; model unchanged.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32,
        ...                       patch_size=8).eval()
        >>> data = [torch.randn(4, 3, 32, 32)]
        >>> conversion = compress(m, data, ratio=0.5, roles=("q", "k"))
        >>> conversion.compression.allocation.compression >= 0.5
        True
    """
    # The plan: reused, or made now
    target = _target(ratio, parameters, atoms)
    plan = calibration
    if not isinstance(plan, CompressionPlan):
        plan = prepare_compression(
            model,
            calibration,
            roles=roles,
            residual=residual and atoms is None,
            grouping=grouping,
            runs=runs,
            example_inputs=example_inputs,
            metric=metric,
            readout=readout,
            loss=loss,
            probes=probes,
        )
    else:
        _check_model(model)
    if sequential and not plan.batches:
        raise ConfigError(
            "sequential=True runs the model on the calibration batches, but "
            f"{'the plan was' if calibration is plan else 'it was'} made from "
            "statistics alone; pass the batches (or a plan prepared from them)."
        )
    if sequential and plan.sensitivity is not None:
        # TODO: refit against the readout too (G of the compressed blocks' outputs)
        raise NotImplementedError(
            "sequential=True refits each projection's own output error, not the "
            "readout that metric='fisher' fitted; use metric='output' with it."
        )
    seconds = dict(plan.seconds)
    clock = _Clock(seconds)

    # Allocate and fit
    groups = plan.analysis.groups
    with clock("allocate"):
        allocation = _allocate(plan.tables, target)
    with clock("fit"):
        fits = _fit(model, groups, plan, allocation)
    if plan.sensitivity is None:
        allocation = _measured(allocation, fits)

    # Rewrite and verify, as convert does
    most = max(c.atoms for c in allocation.choices.values())
    shared = tuple(sorted({role for _, role in allocation.choices}, key=ROLES.index))
    config = MasaConfig(atoms=max(most, 1), roles=shared)
    conversion = apply_fits(model, plan.analysis, fits, config)
    refit = None
    if sequential:
        with clock("sequential"):
            refit = _refit(model, conversion, plan.batches)
    conversion.compression = Compression(
        target=target[0],
        allocation=allocation,
        grouping=plan.grouping,
        runs=[g.blocks for g in groups],
        seconds=seconds,
        sequential=refit,
        metric=plan.metric,
        loss=None if plan.sensitivity is None else plan.sensitivity.loss,
    )
    inputs = plan.inputs if example_inputs is None else example_inputs
    finish(model, conversion, inputs, verify, device, keep_originals)
    return conversion


def _refit(
    model: nn.Module, conversion: Conversion, batches: list[Any]
) -> SequentialReport:
    # A refit that fails leaves the model as it was before compress
    try:
        return refit_sequentially(model, conversion, batches)
    except BaseException:
        conversion.undo(model)
        raise


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


def _target(
    ratio: float | None, parameters: int | None, atoms: int | None
) -> tuple[str, float | int]:
    given = {
        k: v
        for k, v in {"ratio": ratio, "parameters": parameters, "atoms": atoms}.items()
        if v is not None
    }
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of ratio=, parameters= or atoms=, got {sorted(given)}; "
            "e.g. ratio=0.3 removes 30% of the shared roles' parameters."
        )
    ((name, value),) = given.items()
    if name == "ratio" and not 0.0 < value < 1.0:
        raise ConfigError(f"ratio must be in (0, 1), got {value!r}.")
    if name != "ratio" and (
        isinstance(value, bool) or int(value) != value or value < 1
    ):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return f"{name}={value}", value


def _default_metric(
    analysis: Analysis, calibration: list | Calibration, given: Sensitivity | None
) -> str:
    """``"fisher"`` where the readout's gradients can be had, else ``"output"``."""
    if given is not None:
        return "fisher"
    if isinstance(calibration, Calibration):
        logger.info("compress: statistics alone, so metric='output'")
        return "output"
    packed = [
        p.target
        for g in analysis.groups
        for s in g.sites
        for p in s.projections
        if p.layout == "mha_in_proj"
    ]
    if packed:
        logger.info(
            "compress: %s is an nn.MultiheadAttention (no hook reaches its "
            "in_proj output), so metric='output'",
            packed[0],
        )
        return "output"
    return "fisher"


def _targets(analysis: Analysis) -> list[str]:
    return sorted(
        {p.target for g in analysis.groups for s in g.sites for p in s.projections}
    )


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
    roles: Sequence[str],
    stats: Calibration,
    sensitivity: Sensitivity | None,
    residual: bool,
) -> dict[tuple[int, str], ErrorTable]:
    tables = {}
    weighting = "energy" if sensitivity is None else "absolute"
    for group in groups:
        for role in group.roles:
            if role not in roles:
                continue
            weights, layers = _role_data(model, group, role, stats, sensitivity)
            ranks = _rank_grid(*weights[0].shape) if residual else [0]
            with torch.no_grad():
                tables[group.index, role] = error_table(
                    weights,
                    layers,
                    _atom_grid(len(weights)),
                    ranks,
                    weighting=weighting,
                )
    return tables


def _role_data(
    model: nn.Module,
    group: Group,
    role: str,
    stats: Calibration,
    sensitivity: Sensitivity | None,
) -> tuple[list[Tensor], list[Tensor | Whitening]]:
    """The role's weights, and each layer's ``X^T X`` or two-sided whitening."""
    weights = role_weights(model, group, role)
    layers: list[Tensor | Whitening] = []
    for site in group.sites:
        projection = site.projection_of(role)
        inputs = stats[projection.target]
        if sensitivity is None:
            layers.append(inputs.xtx)
            continue
        start, stop = projection.roles[role]
        gtg = sensitivity[projection.target][start:stop, start:stop]
        layers.append(
            sensitivity_whitening(
                inputs.xtx,
                inputs.tokens,
                gtg,
                sensitivity.probes,
                name=f"{projection.target} ({role})",
            )
        )
    return weights, layers


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


def _allocate(
    tables: dict[tuple[int, str], ErrorTable], target: tuple[str, float | int]
) -> Allocation:
    name, value = target[0].partition("=")[0], target[1]
    if name == "atoms":
        choices = {
            key: Choice(
                atoms=min(value, t.num_layers),
                rank=0,
                parameters=t.parameters(min(value, t.num_layers), 0),
                dense_parameters=t.dense_parameters,
                error=_table_error(t, min(value, t.num_layers), 0),
            )
            for key, t in tables.items()
        }
        return Allocation(choices, sum(c.parameters for c in choices.values()))
    dense = sum(t.dense_parameters for t in tables.values())
    budget = int((1.0 - value) * dense) if name == "ratio" else int(value)
    return solve_budget(tables, budget, per_layer=True)


def _table_error(table: ErrorTable, atoms: int, rank: int) -> float:
    # The table's own figure where it priced this pair (the fit's otherwise)
    if atoms not in table.atoms or rank not in table.ranks:
        return float("nan")
    return table.errors[table.atoms.index(atoms), table.ranks.index(rank)].item()


def _measured(
    allocation: Allocation, fits: dict[tuple[int, str], MatrixPCA]
) -> Allocation:
    # The fits' own float64 output errors replace the table's estimates
    choices = {
        key: replace(c, error=fits[key].layer_errors.square().sum().item())
        for key, c in allocation.choices.items()
    }
    return Allocation(choices, allocation.budget)


def _fit(
    model: nn.Module,
    groups: list[Group],
    plan: CompressionPlan,
    allocation: Allocation,
) -> dict[tuple[int, str], MatrixPCA]:
    fits = {}
    weighting = "energy" if plan.sensitivity is None else "absolute"
    for (g, role), choice in allocation.choices.items():
        weights, layers = _role_data(
            model, groups[g], role, plan.statistics, plan.sensitivity
        )
        with torch.no_grad():
            fits[g, role] = fit_calibrated(
                weights,
                layers,
                choice.atoms,
                choice.layer_ranks,
                weighting=weighting,
            )
    return fits
