"""Whitening: the Cholesky factor of a projection's input statistics, made safe.

With ``C = X^T X = R R^T`` (``R`` lower triangular), the output error of a weight
change is a plain Frobenius norm after whitening:
``||(W - W^) X||_F = ||(W - W^) R||_F``. Every data-aware fit of masasurgery works
in that space, in float64.

With the statistics of the gradients that reach the projection's output as
well, ``G = sum_t g_t g_t^T = L L^T`` (:mod:`masasurgery.sensitivity`), the error
that matters is how far the model's readout moves, to first order and with the
Kronecker-factored approximation of K-FAC: ``||L^T (W - W^) R||_F``. A
:class:`Whitening` with a ``left`` factor works in that space
(:func:`sensitivity_whitening`); its errors are in the readout's own units, so
they compare across projections, roles and layers.

Statistics of real data are often singular (a LayerNorm output lives in a
hyperplane, dead channels are zero). The factor adds a small diagonal ``jitter``
(relative to the mean of the diagonal) and multiplies it by ten until the
Cholesky succeeds; the jitter used is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from masasurgery.errors import FitError

__all__ = ["DAMPING", "Whitening", "sensitivity_whitening", "whitening"]

logger = logging.getLogger(__name__)

#: First diagonal jitter tried, relative to the mean diagonal of ``C``.
BASE_JITTER = 1e-6

#: Tries before giving up, the jitter ten times larger each time.
MAX_TRIES = 8

#: Damping of the output-gradient statistics ``G``, relative to their mean
#: diagonal. Measured on DINOv2 ViT-S/14 and all-MiniLM-L6-v2 at 50% and 66.7%
#: attention compression (docs/fidelity.md): 0.1 scored best of 0.01, 0.1, 1.
#: Some damping is needed: ``G`` comes from a first-order expansion, and
#: directions it calls free still cost something once errors add up.
DAMPING = 0.1


@dataclass
class Whitening:
    """``C = R R^T`` for one input, in float64.

    Attributes:
        factor: ``R``, lower triangular, ``(in, in)``.
        jitter: Diagonal added to ``C`` before factoring, relative to its mean
            diagonal (0.0 when none was needed).
        left: ``L`` of the output side, ``G = L L^T``, lower triangular,
            ``(out, out)``; None weighs every output alike.
    """

    factor: Tensor
    jitter: float
    left: Tensor | None = None

    def apply(self, weight: Tensor) -> Tensor:
        """``L^T W R``: the weight (or a stack of them) whitened, float64."""
        whitened = weight.double() @ self.factor
        if self.left is not None:
            whitened = self.left.T @ whitened
        return whitened

    def unapply(self, weight: Tensor) -> Tensor:
        """``L^{-T} W R^{-1}``: back from the whitened space, float64."""
        return self.unapply_left(self.unapply_right(weight))

    def unapply_right(self, weight: Tensor) -> Tensor:
        """``W R^{-1}``, float64 (the input side only)."""
        # Solve X R = W, i.e. R^T X^T = W^T
        solved = torch.linalg.solve_triangular(
            self.factor.T, weight.double().T, upper=True
        )
        return solved.T

    def unapply_left(self, weight: Tensor) -> Tensor:
        """``L^{-T} W``, float64 (the output side only; W itself without one)."""
        if self.left is None:
            return weight.double()
        return torch.linalg.solve_triangular(self.left.T, weight.double(), upper=True)


def whitening(xtx: Tensor, *, name: str = "input") -> Whitening:
    """Factor ``X^T X`` (scaled to unit mean diagonal) as ``R R^T``, safely.

    The statistics are divided by their mean diagonal first, so the factor (and
    every whitened error) is on one scale whatever the token count.

    Args:
        xtx: ``X^T X``, ``(in, in)``, symmetric positive semi-definite.
        name: What to call the input in the log.

    Returns:
        The factor and the jitter that was needed.

    Raises:
        FitError: ``xtx`` is not square, not finite, or no jitter makes it
            positive definite.

    Example:
        >>> x = torch.randn(100, 4, dtype=torch.float64)
        >>> w = whitening(x.T @ x)
        >>> torch.allclose(w.factor @ w.factor.T, x.T @ x / (x.T @ x).diag().mean())
        True
    """
    if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1]:
        raise FitError(f"X^T X of {name} must be square, got {tuple(xtx.shape)}.")
    c = xtx.double()
    if not torch.isfinite(c).all():
        raise FitError(
            f"X^T X of {name} has non-finite entries; the calibration data drove "
            "the model to inf/nan (check the inputs' scale and dtype)."
        )
    scale = c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    factor, jitter = _safe_cholesky((c + c.T) / (2 * scale), name, "X^T X")
    return Whitening(factor=factor, jitter=jitter)


def sensitivity_whitening(
    xtx: Tensor,
    tokens: int,
    gtg: Tensor,
    probes: int,
    *,
    damping: float = DAMPING,
    name: str = "input",
) -> Whitening:
    """Both sides: ``R R^T = X^T X / tokens`` and ``L L^T = G / probes``, damped.

    ``||L^T E R||_F^2`` is then the K-FAC estimate of how much a weight change
    ``E`` moves the readout, summed over a calibration sample's tokens and
    averaged over the probes (:mod:`masasurgery.sensitivity`): one scale for
    every projection calibrated in the same run.

    Args:
        xtx: ``X^T X`` of the input, ``(in, in)``.
        tokens: Rows added up in ``xtx``.
        gtg: ``G``, the output gradients' second moment, ``(out, out)``.
        probes: Probe vectors added up in ``gtg`` (samples times probes each).
        damping: Added to ``G``'s diagonal, relative to its mean.
        name: What to call the projection in the log.

    Returns:
        The two-sided whitening.

    Raises:
        FitError: A statistic is not square, not finite or all zero (no gradient
            reached the projection: is it used by the readout?).

    Example:
        >>> x, g = torch.randn(100, 4).double(), torch.randn(30, 3).double()
        >>> w = sensitivity_whitening(x.T @ x, 100, g.T @ g, 30, damping=0.0)
        >>> e = torch.randn(3, 4).double()
        >>> kfac = torch.trace(g.T @ g @ e @ x.T @ x @ e.T) / 100 / 30
        >>> torch.allclose(w.apply(e).square().sum(), kfac)
        True
    """
    right = whitening(xtx, name=name)
    g = gtg.double()
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise FitError(f"G of {name} must be a square matrix, got {tuple(g.shape)}.")
    if not torch.isfinite(g).all():
        raise FitError(
            f"G of {name} has inf or nan entries: the readout's gradients "
            "overflowed; read a tensor of moderate scale (e.g. normalised "
            "features or logits) and check the inputs."
        )
    g_scale = g.diagonal().mean()
    if not g_scale > 0:
        raise FitError(
            f"no gradient reached the output of {name} (G is zero); the readout "
            "does not depend on it, so nothing says how much its error matters. "
            "Check the readout, or compress with metric='output'."
        )

    # Unit mean diagonal plus damping, factored, then the absolute scale back
    g = (g + g.T) / (2 * g_scale)
    g = g + damping * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    left, _ = _safe_cholesky(g, name, "G")
    x_scale = xtx.double().diagonal().mean() / max(tokens, 1)
    scale = (g_scale / max(probes, 1) * x_scale).sqrt()
    return Whitening(factor=right.factor, jitter=right.jitter, left=left * scale)


def _safe_cholesky(c: Tensor, name: str, what: str) -> tuple[Tensor, float]:
    """Cholesky of a symmetric ``c`` with unit mean diagonal, jittered if need be."""
    # Cholesky, with a growing diagonal when C is singular
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    jitter = 0.0
    for attempt in range(MAX_TRIES + 1):
        factor, info = torch.linalg.cholesky_ex(c + jitter * eye)
        if info.item() == 0:
            if jitter:
                logger.info(
                    "%s: %s needed a diagonal jitter of %.1e", name, what, jitter
                )
            return factor, jitter
        jitter = BASE_JITTER * 10**attempt
    raise FitError(
        f"{what} of {name} is not positive definite even with a diagonal of "
        f"{jitter:.1e} times its mean; calibrate on more (or more varied) data."
    )
