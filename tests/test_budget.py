"""The budget solver: within budget, and as good as exhaustive search."""

import itertools

import pytest
import torch

from masasurgery.budget import solve_budget
from masasurgery.errors import ConfigError
from masasurgery.fit_data import error_table


def _tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for key, (out, inp) in {
        (0, "q"): (8, 6),
        (0, "v"): (4, 6),
        (1, "q"): (8, 6),
    }.items():
        ws = [torch.randn(out, inp, generator=g) for _ in range(3)]
        xs = [
            torch.randn(40, inp, generator=g) * torch.logspace(0, -1, inp) for _ in ws
        ]
        tables[key] = error_table(ws, [x.T @ x for x in xs], [0, 1, 2, 3], [0, 1, 2, 4])
    return tables


def _exhaustive(tables, budget):
    keys = list(tables)
    options = [
        [
            (t.parameters(a, r), t.errors[i, j].item())
            for i, a in enumerate(t.atoms)
            for j, r in enumerate(t.ranks)
        ]
        for t in tables.values()
    ]
    best = float("inf")
    for combo in itertools.product(*options):
        if sum(p for p, _ in combo) <= budget:
            best = min(best, sum(e for _, e in combo))
    assert keys
    return best


@pytest.mark.parametrize("share", [0.2, 0.35, 0.5, 0.7])
def test_within_budget_and_near_the_exhaustive_optimum(share):
    tables = _tables()
    dense = sum(t.dense_parameters for t in tables.values())
    budget = int(share * dense)
    allocation = solve_budget(tables, budget)
    assert allocation.parameters <= budget
    optimum = _exhaustive(tables, budget)
    assert allocation.error <= optimum * 1.10 + 1e-9
    assert allocation.compression >= 1 - share - 1e-9


def test_more_budget_never_costs_accuracy():
    tables = _tables(seed=1)
    dense = sum(t.dense_parameters for t in tables.values())
    errors = [solve_budget(tables, int(s * dense)).error for s in (0.2, 0.4, 0.6, 0.8)]
    assert errors == sorted(errors, reverse=True)


def test_a_budget_below_the_cheapest_fit_is_refused():
    tables = _tables()
    with pytest.raises(ConfigError, match="below the cheapest fit"):
        solve_budget(tables, -1)


@pytest.mark.parametrize("budget", [150, 250, 400])
def test_per_layer_ranks_stay_within_budget_and_never_lose_to_one_rank(budget):
    tables = _tables(seed=3)
    uniform = solve_budget(tables, budget)
    layered = solve_budget(tables, budget, per_layer=True)
    assert layered.parameters <= budget
    assert layered.error <= uniform.error + 1e-12
    for key, choice in layered.choices.items():
        table = tables[key]
        expected = table.parameters(choice.atoms, 0) + sum(choice.ranks) * sum(
            table.shape
        )
        assert choice.parameters == expected
        assert choice.error == pytest.approx(
            sum(
                table.layer_errors[table.atoms.index(choice.atoms), layer, j].item()
                for layer, j in enumerate(table.ranks.index(r) for r in choice.ranks)
            )
        )


def test_a_sensitive_layer_gets_more_rank():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 6, generator=g) for _ in range(3)]
    xs = [torch.randn(40, 6, generator=g) for _ in ws]
    xs[1] = xs[1] * 10  # layer 1's output carries 100x the energy
    table = error_table(ws, [x.T @ x for x in xs], [0], list(range(7)))
    table.errors = table.layer_errors.sum(1)
    # Energy weighting counts layer 1's error 100x: it gets the rank
    allocation = solve_budget({(0, "q"): table}, 4 * 14, per_layer=True)
    ranks = allocation.choices[0, "q"].ranks
    assert ranks[1] > ranks[0] and ranks[1] > ranks[2]
