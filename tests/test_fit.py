import pytest
import torch

from masasurgery import ConfigError, FitError, matrix_pca


def _stack(num_layers=8, shape=(12, 10), dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(num_layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_atoms_equal_to_layers_reproduce_every_weight_exactly(dtype):
    weights = _stack(dtype=dtype)
    fit = matrix_pca(weights, atoms=8)
    assert fit.atoms.dtype == dtype
    for layer, w in enumerate(weights):
        assert torch.equal(fit.reconstruct(layer), w)
    assert fit.energy_kept == pytest.approx(1.0)
    assert fit.layer_errors.max().item() < 1e-6


def test_atoms_are_orthonormal():
    fit = matrix_pca(_stack(), atoms=5)
    flat = fit.atoms.reshape(5, -1).double()
    torch.testing.assert_close(
        flat @ flat.T, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("atoms", [1, 3, 6])
def test_fit_is_the_best_rank_s_approximation(atoms):
    weights = _stack(num_layers=7, shape=(6, 5))
    fit = matrix_pca(weights, atoms=atoms)
    stack = torch.stack([w.reshape(-1) for w in weights]).double()

    # Error of the fit, computed directly
    error = sum(
        (fit.reconstruct(i).double() - w.double()).square().sum().item()
        for i, w in enumerate(weights)
    )

    # Brute force: Eckart-Young's optimum from a full SVD of the stack ...
    singular = torch.linalg.svdvals(stack)
    optimum = singular[atoms:].square().sum().item()
    assert error == pytest.approx(optimum, rel=1e-5, abs=1e-6)

    # ... and no random orthonormal basis of the same size does better
    for _ in range(20):
        basis, _ = torch.linalg.qr(
            torch.randn(stack.shape[1], atoms, dtype=torch.float64)
        )
        residual = stack - stack @ basis @ basis.T
        assert residual.square().sum().item() >= optimum * (1 - 1e-9)


def test_layer_errors_and_energy_match_a_direct_computation():
    weights = _stack(num_layers=6)
    fit = matrix_pca(weights, atoms=2)
    for i, w in enumerate(weights):
        direct = (fit.reconstruct(i).double() - w.double()).norm() / w.double().norm()
        assert fit.layer_errors[i].item() == pytest.approx(direct.item(), rel=1e-5)
    kept = sum(fit.reconstruct(i).double().square().sum() for i in range(6))
    total = sum(w.double().square().sum() for w in weights)
    assert fit.energy_kept == pytest.approx((kept / total).item(), rel=1e-5)


def test_atoms_above_layers_are_capped_and_lossless():
    weights = _stack(num_layers=3)
    fit = matrix_pca(weights, atoms=10)
    assert fit.num_atoms == 3 and fit.requested_atoms == 10 and fit.capped
    torch.testing.assert_close(fit.reconstruct(1), weights[1], atol=1e-5, rtol=1e-5)


def test_rank_deficient_stack_stays_finite_and_exact():
    base = _stack(num_layers=2)
    weights = [base[0], base[1], base[0] * 2.0, base[0] + base[1]]  # rank 2
    fit = matrix_pca(weights, atoms=4)
    assert torch.isfinite(fit.atoms).all() and torch.isfinite(fit.coefficients).all()
    for i, w in enumerate(weights):
        torch.testing.assert_close(fit.reconstruct(i), w, atol=1e-5, rtol=1e-5)


def test_views_of_a_fused_weight_are_only_read():
    qkv = torch.randn(3 * 8, 8)
    before = qkv.clone()
    fit = matrix_pca([qkv[0:8], qkv[8:16], qkv[16:24]], atoms=3)
    assert torch.equal(qkv, before)
    torch.testing.assert_close(fit.reconstruct(2), qkv[16:24], atol=1e-5, rtol=1e-5)


def test_fits_are_reproducible_and_keep_dtype():
    weights = _stack(dtype=torch.float64)
    a, b = matrix_pca(weights, atoms=3), matrix_pca(weights, atoms=3)
    assert torch.equal(a.atoms, b.atoms) and a.atoms.dtype == torch.float64
    # signs fixed: the largest coefficient of each atom is positive
    index = a.coefficients.abs().argmax(dim=0)
    assert (a.coefficients.gather(0, index[None]) > 0).all()


def test_bad_stacks_and_atoms_are_clear_errors():
    with pytest.raises(FitError, match="empty"):
        matrix_pca([], atoms=1)
    with pytest.raises(FitError, match=r"weight 0 is \(4, 4\), weight 1 is \(4, 5\)"):
        matrix_pca([torch.randn(4, 4), torch.randn(4, 5)], atoms=1)
    with pytest.raises(FitError, match="floating point"):
        matrix_pca([torch.ones(2, 2, dtype=torch.int64)] * 2, atoms=1)
    with pytest.raises(ConfigError, match="at least 1"):
        matrix_pca(_stack(), atoms=0)
    with pytest.raises(ConfigError, match="positive integer"):
        matrix_pca(_stack(), atoms=1.5)
