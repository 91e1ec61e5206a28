"""The baselines of the fidelity benchmark, at the budget's parameter count.

* **per-layer SVD**: each q, k, v, o weight ``W`` (out, in) becomes ``U_r V_r``,
  its best rank-``r`` fit in the Frobenius norm;
* **whitened low rank** (SVD-LLM style): the rank-``r`` fit that minimises the
  output error ``||(W - W^) X||`` on calibration data: with ``X^T X = R R^T``,
  truncate the SVD of ``W R`` and map back with ``R^{-1}`` (float64; the
  Cholesky adds a diagonal jitter when ``X^T X`` is singular, and says so);
* **Matrix PCA**: ``masasurgery.convert(model, atoms=S)``, the closed-form
  shared dictionary fitted to the weights, with ``S`` the most atoms the budget
  pays for (atoms and ``L * S`` coefficients per role).

A rank-``r`` factor pair costs ``r * (out + in)`` parameters. Every projection
gets the same share of its own parameters: ``r = floor((1 - c) out in / (out +
in))`` for a compression ``c``, so the total stays within the budget. The
low-rank baselines are plain module swaps: they are comparisons, not library
features.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from fidelity_api import Budget, CalibrationData, Fitted, no_grad_fit
from torch import Tensor, nn

import masasurgery
from masasurgery.whiten import whitening

__all__ = ["LowRankLinear", "fit_matrix_pca", "fit_svd", "fit_whitened"]

logger = logging.getLogger(__name__)


class LowRankLinear(nn.Module):
    """``y = up @ (down @ x) + bias``: a linear layer stored as two factors.

    Args:
        up: ``(out, r)``.
        down: ``(r, in)``.
        bias: ``(out,)`` or None, kept from the replaced layer.
    """

    def __init__(self, up: Tensor, down: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.up = nn.Parameter(up.contiguous())
        self.down = nn.Parameter(down.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features = up.shape[0], down.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.down.shape[0]}, bias={self.bias is not None}"
        )


def rank_for(shape: tuple[int, int], compression: float) -> int:
    """Largest rank whose two factors cost at most ``1 - c`` of the dense weight."""
    out_features, in_features = shape
    dense = out_features * in_features
    return max(
        1, math.floor((1.0 - compression) * dense / (out_features + in_features))
    )


@no_grad_fit
def fit_svd(model: nn.Module, budget: Budget, data: CalibrationData) -> Fitted:
    """Truncated SVD of every projection weight, at the same share for each."""
    ranks = {}
    for target, role in data.targets.items():
        linear = model.get_submodule(target)
        rank = rank_for(tuple(linear.weight.shape), budget.compression)
        u, s, vh = torch.linalg.svd(linear.weight.double(), full_matrices=False)
        root = s[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
        _swap(model, target, _low_rank(up, down, linear))
        ranks[role] = rank
    return Fitted(model, info={"rank": ranks})


@no_grad_fit
def fit_whitened(model: nn.Module, budget: Budget, data: CalibrationData) -> Fitted:
    """Rank-``r`` fit of each projection in the output metric of its input data."""
    stats = data.statistics()
    ranks, jitters = {}, []
    for target, role in data.targets.items():
        linear = model.get_submodule(target)
        rank = rank_for(tuple(linear.weight.shape), budget.compression)

        # Whiten, truncate, and map the right factor back with R^{-1}
        white = whitening(stats[target].xtx, name=target)
        u, s, vh = torch.linalg.svd(white.apply(linear.weight), full_matrices=False)
        root = s[:rank].sqrt()
        up = u[:, :rank] * root
        down = white.unapply(root[:, None] * vh[:rank])
        _swap(model, target, _low_rank(up, down, linear))
        ranks[role] = rank
        jitters.append(white.jitter)

    # Say when the statistics needed a jitter to factor
    info = {"rank": ranks}
    jittered = sum(j > 0 for j in jitters)
    if jittered:
        logger.info("whitened SVD: %d inputs needed a Cholesky jitter", jittered)
        info["jitter"] = f"{max(jitters):.0e} on {jittered} inputs"
    return Fitted(model, info=info)


@no_grad_fit
def fit_matrix_pca(model: nn.Module, budget: Budget, data: CalibrationData) -> Fitted:
    """``masasurgery.convert`` with the most atoms the budget pays for."""
    atoms = atoms_for(data.targets, model, budget)
    masasurgery.convert(
        model,
        atoms=atoms,
        example_inputs=data.example,
        verify=False,
        keep_originals=False,
    )
    return Fitted(model, info={"atoms": atoms})


def atoms_for(targets: dict[str, str], model: nn.Module, budget: Budget) -> int:
    """Most atoms ``S`` with ``sum_roles S * out * in + L * S`` within the budget.

    Assumes one group per role (all blocks alike), as in the three models here.
    """
    blocks: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for target, role in targets.items():
        blocks[role] = blocks.get(role, 0) + 1
        sizes[role] = model.get_submodule(target).weight.numel()
    most = min(blocks.values())
    fits = [
        s
        for s in range(1, most + 1)
        if sum(s * sizes[r] + blocks[r] * s for r in blocks) <= budget.max_parameters
    ]
    return max(fits, default=1)


def _low_rank(up: Tensor, down: Tensor, linear: nn.Module) -> LowRankLinear:
    dtype = linear.weight.dtype
    return LowRankLinear(up.to(dtype), down.to(dtype), linear.bias)


def _swap(model: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child_name = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)
