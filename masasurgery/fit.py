"""Matrix PCA: the closed-form dictionary of a stack of layer weights.

Given the weights ``W_1 .. W_L`` of one role (all of shape ``(out, in)``), Matrix PCA
finds the ``S`` orthonormal matrices ``D_s`` (atoms) and the coefficients ``c[l, s]``
that minimise ``sum_l ||W_l - sum_s c[l, s] D_s||_F^2``: the best rank-``S`` fit of
the ``L x (out * in)`` stack in the Frobenius norm.

The implementation never forms the stack. It works with the ``L x L`` Gram matrix
``G = A A^T`` of the flattened weights, in float64:

1. ``G`` is accumulated over column chunks of the weights (one read of them):
   each chunk's product in float32 (float64 for float64 weights), the sum of the
   chunks in float64.
2. ``G = U diag(lam) U^T``; the top ``S`` eigenpairs give the coefficients
   ``c = U_S diag(lam_S)^(1/2)``.
3. The atoms are ``D = diag(lam_S)^(-1/2) U_S^T A`` (a second read, by chunks).

Cost: two passes over the weights, ``O(L^2 * out * in)`` multiply-adds for ``G`` and
``O(L * S * out * in)`` for the atoms; memory ``O(L^2)`` plus one chunk.

With ``S = L`` every basis of the span is optimal, and the fit takes the weights
themselves as atoms and the identity as coefficients: exact, bit for bit, in any
dtype (a rotated orthonormal basis would be exact only up to the rounding of the
dtype, 0.4% in bfloat16). The energy figures are the same either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from masasurgery.config import MasaConfig
from masasurgery.errors import FitError

__all__ = ["MatrixPCA", "matrix_pca", "relative_error", "stack_residuals"]

# Directions whose energy is below this share of the largest carry only rounding
# noise; their atoms and coefficients are set to zero rather than amplified.
_RANK_TOL = 1e-13

# Elements per layer in one streamed chunk (1 MiB of float32 per layer): small
# enough to bound float32 rounding in each chunk, large enough for fast matmuls.
_CHUNK = 1 << 18


@dataclass
class MatrixPCA:
    """The dictionary of one role over the ``L`` blocks of a group.

    Attributes:
        atoms: Shared matrices, shape ``(S, out, in)``, in the weights' dtype.
        coefficients: Mixing weights, shape ``(L, S)``, in the weights' dtype.
        eigenvalues: Energy of every direction of the stack, shape ``(L,)``,
            float64, largest first; their sum is ``sum_l ||W_l||^2``.
        layer_errors: Relative Frobenius error ``||W_l - W^_l|| / ||W_l||`` of each
            layer, shape ``(L,)``, float64, computed exactly from the Gram matrix.
        requested_atoms: The ``atoms`` asked for; more than ``L`` is capped to ``L``.
        residual_up: Optional per-layer low-rank residual, left factors, shape
            ``(L, out, r)``; ``reconstruct`` adds ``residual_up[l] @
            residual_down[l]``. Calibrated fits set it (``masasurgery.fit_data``).
        residual_down: Right factors, shape ``(L, r, in)``.
        residual_ranks: Each layer's own residual rank when they differ (a
            budget gives sensitive layers more); layer ``l`` uses the first
            ``residual_ranks[l]`` columns of ``residual_up[l]`` and rows of
            ``residual_down[l]``, the rest are zero padding. None: every layer
            uses all ``r``.
        bias_shift: Added to each layer's bias over the role's rows when the
            fit is written into the model, shape ``(L, out)``, float64: ``(W_l -
            W^_l) mean_l``, the share of the error that the mean input carries
            in a fit about the mean (``center=True`` in
            :func:`masasurgery.compress`). None: biases stay as they are.
    """

    atoms: Tensor
    coefficients: Tensor
    eigenvalues: Tensor
    layer_errors: Tensor
    requested_atoms: int
    residual_up: Tensor | None = None
    residual_down: Tensor | None = None
    residual_ranks: tuple[int, ...] | None = None
    bias_shift: Tensor | None = None

    @property
    def residual_rank(self) -> int:
        """Largest rank of a layer's residual (0 without one)."""
        return 0 if self.residual_down is None else self.residual_down.shape[1]

    def layer_rank(self, layer: int) -> int:
        """Rank of one layer's residual (0 without one)."""
        if self.residual_ranks is not None:
            return self.residual_ranks[layer]
        return self.residual_rank

    def residual(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """``(up, down)`` of one layer's residual, without padding, or None."""
        rank = self.layer_rank(layer)
        if not rank:
            return None
        return self.residual_up[layer, :, :rank], self.residual_down[layer, :rank]

    @property
    def num_parameters(self) -> int:
        """Atoms, coefficients and residual factors: what the fit costs."""
        count = self.atoms.numel() + self.coefficients.numel()
        if self.residual_down is not None:
            out_features, in_features = self.atoms.shape[1:]
            ranks = sum(self.layer_rank(i) for i in range(self.num_layers))
            count += ranks * (out_features + in_features)
        return count

    @property
    def num_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def num_layers(self) -> int:
        return self.coefficients.shape[0]

    @property
    def capped(self) -> bool:
        """True when fewer atoms were fitted than asked for (``atoms > L``)."""
        return self.requested_atoms > self.num_atoms

    @property
    def energy_kept(self) -> float:
        """Share of ``sum_l ||W_l||^2`` that the atoms reproduce."""
        total = self.eigenvalues.sum().item()
        if total == 0.0:
            return 1.0
        return self.eigenvalues[: self.num_atoms].sum().item() / total

    def reconstruct(self, layer: int) -> Tensor:
        """The fitted weight of one layer, ``sum_s c[layer, s] * atoms[s]``.

        Plus ``residual_up[layer] @ residual_down[layer]`` when the fit has one.
        """
        weight = torch.tensordot(self.coefficients[layer], self.atoms, dims=1)
        residual = self.residual(layer)
        if residual is not None:
            up, down = residual
            weight = torch.addmm(weight, up.to(weight.dtype), down.to(weight.dtype))
        return weight


def relative_error(weight: Tensor, approximation: Tensor) -> Tensor:
    """``||W - W^|| / ||W||`` in float64, a 0-d tensor on ``weight``'s device.

    Example:
        >>> relative_error(torch.ones(2, 2), torch.zeros(2, 2)).item()
        1.0
    """
    weight = weight.detach().double()
    error = weight - approximation.detach().double().to(weight.device)
    return error.norm() / weight.norm().clamp_min(1e-300)


def stack_residuals(
    ups: Sequence[Tensor | None], downs: Sequence[Tensor | None]
) -> tuple[Tensor | None, Tensor | None, tuple[int, ...] | None]:
    """Per-layer residual factors as :class:`MatrixPCA` holds them.

    Args:
        ups: Each layer's ``(out, r_l)`` left factor, or None for rank 0.
        downs: Each layer's ``(r_l, in)`` right factor, or None.

    Returns:
        ``residual_up`` ``(L, out, r)`` and ``residual_down`` ``(L, r, in)``,
        zero-padded to the largest rank ``r`` (None, None without any), and
        ``residual_ranks`` (None when every layer has rank ``r``).

    Example:
        >>> up, down, ranks = stack_residuals(
        ...     [torch.ones(3, 2), None], [torch.ones(2, 4), None])
        >>> tuple(up.shape), tuple(down.shape), ranks
        ((2, 3, 2), (2, 2, 4), (2, 0))
    """
    ranks = tuple(0 if d is None else d.shape[0] for d in downs)
    if not max(ranks, default=0):
        return None, None, None
    shown = next(i for i, r in enumerate(ranks) if r)
    up = ups[shown].new_zeros(len(ranks), ups[shown].shape[0], max(ranks))
    down = downs[shown].new_zeros(len(ranks), max(ranks), downs[shown].shape[1])
    for layer, rank in enumerate(ranks):
        if rank:
            up[layer, :, :rank] = ups[layer]
            down[layer, :rank] = downs[layer]
    return up, down, ranks if len(set(ranks)) > 1 else None


def matrix_pca(weights: Sequence[Tensor], atoms: int) -> MatrixPCA:
    """Fit ``atoms`` shared matrices to a stack of same-shaped weights.

    Args:
        weights: The ``L`` layer weights of one role, each ``(out, in)``. Views are
            fine (e.g. the q rows of a fused qkv weight); they are only read.
        atoms: How many atoms to fit. More than ``L`` is capped to ``L``.

    Returns:
        The atoms, coefficients and the energy figures of the fit.

    Raises:
        masasurgery.ConfigError: ``atoms`` is not a positive integer.
        FitError: ``weights`` is empty or the shapes differ.

    Example:
        >>> ws = [torch.randn(8, 4) for _ in range(6)]
        >>> fit = matrix_pca(ws, atoms=6)
        >>> torch.allclose(fit.reconstruct(2), ws[2], atol=1e-5)
        True
        >>> matrix_pca(ws, atoms=2).atoms.shape
        torch.Size([2, 8, 4])
    """
    # Check the inputs
    shape, dtype = _check_stack(weights)
    requested = _check_atoms(atoms)
    num_atoms = min(requested, len(weights))
    flats = [w.detach().reshape(-1) for w in weights]

    # Top eigenpairs of the Gram matrix, largest first
    gram = _gram(flats)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
    eigenvectors = eigenvectors.flip(1)
    vectors = _fix_signs(eigenvectors[:, :num_atoms])
    top = eigenvalues[:num_atoms]

    # Coefficients c = U sqrt(lam); atoms D = diag(1/sqrt(lam)) U^T A. With as
    # many atoms as layers any basis of the span is optimal: the weights
    # themselves are exact in every dtype (no rounding of a rotated basis).
    if num_atoms == len(weights):
        coefficients = torch.eye(num_atoms, dtype=torch.float64)
        atoms_flat = torch.stack(flats).to(dtype=dtype, copy=True)
    else:
        kept = top > _RANK_TOL * eigenvalues[0].clamp_min(torch.finfo(gram.dtype).tiny)
        sqrt_top = top.sqrt()
        coefficients = vectors * torch.where(kept, sqrt_top, 0.0)
        mix = vectors * torch.where(kept, 1.0 / sqrt_top.clamp_min(1e-300), 0.0)
        atoms_flat = _project(flats, mix, dtype)

    # Energy left out of each layer: the dropped directions of the Gram matrix
    dropped = eigenvectors[:, num_atoms:].square() * eigenvalues[num_atoms:]
    norms_sq = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny)
    layer_errors = (dropped.sum(dim=1) / norms_sq).clamp(0.0, 1.0).sqrt()

    return MatrixPCA(
        atoms=atoms_flat.reshape(num_atoms, *shape),
        coefficients=coefficients.to(dtype),
        eigenvalues=eigenvalues,
        layer_errors=layer_errors,
        requested_atoms=requested,
    )


