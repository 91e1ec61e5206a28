"""Whitening: the Cholesky factor of a projection's input statistics, made safe.

With ``C = X^T X = R R^T`` (``R`` lower triangular), the output error of a weight
change is a plain Frobenius norm after whitening:
``||(W - W^) X||_F = ||(W - W^) R||_F``. Every data-aware fit of masasurgery works
in that space, in float64.

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

__all__ = ["Whitening", "whitening"]

logger = logging.getLogger(__name__)

#: First diagonal jitter tried, relative to the mean diagonal of ``C``.
BASE_JITTER = 1e-6

#: Tries before giving up, the jitter ten times larger each time.
MAX_TRIES = 8


@dataclass
class Whitening:
    """``C = R R^T`` for one input, in float64.

    Attributes:
        factor: ``R``, lower triangular, ``(in, in)``.
        jitter: Diagonal added to ``C`` before factoring, relative to its mean
            diagonal (0.0 when none was needed).
    """

    factor: Tensor
    jitter: float

    def apply(self, weight: Tensor) -> Tensor:
        """``W R``: the weight in the whitened space, float64."""
        return weight.double() @ self.factor

    def unapply(self, weight: Tensor) -> Tensor:
        """``W R^{-1}``: back from the whitened space, float64."""
        # Solve X R = W, i.e. R^T X^T = W^T
        solved = torch.linalg.solve_triangular(
            self.factor.T, weight.double().T, upper=True
        )
        return solved.T


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
    c = (c + c.T) / (2 * scale)

    # Cholesky, with a growing diagonal when C is singular
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    jitter = 0.0
    for attempt in range(MAX_TRIES + 1):
        factor, info = torch.linalg.cholesky_ex(c + jitter * eye)
        if info.item() == 0:
            if jitter:
                logger.info("%s: X^T X needed a diagonal jitter of %.1e", name, jitter)
            return Whitening(factor=factor, jitter=jitter)
        jitter = BASE_JITTER * 10**attempt
    raise FitError(
        f"X^T X of {name} is not positive definite even with a diagonal of "
        f"{jitter:.1e} times its mean; calibrate on more (or more varied) data."
    )
