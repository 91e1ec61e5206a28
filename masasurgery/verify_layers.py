"""Verification, per projection: each replacement against its fitted reference.

The reference of a replaced projection is a copy of the original module with the
fitted rows of every shared role written into its weight (and a centered fit's
bias shift added to its bias). The rewrite is exact when each replacement has the
reference's weight rows and bias, and gives the reference's output on the very
input it sees in the converted run. The per-layer weight error of the
approximation is read off the same fitted rows.

Every fitted layer is reconstructed once per verification (:func:`fitted_projections`)
and every check reads that record.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from masasurgery.fit import relative_error
from masasurgery.passes.layouts import LAYOUTS, Layout, read_rows
from masasurgery.tolerances import Tolerance
from masasurgery.verify_report import LayerCheck, LayerError

if TYPE_CHECKING:
    from masasurgery.convert import Conversion

__all__ = [
    "FittedProjection",
    "FittedRows",
    "check_weights",
    "fitted_projections",
    "layer_errors",
    "output_checks",
    "reference_modules",
]

Checks = dict[tuple[str, str, str], LayerCheck]


@dataclass
class FittedRows:
    """One shared role's rows of one replaced projection, as fitted."""

    group: int
    layer: int
    block: str
    role: str
    start: int
    stop: int
    rows: Tensor
    bias_shift: Tensor | None  # added to the bias over the same rows


@dataclass
class FittedProjection:
    """A replaced projection: its storage layout and its shared roles' rows."""

    layout: str
    parts: list[FittedRows] = field(default_factory=list)

    @property
    def storage(self) -> Layout:
        return LAYOUTS[self.layout]


def fitted_projections(conversion: Conversion) -> dict[str, FittedProjection]:
    """Every replaced projection whose original is kept, by target."""
    out: dict[str, FittedProjection] = {}
    for group in conversion.analysis.groups:
        for layer, site in enumerate(group.sites):
            for projection in site.projections:
                if projection.target not in conversion.rewrite.originals:
                    continue
                for role, (start, stop) in projection.roles.items():
                    fit = conversion.fits.get((group.index, role))
                    if fit is None:
                        continue
                    shift = None if fit.bias_shift is None else fit.bias_shift[layer]
                    rows = fit.reconstruct(layer)
                    fitted = out.setdefault(
                        projection.target, FittedProjection(projection.layout)
                    )
                    fitted.parts.append(
                        FittedRows(
                            group.index,
                            layer,
                            site.block,
                            role,
                            start,
                            stop,
                            rows,
                            shift,
                        )
                    )
    return out


def reference_modules(
    conversion: Conversion, fitted: Mapping[str, FittedProjection]
) -> dict[str, nn.Module]:
    """Each original projection with its fitted rows (and bias shifts) written in."""
    out = {}
    for target, projection in fitted.items():
        reference = copy.deepcopy(conversion.rewrite.originals[target])
        weight = projection.storage.weight(reference)
        bias = projection.storage.bias(reference)
        with torch.no_grad():
            for part in projection.parts:
                weight[part.start : part.stop].copy_(part.rows)
                if part.bias_shift is not None:
                    bias[part.start : part.stop] += part.bias_shift.to(bias)
        out[target] = reference
    return out


def check_weights(
    replacements: Mapping[str, nn.Module],
    references: Mapping[str, nn.Module],
    fitted: Mapping[str, FittedProjection],
    tolerance: Tolerance,
    checks: Checks,
) -> None:
    """Weight rows per role and the bias of each replacement against its reference."""
    for target, projection in fitted.items():
        # Rows of the (out, in) matrix, whatever layout the module stores
        storage = projection.storage
        actual = storage.weight(replacements[target])
        expected = storage.weight(references[target])
        for part in projection.parts:
            rows = slice(part.start, part.stop)
            _record(
                checks,
                (target, part.role, "weight"),
                actual[rows],
                expected[rows],
                tolerance,
            )
        bias = storage.bias(replacements[target])
        ref_bias = storage.bias(references[target])
        if (bias is None) != (ref_bias is None):
            checks[target, "bias", "bias"] = LayerCheck(
                target, "bias", "bias", float("inf"), False
            )
        elif bias is not None:
            _record(checks, (target, "bias", "bias"), bias, ref_bias, tolerance)


@contextlib.contextmanager
def output_checks(
    replacements: Mapping[str, nn.Module],
    references: Mapping[str, nn.Module],
    fitted: Mapping[str, FittedProjection],
    tolerance: Tolerance,
    checks: Checks,
) -> Iterator[None]:
    """Compare each projection's output with its reference on the same input."""

    def make_hook(target: str):
        projection = fitted[target]
        # The output's feature dimension: last for Linear, 1 for a 1x1 conv
        dim = projection.storage.out_dim

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            expected = references[target](*args)
            for part in projection.parts:
                rows = part.stop - part.start
                _record(
                    checks,
                    (target, part.role, "output"),
                    output.narrow(dim, part.start, rows),
                    expected.narrow(dim, part.start, rows),
                    tolerance,
                )

        return hook

    # Only modules the model calls on the projection's input can be hooked
    handles = [
        replacements[target].register_forward_hook(make_hook(target))
        for target, projection in fitted.items()
        if projection.storage.called
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_errors(
    conversion: Conversion, fitted: Mapping[str, FittedProjection]
) -> list[LayerError]:
    """``||W - W^|| / ||W||`` of every block and shared role, against the
    original rows (a calibrated fit's own ``layer_errors`` are in its data
    metric), in group, role and block order."""
    errors = {}
    for target, projection in fitted.items():
        original = conversion.rewrite.originals[target]
        for part in projection.parts:
            weight = read_rows(original, projection.layout, part.start, part.stop)
            error = relative_error(weight, part.rows).item()
            key = (part.group, part.role, part.layer)
            errors[key] = LayerError(part.group, part.block, part.role, error)
    return [errors[key] for key in sorted(errors, key=_role_order(conversion))]


def _role_order(conversion: Conversion):
    # The groups' own role order, as the report has always listed them
    order = {g.index: list(g.roles) for g in conversion.analysis.groups}
    return lambda key: (key[0], order[key[0]].index(key[1]), key[2])


def _record(
    checks: Checks,
    key: tuple[str, str, str],
    actual: Tensor,
    expected: Tensor,
    tolerance: Tolerance,
) -> None:
    # Keep the worst figure when a projection runs several times
    max_abs = (actual.double() - expected.double()).abs().max().item()
    passed = tolerance.excess(actual, expected) <= 0.0
    old = checks.get(key)
    if old is not None:
        max_abs, passed = max(max_abs, old.max_abs), passed and old.passed
    checks[key] = LayerCheck(*key, max_abs, passed)
