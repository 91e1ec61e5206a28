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
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from masasurgery.budget import Allocation, Choice, solve_budget
from masasurgery.calibrate import Calibration
from masasurgery.compress_plan import (
    CompressionPlan,
    _Clock,
    prepare_compression,
)
from masasurgery.compress_report import Compression
from masasurgery.config import ROLES, MasaConfig
from masasurgery.convert import (
    Conversion,
    _check_model,
    apply_fits,
    finish,
    role_weights,
)
from masasurgery.errors import ConfigError, MasaWarning
from masasurgery.fit import MatrixPCA
from masasurgery.fit_data import ErrorTable, fit_calibrated
from masasurgery.passes.group import Group
from masasurgery.sensitivity import Readout
from masasurgery.sequential import SequentialReport, refit_sequentially

logger = logging.getLogger(__name__)

__all__ = ["Compression", "CompressionPlan", "compress", "prepare_compression"]


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
    center: bool | None = None,
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
        center: Fit each projection that has a bias about its mean input and
            shift the bias by ``(W - W^) mean``, which removes the mean's share
            of the error exactly and adds no parameter. Default: on, except
            with ``sequential=True`` (whose refit does not center).

    Returns:
        The conversion; ``conversion.compression`` says what was chosen (and
        ``conversion.compression.sequential`` what the refit changed).

    Raises:
        ConfigError: No target, several, or one out of range; bad ``grouping``;
            ``sequential=True`` without calibration batches, or with a centered
            fit.
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
            center=not sequential if center is None else center,
        )
    else:
        _check_model(model)
    if sequential and not plan.batches:
        raise ConfigError(
            "sequential=True runs the model on the calibration batches, but "
            f"{'the plan was' if calibration is plan else 'it was'} made from "
            "statistics alone; pass the batches (or a plan prepared from them)."
        )
    if sequential and plan.means:
        raise ConfigError(
            "sequential=True refits the coefficients and residuals without the "
            "bias shift of a centered fit; compress with center=False (or a plan "
            "prepared with center=False)."
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
    _warn_dropped(allocation, groups)

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


def _warn_dropped(allocation: Allocation, groups: list[Group]) -> None:
    # A layer with no atoms and rank 0 keeps a zero weight (its bias only)
    dropped = [
        f"{role} of {groups[g].blocks[layer]}"
        for (g, role), c in allocation.choices.items()
        if c.atoms == 0
        for layer, rank in enumerate(c.ranks or [c.rank] * len(groups[g].blocks))
        if rank == 0
    ]
    if dropped:
        warnings.warn(
            f"compress dropped {len(dropped)} projection"
            f"{'s' if len(dropped) > 1 else ''} entirely (no atoms, "
            f"rank 0; only their biases are left), e.g. the {dropped[0]}: the "
            "calibration data said they mattered least. If the model's task needs "
            "them, calibrate on data (and a readout) closer to that task, or remove "
            "less.",
            MasaWarning,
            stacklevel=3,
        )


def _refit(
    model: nn.Module, conversion: Conversion, batches: list[Any]
) -> SequentialReport:
    # A refit that fails leaves the model as it was before compress
    try:
        return refit_sequentially(model, conversion, batches)
    except BaseException:
        conversion.undo(model)
        raise


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
    for (g, role), choice in allocation.choices.items():
        weights = role_weights(model, groups[g], role)
        with torch.no_grad():
            fit = fit_calibrated(
                weights,
                plan.layers[g, role],
                choice.atoms,
                choice.layer_ranks,
                weighting=plan.weighting,
            )
            means = [
                plan.means.get(site.projection_of(role).target)
                for site in groups[g].sites
            ]
            fits[g, role] = replace(fit, bias_shift=_bias_shift(weights, fit, means))
    return fits


def _bias_shift(
    weights: list[Tensor], fit: MatrixPCA, means: list[Tensor | None]
) -> Tensor | None:
    """``(W_l - W^_l) mean_l`` of each layer fitted about its mean input."""
    if all(mean is None for mean in means):
        return None
    shifts = weights[0].new_zeros(
        len(weights), weights[0].shape[0], dtype=torch.float64
    )
    for layer, (weight, mean) in enumerate(zip(weights, means, strict=True)):
        if mean is not None:
            error = weight.double() - fit.reconstruct(layer).double()
            shifts[layer] = error @ mean.to(error.device)
    return shifts
