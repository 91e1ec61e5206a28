"""Data-aware fitting: shared atoms and per-layer residuals that keep the outputs.

Plain Matrix PCA minimises the weight error ``sum_l ||W_l - W^_l||_F^2``. What a
model needs kept is each projection's *output* on real inputs,
``||(W_l - W^_l) X_l||_F^2 = ||(W_l - W^_l) R_l||_F^2`` with ``X_l^T X_l = R_l
R_l^T`` (:mod:`masasurgery.whiten`). :func:`fit_calibrated` works in that space:

1. **Atoms.** Matrix PCA of the stack ``W_l R / ||W_l R||``, whitened by the
   factor ``R`` of the layers' mean statistics and normalised so every layer
   counts alike; the atoms are mapped back by ``R^{-1}``.
2. **Coefficients.** Each layer's ``S`` coefficients are solved exactly against
   its own statistics: the ``S x S`` normal equations of
   ``min_c ||(W_l - sum_s c_s D_s) R_l||``.
3. **Residual.** What the atoms miss, ``E_l = W_l - W^_l``, gets a rank-``r``
   correction of its own, the best in the output metric: the truncated SVD of
   ``E_l R_l``, mapped back by ``R_l^{-1}`` (the SVD-LLM construction, applied
   to the residual).

:func:`error_table` computes the same fit for many ``(atoms, rank)`` pairs at the
cost of one (the atoms are nested, the coefficients share one Gram matrix per
layer, and one SVD per layer and atom count gives every rank), so a budget can
be spent where it removes the most error (:mod:`masasurgery.budget`).

Every function takes, per layer, either ``X^T X`` or a ready
:class:`~masasurgery.whiten.Whitening`: one made by
:func:`~masasurgery.whiten.sensitivity_whitening` whitens the output side too,
so every step above fits the model's readout instead of the projection's output
(:mod:`masasurgery.sensitivity`), and ``weighting="absolute"`` keeps its errors
in the readout's units.

Everything runs in float64; the atoms, coefficients and residual factors are
returned in the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from masasurgery.errors import FitError
from masasurgery.fit import MatrixPCA, matrix_pca, stack_residuals
from masasurgery.whiten import Whitening, whitening

#: Per layer: ``X^T X`` (input side only) or a ready whitening (either side)
Statistic = Tensor | Whitening

WEIGHTINGS = ("energy", "layer", "absolute")

__all__ = [
    "ErrorTable",
    "LayerFit",
    "error_table",
    "fit_calibrated",
    "fit_layer",
    "whitened_gram",
]


@dataclass
class ErrorTable:
    """Output error of one role's fit for every ``(atoms, rank)`` pair tried.

    Attributes:
        atoms: The atom counts tried (0: per-layer low rank alone).
        ranks: The residual ranks tried (0: atoms alone).
        errors: ``errors[i, j]``: relative output error, squared, summed over the
            layers, with ``atoms[i]`` atoms and residual rank ``ranks[j]``.
            ``sum_l ||(W_l - W^_l) R_l||^2 / ||W_l R_l||^2``; float64. With
            ``weighting="absolute"``, the errors themselves (readout units).
        shape: ``(out, in)`` of each layer's weight.
        num_layers: Layers sharing the dictionary (``L``).
        layer_errors: ``layer_errors[i, l, j]``: layer ``l``'s share of
            ``errors[i, j]``, so each layer can take its own rank.
    """

    atoms: list[int]
    ranks: list[int]
    errors: Tensor
    shape: tuple[int, int]
    num_layers: int
    layer_errors: Tensor | None = None

    def parameters(self, atoms: int, rank: int) -> int:
        """What ``atoms`` atoms and a rank-``rank`` residual per layer cost."""
        out_features, in_features = self.shape
        return (
            atoms * out_features * in_features
            + self.num_layers * atoms
            + self.num_layers * rank * (out_features + in_features)
        )

    @property
    def dense_parameters(self) -> int:
        """What the ``L`` dense weights cost."""
        return self.num_layers * self.shape[0] * self.shape[1]


def fit_calibrated(
    weights: Sequence[Tensor],
    statistics: Sequence[Statistic],
    atoms: int,
    rank: int | Sequence[int] = 0,
    *,
    shared_metric: str = "output",
    weighting: str | Tensor = "energy",
) -> MatrixPCA:
    """Fit shared atoms and per-layer residuals in the output metric.

    Args:
        weights: The ``L`` layer weights of one role, each ``(out, in)``.
        statistics: Each layer's input ``X^T X``, ``(in, in)``
            (:func:`masasurgery.calibrate.collect_statistics`), or its
            whitening (:func:`masasurgery.whiten.sensitivity_whitening`).
        atoms: Shared atoms, at most ``L``; 0 keeps only the residuals (per-layer
            low rank).
        rank: Rank of each layer's residual (0 for none), or one per layer.
        shared_metric: ``"output"`` (steps 1-2 above) or ``"weight"``: plain
            Matrix PCA atoms and coefficients (the paper's pipeline), with the
            residual still fitted in the output metric.
        weighting: How layers count in the shared fit: ``"energy"`` (by their
            output energy, so ``sum_l ||(W_l - W^_l) X_l||^2`` is minimised),
            ``"absolute"`` (the same, for whitenings on one absolute scale),
            ``"layer"`` (each layer's relative error alike), or a tensor of one
            weight per layer.

    Returns:
        The fit; ``layer_errors`` are relative *output* errors
        ``||(W_l - W^_l) R_l|| / ||W_l R_l||``, and ``eigenvalues`` the spectrum
        of the whitened, normalised stack.

    Raises:
        FitError: Shapes disagree, or ``atoms``/``rank`` are out of range.

    Example:
        >>> ws = [torch.randn(8, 6) for _ in range(4)]
        >>> xs = [torch.randn(50, 6) for _ in range(4)]
        >>> fit = fit_calibrated(ws, [x.T @ x for x in xs], atoms=2, rank=1)
        >>> fit.atoms.shape, fit.residual_up.shape, fit.residual_down.shape
        (torch.Size([2, 8, 6]), torch.Size([4, 8, 1]), torch.Size([4, 1, 6]))
    """
    # Whitening of every layer and of their mean
    ranks = _layer_ranks(rank, len(weights))
    dtype, num_layers = _check(weights, statistics, atoms, max(ranks))
    layers = _whitenings(statistics)
    if atoms == num_layers and not any(ranks):
        # Lossless: the weights themselves are the atoms, exactly
        return matrix_pca(weights, atoms)

    # Atoms, then each layer's coefficients and residual
    if shared_metric not in ("output", "weight"):
        raise FitError(
            f"shared_metric must be 'output' or 'weight', got {shared_metric!r}."
        )
    plain = None
    if shared_metric == "weight" and atoms:
        plain = matrix_pca([w.double() for w in weights], atoms)
        basis = _Basis(plain.atoms, plain.eigenvalues)
    else:
        counts = _layer_weights(weights, layers, weighting)
        basis = _whitened_atoms(weights, layers, atoms, counts)
    coefficients, ups, downs, errors = [], [], [], []
    for index, (weight, layer) in enumerate(zip(weights, layers, strict=True)):
        given = None if plain is None else plain.coefficients[index]
        fit = fit_layer(weight, layer, basis.atoms, ranks[index], coefficients=given)
        coefficients.append(fit.coefficients)
        ups.append(fit.up)
        downs.append(fit.down)
        errors.append(fit.error)

    up, down, layer_ranks = stack_residuals(
        [u.to(dtype) if r else None for u, r in zip(ups, ranks, strict=True)],
        [d.to(dtype) if r else None for d, r in zip(downs, ranks, strict=True)],
    )
    return MatrixPCA(
        atoms=basis.atoms.to(dtype),
        coefficients=torch.stack(coefficients).to(dtype),
        eigenvalues=basis.eigenvalues,
        layer_errors=torch.stack(errors),
        requested_atoms=atoms,
        residual_up=up,
        residual_down=down,
        residual_ranks=layer_ranks,
    )


def _layer_ranks(rank: int | Sequence[int], num_layers: int) -> list[int]:
    if isinstance(rank, int):
        return [rank] * num_layers
    ranks = [int(r) for r in rank]
    if len(ranks) != num_layers:
        raise FitError(f"need one rank per layer ({num_layers}), got {len(ranks)}.")
    return ranks


@dataclass
class LayerFit:
    """One layer's share of a calibrated fit, in float64.

    Attributes:
        coefficients: Mixing weights of the atoms, ``(S,)``.
        up: Left factor of the residual, ``(out, r)``.
        down: Right factor of the residual, ``(r, in)``.
        error: Relative output error ``||(W - W^) R|| / ||W R||``.
    """

    coefficients: Tensor
    up: Tensor
    down: Tensor
    error: Tensor


def fit_layer(
    weight: Tensor,
    layer: Whitening,
    atoms: Tensor,
    rank: int,
    *,
    coefficients: Tensor | None = None,
) -> LayerFit:
    """Coefficients of fixed ``atoms`` and a rank-``rank`` residual for one layer.

    Minimises ``||(W - sum_s c_s D_s - U V) R||`` in the metric of ``layer``
    (``X^T X = R R^T``): the coefficients by least squares, then the residual by
    the truncated SVD of what they leave, mapped back by ``R^{-1}``.

    Args:
        weight: The layer's weight ``W``, ``(out, in)``.
        layer: The whitening of the layer's input statistics.
        atoms: The shared atoms ``D``, ``(S, out, in)``, float64 (``S`` may be 0).
        rank: Rank of the residual.
        coefficients: Use these coefficients instead of solving for them.

    Returns:
        The coefficients, the residual's factors and the relative error.

    Example:
        >>> w, x = torch.randn(8, 6), torch.randn(50, 6)
        >>> fit = fit_layer(w, whitening(x.T @ x), torch.zeros(0, 8, 6).double(), 6)
        >>> bool(fit.error < 1e-6), tuple(fit.up.shape), tuple(fit.down.shape)
        (True, (8, 6), (6, 6))
    """
    target = layer.apply(weight)  # (out, in), whitened
    mixed = _mix(atoms, layer)  # (S, out * in)
    if coefficients is None:
        coefficients = _solve_coefficients(mixed, target.reshape(-1))
    coefficients = coefficients.to(mixed.dtype)
    left = target - (coefficients @ mixed).reshape(target.shape)
    up, down, missed = _residual(left, layer, rank)
    error = (missed / target.square().sum().clamp_min(1e-300)).sqrt()
    return LayerFit(coefficients, up, down, error)


def error_table(
    weights: Sequence[Tensor],
    statistics: Sequence[Statistic],
    atoms: Sequence[int],
    ranks: Sequence[int],
    *,
    weighting: str | Tensor = "energy",
) -> ErrorTable:
    """The output error of :func:`fit_calibrated` for every ``(atoms, rank)``.

    Args:
        weights: The ``L`` layer weights of one role, each ``(out, in)``.
        statistics: Each layer's input ``X^T X``, or its whitening.
        atoms: Atom counts to try, each in ``0..L``.
        ranks: Residual ranks to try, each in ``0..min(out, in)``.
        weighting: As in :func:`fit_calibrated`; with ``"energy"`` each layer's
            squared relative error counts in proportion to its output energy
            (the weights average 1, so the table stays on the same scale).

    Returns:
        The table of errors (squared relative output errors summed over layers).

    Example:
        >>> ws = [torch.randn(8, 6) for _ in range(4)]
        >>> xs = [torch.randn(50, 6) for _ in range(4)]
        >>> table = error_table(ws, [x.T @ x for x in xs], [0, 2, 4], [0, 3, 6])
        >>> table.errors.shape, round(table.errors[0, 0].item(), 6)
        (torch.Size([3, 3]), 4.0)
        >>> bool(table.errors[2, 0] < 1e-12) and bool(table.errors[0, 2] < 1e-12)
        True
    """
    _check(weights, statistics, max(atoms), max(ranks))
    layers = _whitenings(statistics)
    counts = _layer_weights(weights, layers, weighting)
    most = max(atoms)
    basis = _whitened_atoms(weights, layers, most, counts) if most else None

    # One Gram matrix per layer; every atom count is a leading block of it
    errors = torch.zeros(len(atoms), len(weights), len(ranks), dtype=torch.float64)
    rank_index = torch.tensor(list(ranks), dtype=torch.long)
    for index, (weight, layer) in enumerate(zip(weights, layers, strict=True)):
        # float32 products: the table ranks choices, the fit itself is float64
        target = layer.apply(weight).float()
        norm = target.double().square().sum().clamp_min(1e-300)
        if counts is not None:
            norm = norm / counts[index]
        mixed = None
        if basis is not None:
            mixed = layer.apply(basis.atoms).float().flatten(1)
        for i, count in enumerate(atoms):
            left = target
            if count:
                c = _solve_coefficients(mixed[:count].double(), target.reshape(-1))
                left = target - (c.float() @ mixed[:count]).reshape(target.shape)
            spectrum = torch.linalg.svdvals(left).double().square()
            tail = spectrum.flip(0).cumsum(0).flip(0)  # tail[r] = sum_{i>=r}
            tail = torch.cat([tail, tail.new_zeros(1)])
            errors[i, index] = tail[rank_index.clamp(max=tail.numel() - 1)] / norm
    return ErrorTable(
        atoms=list(atoms),
        ranks=list(ranks),
        errors=errors.sum(1),
        shape=tuple(weights[0].shape),
        num_layers=len(weights),
        layer_errors=errors,
    )


def whitened_gram(weights: Sequence[Tensor], statistics: Sequence[Statistic]) -> Tensor:
    """``G[i, j] = <W_i R, W_j R>`` of the normalised, whitened stack, float64.

    The diagonal is 1: the top eigenvalues of any principal block ``G[a:b, a:b]``
    are the share of those layers' output energy that shared atoms keep, which
    is how :mod:`masasurgery.grouping` compares ways to cut a stack into groups.

    Example:
        >>> ws = [torch.randn(8, 6) for _ in range(3)]
        >>> gram = whitened_gram(ws, [torch.eye(6)] * 3)
        >>> gram.shape, torch.allclose(gram.diagonal(), torch.ones(3).double())
        (torch.Size([3, 3]), True)
    """
    _check(weights, statistics, 0, 0)
    layers = _whitenings(statistics)
    stack = _normalised_stack(weights, _mean_whitening(layers))
    flats = torch.stack([w.reshape(-1) for w in stack])
    return flats @ flats.T


@dataclass
class _Basis:
    atoms: Tensor  # (S, out, in), float64, unwhitened
    eigenvalues: Tensor


def _whitened_atoms(
    weights: Sequence[Tensor],
    layers: Sequence[Whitening],
    atoms: int,
    layer_weights: Tensor | None = None,
) -> _Basis:
    """Matrix PCA of the normalised stack, whitened by the mean statistics."""
    mean = _mean_whitening(layers)
    stack = _normalised_stack(weights, mean)
    if layer_weights is not None:
        stack = [w * s.sqrt() for w, s in zip(stack, layer_weights, strict=True)]
    if atoms == 0:
        empty = torch.zeros(0, *weights[0].shape, dtype=torch.float64)
        return _Basis(empty, matrix_pca(stack, 1).eigenvalues)
    # Atoms in eigen order, also at S = L, where matrix_pca would keep the
    # weights themselves: the error table reads the leading atoms of one basis
    # as the fit of every smaller count. A zero layer keeps S below the count.
    fit = matrix_pca([*stack, torch.zeros_like(stack[0])], atoms)
    back = torch.stack([mean.unapply(a) for a in fit.atoms])
    return _Basis(atoms=back, eigenvalues=fit.eigenvalues[: len(stack)])


def _layer_weights(
    weights: Sequence[Tensor], layers: Sequence[Whitening], weighting: str | Tensor
) -> Tensor | None:
    """How much each layer's relative error counts: 1, its output energy, or
    given (one non-negative number per layer, e.g. a measured sensitivity)."""
    if isinstance(weighting, Tensor):
        given = weighting.detach().double().flatten()
        if given.numel() != len(weights) or not bool((given >= 0).all()):
            raise FitError(
                f"weighting as a tensor needs one non-negative number per layer "
                f"({len(weights)}), got {tuple(weighting.shape)} "
                f"(min {weighting.min().item():.3g})."
            )
        return given.clamp_min(1e-12)
    if weighting == "layer":
        return None
    if weighting not in WEIGHTINGS:
        raise FitError(
            f"weighting must be one of {WEIGHTINGS} or a tensor, got {weighting!r}."
        )
    energy = torch.stack(
        [w.apply(x).square().sum() for x, w in zip(weights, layers, strict=True)]
    )
    if weighting == "absolute":
        return energy.clamp_min(1e-300)
    return energy / energy.mean().clamp_min(1e-300)


def _whitenings(statistics: Sequence[Statistic]) -> list[Whitening]:
    return [
        s if isinstance(s, Whitening) else whitening(s, name=f"layer {i}")
        for i, s in enumerate(statistics)
    ]


def _mean_whitening(layers: Sequence[Whitening]) -> Whitening:
    """One whitening for shared atoms: the mean of the layers' statistics, each
    side scaled to unit mean diagonal first."""
    right = _mean_gram([w.factor for w in layers])
    mean = whitening(right, name="the layers' mean input")
    if all(w.left is not None for w in layers):
        left = whitening(_mean_gram([w.left for w in layers]), name="mean output")
        mean.left = left.factor
    return mean


def _mean_gram(factors: Sequence[Tensor]) -> Tensor:
    grams = [f @ f.T for f in factors]
    return sum(g / g.diagonal().mean().clamp_min(1e-300) for g in grams) / len(grams)


def _normalised_stack(weights: Sequence[Tensor], mean: Whitening) -> list[Tensor]:
    """Every layer whitened by the mean statistics and scaled to unit norm."""
    stack = []
    for weight in weights:
        whitened = mean.apply(weight)
        stack.append(whitened / whitened.norm().clamp_min(1e-300))
    return stack


def _mix(atoms: Tensor, layer: Whitening) -> Tensor:
    """Each atom whitened by one layer's factor, flattened: ``(S, out * in)``."""
    count, out_features, in_features = atoms.shape
    return layer.apply(atoms).reshape(count, out_features * in_features)


def _solve_coefficients(mixed: Tensor, target: Tensor) -> Tensor:
    """Least squares ``min_c ||c @ mixed - target||``, safe for dependent atoms."""
    if mixed.shape[0] == 0:
        return mixed.new_zeros(0)
    gram = mixed @ mixed.T
    rhs = mixed @ target.to(mixed.dtype)
    return torch.linalg.lstsq(gram, rhs.unsqueeze(1), driver="gelsd").solution[:, 0]


def _residual(
    left: Tensor, layer: Whitening, rank: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` factors of the whitened residual, and the energy it misses."""
    u, s, vh = torch.linalg.svd(left, full_matrices=False)
    missed = s[rank:].square().sum()
    up = layer.unapply_left(u[:, :rank] * s[:rank])  # (out, r)
    down = layer.unapply_right(vh[:rank])  # (r, in)
    return up, down, missed


def _check(
    weights: Sequence[Tensor], statistics: Sequence[Statistic], atoms: int, rank: int
) -> tuple[torch.dtype, int]:
    if not weights or len(weights) != len(statistics):
        raise FitError(
            f"need one X^T X per weight, got {len(weights)} weights and "
            f"{len(statistics)} statistics."
        )
    out_features, in_features = weights[0].shape
    for i, (w, c) in enumerate(zip(weights, statistics, strict=True)):
        shape = tuple(c.factor.shape if isinstance(c, Whitening) else c.shape)
        left = c.left if isinstance(c, Whitening) else None
        if (
            w.shape != weights[0].shape
            or shape != (in_features, in_features)
            or (left is not None and tuple(left.shape) != (out_features,) * 2)
        ):
            raise FitError(
                f"layer {i}: weight {tuple(w.shape)} and X^T X {shape} do "
                f"not match layer 0's weight {tuple(weights[0].shape)}."
            )
    if not 0 <= atoms <= len(weights):
        raise FitError(f"atoms must be in 0..{len(weights)} (L), got {atoms}.")
    if not 0 <= rank <= min(out_features, in_features):
        raise FitError(
            f"rank must be in 0..{min(out_features, in_features)}, got {rank}."
        )
    return weights[0].dtype, len(weights)
