"""Budget: spend a parameter budget on atoms and residual ranks where it counts.

Each dictionary (one group, one role) can be fitted with any ``(atoms, rank)``
pair; :func:`masasurgery.fit_data.error_table` gives its output error and
parameter cost for each. :func:`solve_budget` picks one pair per dictionary so
that the total cost stays within the budget and the summed error is smallest.

The choice is a multiple-choice knapsack. It is solved by its Lagrangian: for a
price ``lam`` per parameter, each dictionary independently takes the pair that
minimises ``error + lam * parameters``; a bisection on ``lam`` finds the
cheapest price whose choices fit. Then, while budget is left, the single
upgrade that removes the most error per added parameter is taken (greedy
fill). Cost: ``O(D * P * log(1/eps))`` for ``D`` dictionaries of ``P`` pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from masasurgery.errors import ConfigError
from masasurgery.fit_data import ErrorTable

__all__ = ["Allocation", "Choice", "solve_budget"]

_BISECTION_STEPS = 100


@dataclass(frozen=True)
class Choice:
    """What one dictionary got.

    Attributes:
        atoms: Shared atoms.
        rank: Residual rank of each layer.
        parameters: What that costs (atoms, coefficients, residual factors).
        dense_parameters: What the layers' dense weights cost.
        error: Predicted output error (squared relative, summed over layers).
    """

    atoms: int
    rank: int
    parameters: int
    dense_parameters: int
    error: float


@dataclass
class Allocation:
    """One choice per dictionary, within a budget.

    Attributes:
        choices: By ``(group, role)``.
        budget: The most parameters allowed.
    """

    choices: dict[tuple[int, str], Choice]
    budget: int

    @property
    def parameters(self) -> int:
        return sum(c.parameters for c in self.choices.values())

    @property
    def dense_parameters(self) -> int:
        return sum(c.dense_parameters for c in self.choices.values())

    @property
    def error(self) -> float:
        return sum(c.error for c in self.choices.values())

    @property
    def compression(self) -> float:
        """Share of the dense parameters removed."""
        return 1.0 - self.parameters / max(self.dense_parameters, 1)


def solve_budget(
    tables: Mapping[tuple[int, str], ErrorTable], budget: int
) -> Allocation:
    """Choose ``(atoms, rank)`` per dictionary to minimise error within ``budget``.

    Args:
        tables: The error table of each ``(group, role)``.
        budget: Most parameters the chosen fits may cost together.

    Returns:
        The choice of every dictionary.

    Raises:
        ConfigError: Even the cheapest choices cost more than ``budget``.

    Example:
        >>> import torch
        >>> from masasurgery.fit_data import error_table
        >>> ws = [torch.randn(8, 6) for _ in range(3)]
        >>> cs = [torch.eye(6) for _ in range(3)]
        >>> table = error_table(ws, cs, atoms=[0, 1, 2, 3], ranks=[0, 1, 2])
        >>> allocation = solve_budget({(0, "q"): table}, budget=60)
        >>> allocation.parameters <= 60
        True
    """
    options = {key: _options(table) for key, table in tables.items()}
    cheapest = sum(min(o.parameters for o in opts) for opts in options.values())
    if cheapest > budget:
        raise ConfigError(
            f"the budget of {budget} parameters is below the cheapest fit "
            f"({cheapest}); raise it, or leave some roles dense."
        )

    # Bisection on the price of a parameter
    low, high = 0.0, _top_price(options)
    best = _pick(options, high)
    for _ in range(_BISECTION_STEPS):
        price = (low + high) / 2
        picked = _pick(options, price)
        if _cost(picked) <= budget:
            best, high = picked, price
        else:
            low = price

    # Spend what is left on the best upgrades
    best = _fill(options, best, budget)
    return Allocation(choices=best, budget=budget)


def _options(table: ErrorTable) -> list[Choice]:
    return [
        Choice(
            atoms=a,
            rank=r,
            parameters=table.parameters(a, r),
            dense_parameters=table.dense_parameters,
            error=table.errors[i, j].item(),
        )
        for i, a in enumerate(table.atoms)
        for j, r in enumerate(table.ranks)
    ]


def _top_price(options: Mapping[tuple[int, str], list[Choice]]) -> float:
    # A price at which every dictionary takes its cheapest choice
    top = 1.0
    for opts in options.values():
        spread = max(o.error for o in opts) - min(o.error for o in opts)
        top = max(top, spread + 1.0)
    return top


def _pick(
    options: Mapping[tuple[int, str], list[Choice]], price: float
) -> dict[tuple[int, str], Choice]:
    return {
        key: min(opts, key=lambda o: (o.error + price * o.parameters, o.parameters))
        for key, opts in options.items()
    }


def _cost(picked: Mapping[tuple[int, str], Choice]) -> int:
    return sum(c.parameters for c in picked.values())


def _fill(
    options: Mapping[tuple[int, str], list[Choice]],
    picked: dict[tuple[int, str], Choice],
    budget: int,
) -> dict[tuple[int, str], Choice]:
    picked = dict(picked)
    while True:
        left = budget - _cost(picked)
        best_key, best_choice, best_gain = None, None, 0.0
        for key, opts in options.items():
            now = picked[key]
            for o in opts:
                extra = o.parameters - now.parameters
                if o.error < now.error and 0 < extra <= left:
                    gain = (now.error - o.error) / extra
                    if gain > best_gain:
                        best_key, best_choice, best_gain = key, o, gain
        if best_key is None:
            return picked
        picked[best_key] = best_choice
