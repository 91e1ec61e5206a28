"""Data-aware fits: the output metric, exact residuals, and tables that agree."""

import pytest
import torch

from masasurgery.errors import FitError
from masasurgery.fit import matrix_pca
from masasurgery.fit_data import error_table, fit_calibrated, whitened_gram
from masasurgery.whiten import whitening


def _problem(layers=6, out=10, inp=8, tokens=400, seed=0):
    """Related weights and anisotropic, layer-specific inputs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, out, inp, generator=g, dtype=torch.float64)
    weights, xs = [], []
    for _ in range(layers):
        mix = torch.randn(3, generator=g, dtype=torch.float64)
        noise = 0.3 * torch.randn(out, inp, generator=g, dtype=torch.float64)
        weights.append(torch.tensordot(mix, base, dims=1) + noise)
        scales = torch.logspace(0, -2, inp, dtype=torch.float64)
        xs.append(torch.randn(tokens, inp, generator=g, dtype=torch.float64) * scales)
    return weights, xs


def _output_error(weights, xs, reconstruct):
    return sum(
        ((w - reconstruct(i)) @ x.T).square().sum() / (w @ x.T).square().sum()
        for i, (w, x) in enumerate(zip(weights, xs, strict=True))
    ).item()


def _output_energy_error(weights, xs, reconstruct):
    return sum(
        ((w - reconstruct(i)) @ x.T).square().sum()
        for i, (w, x) in enumerate(zip(weights, xs, strict=True))
    ).item()


def test_output_metric_beats_weight_metric_at_equal_atoms():
    weights, xs = _problem()
    xtx = [x.T @ x for x in xs]
    plain = matrix_pca(weights, 2)
    aware = fit_calibrated(weights, xtx, atoms=2, weighting="layer")
    assert _output_error(weights, xs, aware.reconstruct) < 0.8 * _output_error(
        weights, xs, plain.reconstruct
    )
    # By energy, the summed absolute output error is what drops
    energy = fit_calibrated(weights, xtx, atoms=2, weighting="energy")
    assert _output_energy_error(weights, xs, energy.reconstruct) < (
        _output_energy_error(weights, xs, plain.reconstruct)
    )
    # layer_errors are the relative output errors
    torch.testing.assert_close(
        aware.layer_errors.square().sum().item(),
        _output_error(weights, xs, aware.reconstruct),
        rtol=1e-6,
        atol=1e-9,
    )


def test_residual_is_the_best_rank_r_correction_in_the_output_metric():
    weights, xs = _problem()
    xtx = [x.T @ x for x in xs]
    atoms_only = fit_calibrated(weights, xtx, atoms=2)
    with_residual = fit_calibrated(weights, xtx, atoms=2, rank=3)
    assert with_residual.residual_rank == 3
    assert with_residual.num_parameters == atoms_only.num_parameters + 6 * 3 * 18

    # Eckart-Young in the whitened space: the error left is the SVD tail
    for i, (w, x) in enumerate(zip(weights, xs, strict=True)):
        left = (w - atoms_only.reconstruct(i)) @ x.T
        tail = torch.linalg.svdvals(left)[3:].square().sum()
        now = ((w - with_residual.reconstruct(i)) @ x.T).square().sum()
        torch.testing.assert_close(now, tail, rtol=1e-4, atol=1e-8)


def test_per_layer_low_rank_alone_is_whitened_svd():
    weights, xs = _problem(layers=3)
    xtx = [x.T @ x for x in xs]
    fit = fit_calibrated(weights, xtx, atoms=0, rank=4)
    assert fit.atoms.shape == (0, 10, 8)
    for i, (w, x) in enumerate(zip(weights, xs, strict=True)):
        tail = torch.linalg.svdvals(w @ x.T)[4:].square().sum()
        now = ((w - fit.reconstruct(i)) @ x.T).square().sum()
        torch.testing.assert_close(now, tail, rtol=1e-4, atol=1e-8)


def test_as_many_atoms_as_layers_is_exact():
    weights, xs = _problem(layers=3)
    fit = fit_calibrated([w.float() for w in weights], [x.T @ x for x in xs], 3)
    for i, w in enumerate(weights):
        assert torch.equal(fit.reconstruct(i), w.float())


def test_weight_metric_keeps_matrix_pca_atoms():
    weights, xs = _problem()
    fit = fit_calibrated(weights, [x.T @ x for x in xs], 2, shared_metric="weight")
    plain = matrix_pca(weights, 2)
    torch.testing.assert_close(fit.atoms, plain.atoms)
    torch.testing.assert_close(fit.coefficients, plain.coefficients)


def test_error_table_agrees_with_the_fits():
    weights, xs = _problem()
    xtx = [x.T @ x for x in xs]
    # Each layer's relative error counts alike, as in the fits' layer_errors
    table = error_table(
        weights, xtx, atoms=[0, 1, 3], ranks=[0, 2, 8], weighting="layer"
    )
    for i, atoms in enumerate(table.atoms):
        for j, rank in enumerate(table.ranks):
            fit = fit_calibrated(weights, xtx, atoms, rank, weighting="layer")
            expected = fit.layer_errors.square().sum().item()
            assert table.errors[i, j].item() == pytest.approx(
                expected, rel=1e-3, abs=1e-6
            )
    assert table.parameters(3, 2) == 3 * 80 + 6 * 3 + 6 * 2 * 18
    assert table.dense_parameters == 6 * 80


def test_whitened_gram_has_unit_diagonal_and_is_psd():
    weights, xs = _problem()
    gram = whitened_gram(weights, [x.T @ x for x in xs])
    torch.testing.assert_close(gram.diagonal(), torch.ones(6, dtype=torch.float64))
    assert torch.linalg.eigvalsh(gram).min() > -1e-9


def test_bad_inputs_fail_clearly():
    weights, xs = _problem(layers=3)
    xtx = [x.T @ x for x in xs]
    with pytest.raises(FitError, match="one X"):
        fit_calibrated(weights, xtx[:2], 1)
    with pytest.raises(FitError, match="atoms must be in 0..3"):
        fit_calibrated(weights, xtx, 4)
    with pytest.raises(FitError, match="rank must be in 0..8"):
        fit_calibrated(weights, xtx, 1, rank=9)
    with pytest.raises(FitError, match="do not match"):
        fit_calibrated(weights, [torch.eye(5)] * 3, 1)
    with pytest.raises(FitError, match="shared_metric"):
        fit_calibrated(weights, xtx, 1, shared_metric="loss")


def test_the_table_prices_every_atom_count_as_its_fit_does():
    # Including a grid that ends at S = L, whose basis must stay in eigen order
    weights, xs = _problem(layers=5)
    stats = [x.T @ x for x in xs]
    table = error_table(weights, stats, atoms=[0, 2, 3, 5], ranks=[0, 2])
    for i, atoms in enumerate(table.atoms):
        for j, rank in enumerate(table.ranks):
            fit = fit_calibrated(weights, stats, atoms, rank)
            measured = fit.layer_errors.square() * _energy_weights(weights, xs)
            assert table.errors[i, j].item() == pytest.approx(
                measured.sum().item(), rel=1e-4, abs=1e-9
            ), (atoms, rank)
            torch.testing.assert_close(
                table.layer_errors[i, :, j], measured, rtol=1e-4, atol=1e-9
            )


def _energy_weights(weights, xs):
    # As "energy" weighting counts them: in each layer's whitened space
    energy = torch.stack(
        [
            whitening(x.T @ x).apply(w).square().sum()
            for w, x in zip(weights, xs, strict=True)
        ]
    )
    return energy / energy.mean()


def test_per_layer_ranks_fit_each_layer_at_its_own_rank():
    weights, xs = _problem(layers=4)
    stats = [x.T @ x for x in xs]
    fit = fit_calibrated(weights, stats, atoms=1, rank=[0, 2, 5, 1])
    assert fit.residual_ranks == (0, 2, 5, 1)
    assert fit.residual_rank == 5
    assert fit.residual(0) is None
    up, down = fit.residual(2)
    assert up.shape == (10, 5) and down.shape == (5, 8)
    out, inp = weights[0].shape
    assert fit.num_parameters == out * inp + 4 + (2 + 5 + 1) * (out + inp)

    # Each layer matches the fit of that one rank for every layer
    for layer, rank in enumerate((0, 2, 5, 1)):
        alone = fit_calibrated(weights, stats, atoms=1, rank=rank)
        torch.testing.assert_close(fit.reconstruct(layer), alone.reconstruct(layer))
    with pytest.raises(FitError, match="one rank per layer"):
        fit_calibrated(weights, stats, atoms=1, rank=[1, 2])