def _check_stack(weights: Sequence[Tensor]) -> tuple[torch.Size, torch.dtype]:
    if len(weights) == 0:
        raise FitError("matrix_pca needs at least one weight, got an empty list.")
    shape, dtype = weights[0].shape, weights[0].dtype
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape != shape:
            raise FitError(
                f"all weights must be 2-D with one shape; weight 0 is "
                f"{tuple(shape)}, weight {i} is {tuple(w.shape)}."
            )
    if not dtype.is_floating_point:
        raise FitError(f"weights must be floating point, got {dtype}.")
    return shape, dtype


def _check_atoms(atoms: int) -> int:
    # Reuse the one place that validates the option
    return MasaConfig(atoms=atoms).atoms


def _gram(flats: list[Tensor]) -> Tensor:
    """``G[i, j] = <W_i, W_j>``, accumulated in float64 over column chunks."""
    num_layers, numel = len(flats), flats[0].numel()
    compute = _compute_dtype(flats[0].dtype)
    gram = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    gram = gram.to(flats[0].device)
    for start in range(0, numel, _CHUNK):
        block = torch.stack([f[start : start + _CHUNK] for f in flats]).to(compute)
        gram += (block @ block.T).double()
    return gram


def _project(flats: list[Tensor], mix: Tensor, dtype: torch.dtype) -> Tensor:
    """``mix^T A`` over column chunks: the atoms, flattened, ``(S, out * in)``."""
    numel = flats[0].numel()
    compute = _compute_dtype(flats[0].dtype)
    mix_t = mix.T.to(compute)
    out = torch.empty(mix.shape[1], numel, dtype=dtype, device=flats[0].device)
    for start in range(0, numel, _CHUNK):
        block = torch.stack([f[start : start + _CHUNK] for f in flats]).to(compute)
        out[:, start : start + _CHUNK] = (mix_t @ block).to(dtype)
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 weights stay float64; everything else is read in float32 chunks
    # (the chunk sums are small, and the Gram matrix adds them up in float64)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fix_signs(vectors: Tensor) -> Tensor:
    """Make each column's largest entry positive, so fits are reproducible."""
    index = vectors.abs().argmax(dim=0, keepdim=True)
    signs = vectors.gather(0, index).sign()
    return vectors * torch.where(signs == 0, 1.0, signs)
