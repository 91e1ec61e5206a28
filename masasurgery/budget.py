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

With ``per_layer=True`` each layer of a dictionary takes its own residual rank
(the tables' ``layer_errors``): at a given price the layers choose apart, given
the dictionary's atom count, and the fill raises one layer's rank at a time.
With errors in the readout's units (:mod:`masasurgery.sensitivity`) that puts
rank where the model is sensitive, layer by layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from masasurgery.errors import ConfigError
from masasurgery.fit_data import ErrorTable

__all__ = ["Allocation", "Choice", "solve_budget"]

_BISECTION_STEPS = 100


@dataclass(frozen=True)
class Choice:
    """What one dictionary got.

    Attributes:
        atoms: Shared atoms.
        rank: Residual rank of each layer (the largest, when they differ).
        parameters: What that costs (atoms, coefficients, residual factors).
        dense_parameters: What the layers' dense weights cost.
        error: Predicted output error (squared relative, summed over layers).
        ranks: Each layer's residual rank, when chosen layer by layer.
    """

    atoms: int
    rank: int
    parameters: int
    dense_parameters: int
    error: float
    ranks: tuple[int, ...] | None = None

    @property
    def layer_ranks(self) -> list[int] | int:
        """What to fit: one rank per layer, or the one rank of every layer."""
        return list(self.ranks) if self.ranks is not None else self.rank


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
    tables: Mapping[tuple[int, str], ErrorTable],
    budget: int,
    *,
    per_layer: bool = False,
) -> Allocation:
    """Choose ``(atoms, rank)`` per dictionary to minimise error within ``budget``.

    Args:
        tables: The error table of each ``(group, role)``.
        budget: Most parameters the chosen fits may cost together.
        per_layer: Let each layer take its own residual rank (the tables must
            have ``layer_errors``).

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
    if per_layer:
        return _solve_per_layer(tables, budget)
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


# ---------------------------------------------------------------------------
# Ranks layer by layer


def _solve_per_layer(
    tables: Mapping[tuple[int, str], ErrorTable], budget: int
) -> Allocation:
    missing = [key for key, t in tables.items() if t.layer_errors is None]
    if missing:
        raise ConfigError(
            f"per_layer=True needs tables with layer_errors; {missing[0]} has none "
            "(make it with masasurgery.fit_data.error_table)."
        )
    cheapest = sum(t.parameters(min(t.atoms), min(t.ranks)) for t in tables.values())
    if cheapest > budget:
        raise ConfigError(
            f"the budget of {budget} parameters is below the cheapest fit "
            f"({cheapest}); raise it, or leave some roles dense."
        )

    # Bisection on the price of a parameter, then the greedy fill
    low, high = 0.0, max(t.errors.max().item() + 1.0 for t in tables.values())
    best = {key: _pick_layers(t, high) for key, t in tables.items()}
    for _ in range(_BISECTION_STEPS):
        price = (low + high) / 2
        picked = {key: _pick_layers(t, price) for key, t in tables.items()}
        if _cost(picked) <= budget:
            best, high = picked, price
        else:
            low = price
    return Allocation(choices=_fill_layers(tables, best, budget), budget=budget)


def _pick_layers(table: ErrorTable, price: float) -> Choice:
    """The atom count and per-layer ranks least in ``error + price * cost``."""
    out_features, in_features = table.shape
    rank_cost = torch.tensor(table.ranks, dtype=torch.float64) * (
        out_features + in_features
    )
    best, best_value = None, None
    for i in range(len(table.atoms)):
        indices = (table.layer_errors[i] + price * rank_cost).argmin(1)
        choice = _layered_choice(table, i, indices.tolist())
        value = (choice.error + price * choice.parameters, choice.parameters)
        if best_value is None or value < best_value:
            best, best_value = choice, value
    return best


def _layered_choice(table: ErrorTable, atom_index: int, indices: list[int]) -> Choice:
    ranks = tuple(table.ranks[j] for j in indices)
    out_features, in_features = table.shape
    atoms = table.atoms[atom_index]
    errors = table.layer_errors[atom_index]
    return Choice(
        atoms=atoms,
        rank=max(ranks),
        parameters=table.parameters(atoms, 0)
        + sum(ranks) * (out_features + in_features),
        dense_parameters=table.dense_parameters,
        error=sum(errors[layer, j].item() for layer, j in enumerate(indices)),
        ranks=ranks,
    )


def _fill_layers(
    tables: Mapping[tuple[int, str], ErrorTable],
    picked: dict[tuple[int, str], Choice],
    budget: int,
) -> dict[tuple[int, str], Choice]:
    # One layer's rank one grid step up at a time, best error per parameter first
    picked = dict(picked)
    state = {
        key: (
            tables[key].atoms.index(c.atoms),
            [tables[key].ranks.index(r) for r in c.ranks],
        )
        for key, c in picked.items()
    }
    while True:
        left = budget - _cost(picked)
        best, best_gain = None, 0.0
        for key, (i, indices) in state.items():
            table = tables[key]
            width = sum(table.shape)
            for layer, j in enumerate(indices):
                if j + 1 >= len(table.ranks):
                    continue
                extra = (table.ranks[j + 1] - table.ranks[j]) * width
                drop = (
                    table.layer_errors[i, layer, j]
                    - table.layer_errors[i, layer, j + 1]
                ).item()
                if 0 < extra <= left and drop > 0 and drop / extra > best_gain:
                    best, best_gain = (key, layer), drop / extra
        if best is None:
            return picked
        key, layer = best
        state[key][1][layer] += 1
        picked[key] = _layered_choice(tables[key], state[key][0], state[key][1])
