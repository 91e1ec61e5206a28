"""The rows of the fidelity benchmark, in table order.

To add or wire a method, give it a ``fit(model, budget, data) -> Fitted``
(``fidelity_api``) and list it here; ``fit=None`` or a NotImplementedError
shows the row as "n/a".
"""

from __future__ import annotations

from fidelity_api import Method
from fidelity_baselines import fit_matrix_pca, fit_svd, fit_whitened
from fidelity_ours import fit_best, fit_best_healed, fit_paper

__all__ = ["METHODS", "TARGETS"]

METHODS: tuple[Method, ...] = (
    Method("svd", "per-layer SVD", fit_svd),
    Method(
        "whitened", "whitened low rank (SVD-LLM)", fit_whitened, uses_statistics=True
    ),
    Method("matrix_pca", "Matrix PCA (convert)", fit_matrix_pca),
    Method("paper", "paper pipeline", fit_paper, uses_statistics=True),
    Method("best", "our best", fit_best, uses_statistics=True),
    Method(
        "best_healed",
        "our best + healing",
        fit_best_healed,
        start_from="best",
        uses_statistics=True,
    ),
)

#: The issue's target, checked at each budget for these rows: lose at most half
#: of what "paper" loses (primary metric) and beat "whitened".
TARGETS: tuple[str, ...] = ("best", "best_healed")
