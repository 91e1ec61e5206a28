"""Plots of the spectrum and of the per-layer error, and the numbers behind them."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import image_batch, tiny_vit

import masasurgery
from masasurgery.plot import (
    PlotDependencyError,
    energy_curves,
    plot_conversion,
    plot_layer_errors,
    plot_spectrum,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > len(PNG) and data.startswith(PNG)


@pytest.fixture
def model():
    return tiny_vit(depth=4)


@pytest.fixture
def conversion(model):
    return masasurgery.convert(
        model, atoms=2, example_inputs=image_batch(), verify=False
    )


def test_spectrum_of_a_model_is_cumulative_and_marks_the_atoms(tmp_path):
    model = tiny_vit(depth=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    drawn = plot_spectrum(model, tmp_path / "spectrum.png", atoms=9)

    assert drawn.path == tmp_path / "spectrum.png" and _is_png(drawn.path)
    assert [c.role for c in drawn.curves] == ["q", "k", "v", "o"]
    for curve in drawn.curves:
        assert curve.blocks == 4 and curve.atoms == 4  # capped at the group's size
        assert curve.cumulative[-1] == 1.0
        assert curve.cumulative == sorted(curve.cumulative)
        assert 0.0 < curve.cumulative[0] < 1.0
    # Nothing in the model changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_spectrum_of_a_conversion_matches_its_fits(conversion):
    curves = plot_spectrum(conversion).curves

    assert {(c.group, c.role) for c in curves} == set(conversion.fits)
    for curve in curves:
        fit = conversion.fits[curve.group, curve.role]
        assert curve.atoms == fit.num_atoms == 2
        assert curve.cumulative[curve.atoms - 1] == pytest.approx(fit.energy_kept)
        expected = (fit.eigenvalues.cumsum(0) / fit.eigenvalues.sum()).tolist()
        assert curve.cumulative == pytest.approx(expected)


def test_spectrum_of_a_model_equals_the_spectrum_after_converting():
    model = tiny_vit(depth=4)
    x = image_batch()
    before = energy_curves(model, x, roles=("q", "o"))
    conversion = masasurgery.convert(model, atoms=1, example_inputs=x, verify=False)
    after = energy_curves(conversion)

    by_role = {c.role: c.cumulative for c in after}
    assert [c.role for c in before] == ["q", "o"]
    for curve in before:
        assert curve.cumulative == pytest.approx(by_role[curve.role], abs=1e-9)
        assert curve.atoms is None


def test_atoms_for_a_share():
    curve = energy_curves(tiny_vit(depth=4), roles=("q",))[0]
    curve.cumulative = [0.5, 0.85, 0.95, 1.0]

    assert [curve.atoms_for(s) for s in (0.4, 0.9, 0.95, 1.0)] == [1, 3, 3, 4]


def test_layer_errors_of_a_conversion_and_of_its_report_agree(
    model, conversion, tmp_path
):
    model_errors = plot_layer_errors(conversion, tmp_path / "errors.png")
    report = masasurgery.verify(model, conversion, image_batch(), device="cpu")
    report_errors = plot_layer_errors(report)

    assert _is_png(tmp_path / "errors.png") and report_errors.path is None
    assert [(s.role, s.blocks) for s in model_errors.series] == [
        (s.role, s.blocks) for s in report_errors.series
    ]
    for a, b, fit in zip(
        model_errors.series, report_errors.series, conversion.roles, strict=True
    ):
        assert a.errors == pytest.approx(b.errors)
        assert a.errors == pytest.approx(fit.layer_errors)
        assert len(a.errors) == 4 and all(0.0 <= e <= 1.0 for e in a.errors)


def test_conversion_plot_has_both_panels(conversion, tmp_path):
    drawn = plot_conversion(conversion, tmp_path / "sub" / "conversion.png")

    assert _is_png(drawn.path)
    assert len(drawn.figure.axes) == 2
    assert drawn.spectrum.path is None and drawn.errors.path is None
    assert len(drawn.spectrum.curves) == len(drawn.errors.series) == 4


def test_draws_into_a_given_axes(conversion):
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    drawn = plot_spectrum(conversion, ax=ax)

    assert drawn.figure is figure and drawn.path is None
    assert len(ax.get_lines()) >= 4


def test_missing_matplotlib_names_the_extra(conversion, monkeypatch):
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)

    with pytest.raises(PlotDependencyError, match=r"pip install masasurgery\[plot\]"):
        plot_spectrum(conversion)
    assert issubclass(PlotDependencyError, ImportError)
