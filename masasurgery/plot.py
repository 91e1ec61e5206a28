"""Plots of what a dictionary keeps: the spectrum, and the error per layer.

* :func:`plot_spectrum`: the share of energy kept by each role's dictionary as
  atoms grow, one line per group and role, with the chosen atoms marked. This is
  how to pick ``atoms``: the knee of the curve, or the first count above 90%.
* :func:`plot_layer_errors`: the relative weight error of every block and role
  after a conversion.
* :func:`plot_conversion`: both, side by side, in one figure.

The energy curves come from the eigenvalues of the stacked weights of each role
(:attr:`masasurgery.MatrixPCA.eigenvalues`): ``S`` atoms keep the share
``sum(lam[:S]) / sum(lam)``. :func:`energy_curves` computes them without
matplotlib, for a conversion or for a model not converted yet.

matplotlib (``pip install masasurgery[plot]``) is imported only when drawing,
and drawing uses its Agg canvas: no window, no global pyplot state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masasurgery.analyze import analyze
from masasurgery.config import ROLES
from masasurgery.convert import Conversion, role_weights
from masasurgery.errors import MasaError
from masasurgery.fit import matrix_pca
from masasurgery.inputs import resolve_inputs
from masasurgery.verify_report import VerificationReport

__all__ = [
    "ConversionPlot",
    "EnergyCurve",
    "LayerErrorSeries",
    "LayerErrorsPlot",
    "PlotDependencyError",
    "SpectrumPlot",
    "energy_curves",
    "plot_conversion",
    "plot_layer_errors",
    "plot_spectrum",
]


class PlotDependencyError(MasaError, ImportError):
    """matplotlib, which the plots need, is not installed."""


@dataclass
class EnergyCurve:
    """The energy one role's dictionary keeps as atoms grow.

    Attributes:
        group: Index of the group.
        role: ``"q"``, ``"k"``, ``"v"`` or ``"o"``.
        blocks: Blocks in the group (``L``), the most atoms that make sense.
        shape: ``(rows, in_features)`` of each block's weight.
        cumulative: Share kept with ``1 .. L`` atoms; the last is 1.0.
        atoms: The atoms chosen (marked on the plot), or None.
    """

    group: int
    role: str
    blocks: int
    shape: tuple[int, int]
    cumulative: list[float]
    atoms: int | None = None

    def kept(self, atoms: int) -> float:
        """The share of energy ``atoms`` atoms keep (0 with none)."""
        return 0.0 if atoms < 1 else self.cumulative[min(atoms, self.blocks) - 1]

    def atoms_for(self, share: float) -> int:
        """The fewest atoms that keep at least ``share`` of the energy."""
        return next(
            (i + 1 for i, kept in enumerate(self.cumulative) if kept >= share),
            self.blocks,
        )


@dataclass
class SpectrumPlot:
    """A drawn spectrum: the file, the numbers plotted and the figure."""

    path: Path | None
    curves: list[EnergyCurve]
    figure: Any = field(repr=False)


@dataclass
class LayerErrorSeries:
    """The relative weight error of each block of a group, for one role."""

    group: int
    role: str
    blocks: list[str]
    errors: list[float]


@dataclass
class LayerErrorsPlot:
    """A drawn per-layer error plot: the file, the numbers and the figure."""

    path: Path | None
    series: list[LayerErrorSeries]
    figure: Any = field(repr=False)


@dataclass
class ConversionPlot:
    """Both panels of :func:`plot_conversion`, in one figure."""

    path: Path | None
    spectrum: SpectrumPlot
    errors: LayerErrorsPlot
    figure: Any = field(repr=False)


def energy_curves(
    source: Conversion | nn.Module,
    example_inputs: Any | None = None,
    *,
    roles: Sequence[str] = ROLES,
    atoms: int | None = None,
) -> list[EnergyCurve]:
    """The energy each role's dictionary keeps as atoms grow; no matplotlib.

    Args:
        source: A conversion (its fits), or a model not converted yet: it is
            analysed and each role's stacked weights are fitted (nothing in the
            model changes).
        example_inputs: For a model: inputs for one forward (optional for timm).
        roles: For a model: the roles to include.
        atoms: For a model: an atoms count to mark (capped at each group's size).

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=32)
        >>> curves = energy_curves(m, roles=("q",))
        >>> [(c.role, len(c.cumulative), round(c.cumulative[-1], 6)) for c in curves]
        [('q', 4, 1.0)]
    """
    if isinstance(source, Conversion):
        return [
            EnergyCurve(
                g,
                role,
                fit.num_layers,
                source.analysis.groups[g].role_shape(role),
                _cumulative(fit.eigenvalues),
                fit.num_atoms,
            )  # fmt: skip
            for (g, role), fit in source.fits.items()
        ]

    # A model: analyse it, and read each role's weights as convert would
    analysis = analyze(source, resolve_inputs(source, example_inputs))
    curves = []
    for group in analysis.groups:
        for role in [r for r in group.roles if r in roles]:
            weights = role_weights(source, group, role)
            with torch.no_grad():
                eigenvalues = matrix_pca(weights, 1).eigenvalues  # all L of them
            chosen = None if atoms is None else min(atoms, len(weights))
            curves.append(
                EnergyCurve(
                    group.index,
                    role,
                    len(weights),
                    group.role_shape(role),
                    _cumulative(eigenvalues),
                    chosen,
                )  # fmt: skip
            )
    return curves


def plot_spectrum(
    source: Conversion | nn.Module | Sequence[EnergyCurve],
    path: str | os.PathLike | None = None,
    *,
    example_inputs: Any | None = None,
    roles: Sequence[str] = ROLES,
    atoms: int | None = None,
    ax: Any | None = None,
) -> SpectrumPlot:
    """Plot the energy kept per role as atoms grow, the chosen atoms marked.

    Args:
        source: A conversion, a model not converted yet (see
            :func:`energy_curves`), or curves already computed.
        path: Write the figure there (PNG, SVG, PDF: by the suffix).
        example_inputs: For a model: inputs for one forward.
        roles: For a model: the roles to include.
        atoms: For a model: an atoms count to mark.
        ax: Draw into this matplotlib axes instead of a new figure.

    Returns:
        The file written, the curves plotted and the figure.

    Raises:
        PlotDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile, timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=32)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     drawn = plot_spectrum(m, f"{folder}/spectrum.png", atoms=2)
        ...     drawn.path.stat().st_size > 0
        True
        >>> sorted({c.role for c in drawn.curves}), drawn.curves[0].atoms
        (['k', 'o', 'q', 'v'], 2)
    """
    curves = _curves_of(source, example_inputs, roles, atoms)
    figure, ax = _axes(ax)
    for curve in curves:
        xs = range(1, curve.blocks + 1)
        ys = [100.0 * kept for kept in curve.cumulative]
        (line,) = ax.plot(xs, ys, marker=".", label=_label(curve, curves))
        if curve.atoms is not None:
            kept = 100.0 * curve.kept(curve.atoms)
            ax.plot(
                [curve.atoms], [kept], "o", ms=9, mfc="none", color=line.get_color()
            )
    ax.axhline(90.0, color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="atoms per dictionary", ylabel="energy kept (%)")
    ax.set_title("Energy kept as atoms grow (circles: chosen atoms)")
    ax.set_ylim(0.0, 101.0)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.legend(fontsize="small", ncols=2 if len(curves) > 8 else 1)
    return SpectrumPlot(_save(figure, path), curves, figure)


def plot_layer_errors(
    source: Conversion | VerificationReport,
    path: str | os.PathLike | None = None,
    *,
    ax: Any | None = None,
) -> LayerErrorsPlot:
    """Plot the relative weight error of every block, one line per role.

    Args:
        source: A conversion, or a verification report.
        path: Write the figure there.
        ax: Draw into this matplotlib axes instead of a new figure.

    Returns:
        The file written, the errors plotted and the figure.

    Raises:
        PlotDependencyError: matplotlib is not installed.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=32)
        >>> conversion = masasurgery.convert(m, atoms=2, verify=False)
        >>> drawn = plot_layer_errors(conversion)
        >>> [(s.role, len(s.errors)) for s in drawn.series][:2]
        [('q', 4), ('k', 4)]
    """
    series = _error_series(source)
    figure, ax = _axes(ax)
    blocks = list(dict.fromkeys(b for s in series for b in s.blocks))
    for s in series:
        xs = [blocks.index(b) for b in s.blocks]
        label = (
            s.role if len({x.group for x in series}) == 1 else f"g{s.group} {s.role}"
        )
        ax.plot(xs, s.errors, marker="o", ms=4, label=label)
    ax.set(xlabel="block", ylabel="relative weight error")
    ax.set_title("Relative weight error per layer")
    if len(blocks) <= 24:
        ax.set_xticks(range(len(blocks)), [_short(b) for b in blocks], rotation=60)
    ax.set_ylim(bottom=0.0)
    ax.legend(fontsize="small")
    return LayerErrorsPlot(_save(figure, path), series, figure)


def plot_conversion(
    conversion: Conversion, path: str | os.PathLike | None = None
) -> ConversionPlot:
    """The spectrum and the per-layer error of a conversion, side by side.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=32)
        >>> drawn = plot_conversion(masasurgery.convert(m, atoms=2, verify=False))
        >>> len(drawn.figure.axes), drawn.spectrum.curves[0].atoms
        (2, 2)
    """
    figure = _figure(figsize=(12.0, 4.6))
    left, right = figure.subplots(1, 2)
    spectrum = plot_spectrum(conversion, ax=left)
    errors = plot_layer_errors(conversion, ax=right)
    return ConversionPlot(_save(figure, path), spectrum, errors, figure)


# ---------------------------------------------------------------------------
# Numbers


def _cumulative(eigenvalues: torch.Tensor) -> list[float]:
    energy = eigenvalues.double().clamp_min(0.0)
    total = energy.sum()
    if total.item() == 0.0:
        return [1.0] * len(energy)
    kept = (energy.cumsum(0) / total).clamp(max=1.0).cummax(0).values.tolist()
    kept[-1] = 1.0  # every direction kept: all the energy, whatever the rounding
    return kept


def _curves_of(
    source: Any, example_inputs: Any, roles: Sequence[str], atoms: int | None
) -> list[EnergyCurve]:
    if isinstance(source, (Conversion, nn.Module)):
        return energy_curves(source, example_inputs, roles=roles, atoms=atoms)
    return list(source)


def _error_series(source: Conversion | VerificationReport) -> list[LayerErrorSeries]:
    if isinstance(source, Conversion):
        return [
            LayerErrorSeries(
                r.group, r.role, source.analysis.groups[r.group].blocks, r.layer_errors
            )
            for r in source.roles
        ]
    series: dict[tuple[int, str], LayerErrorSeries] = {}
    for e in source.layer_errors:
        s = series.setdefault(
            (e.group, e.role), LayerErrorSeries(e.group, e.role, [], [])
        )
        s.blocks.append(e.block)
        s.errors.append(e.relative_error)
    return list(series.values())


# ---------------------------------------------------------------------------
# Drawing


def _figure(**options: Any) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotDependencyError(
            "masasurgery's plots need matplotlib, which is not installed: "
            "pip install masasurgery[plot]"
        ) from e
    figure = Figure(layout="constrained", **options)
    FigureCanvasAgg(figure)
    return figure


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _axes(ax: Any | None) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    figure = _figure(figsize=(7.0, 4.6))
    return figure, figure.add_subplot()


def _save(figure: Any, path: str | os.PathLike | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _label(curve: EnergyCurve, curves: list[EnergyCurve]) -> str:
    rows, cols = curve.shape
    if len({c.group for c in curves}) == 1:
        return f"{curve.role} ({rows}x{cols}, {curve.blocks} blocks)"
    return f"g{curve.group} {curve.role} ({rows}x{cols}, {curve.blocks} blocks)"


def _short(block: str) -> str:
    # "blocks.3.attn" -> "blocks.3": the tick names the block, not its attention
    return block.removesuffix(".attn").removesuffix(".attention")
