"""The low-rank and Matrix PCA baselines of benchmarks/fidelity.py, on a tiny Llama.

The benchmark's numbers are only as good as its baselines: each must stay within
its budget, reproduce the model at full rank, and (whitened) beat plain SVD in
the output metric it optimises.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from fidelity_api import (  # noqa: E402
    Budget,
    CalibrationData,
    attention_weights,
    unique_parameters,
)
from fidelity_baselines import (  # noqa: E402
    LowRankLinear,
    atoms_for,
    fit_matrix_pca,
    fit_svd,
    fit_whitened,
    rank_for,
)

ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}


@pytest.fixture
def data():
    model = tiny_llama(layers=6, mlp=48)
    targets = {
        f"model.layers.{i}.self_attn.{name}": role
        for i in range(6)
        for name, role in ROLES.items()
    }
    batches = [{"input_ids": torch.randint(64, (2, 12))} for _ in range(3)]
    return CalibrationData(batches, targets, model, "random tokens")


def _fit(fit, data, compression):
    dense = attention_weights(data.reference, data.targets)
    outside = unique_parameters(data.reference) - dense
    model = fit(copy.deepcopy(data.reference), Budget(compression, dense), data).model
    return model, unique_parameters(model) - outside, Budget(compression, dense)


def _logits(model, data):
    with torch.no_grad():
        return model(**data.batches[0]).logits


@pytest.mark.parametrize("fit", [fit_svd, fit_whitened])
@pytest.mark.parametrize("compression", [0.2, 0.5, 2 / 3])
def test_low_rank_baselines_stay_within_the_budget(data, fit, compression):
    model, parameters, budget = _fit(fit, data, compression)
    assert parameters <= budget.max_parameters
    assert parameters > 0.9 * budget.max_parameters  # and spend most of it
    swapped = [model.get_submodule(t) for t in data.targets]
    assert all(isinstance(m, LowRankLinear) for m in swapped)


@pytest.mark.parametrize("fit", [fit_svd, fit_whitened])
def test_at_full_rank_the_low_rank_model_is_the_original(data, fit):
    # A negative compression buys a rank of min(out, in) for every projection
    model, _, _ = _fit(fit, data, -3.0)
    ranks = {m.down.shape[0] for m in map(model.get_submodule, data.targets)}
    assert ranks == {32, 16}
    torch.testing.assert_close(
        _logits(model, data), _logits(data.reference, data), atol=1e-4, rtol=1e-4
    )


def test_whitened_beats_plain_svd_in_the_output_metric_it_optimises(data):
    svd, _, _ = _fit(fit_svd, data, 0.5)
    whitened, _, _ = _fit(fit_whitened, data, 0.5)
    stats = data.statistics()
    for target in data.targets:
        w = data.reference.get_submodule(target).weight.double()
        c = stats[target].xtx

        def output_error(model, w=w, c=c, target=target):
            m = model.get_submodule(target)
            d = w - (m.up @ m.down).double()
            return torch.trace(d @ c @ d.T).item()

        assert output_error(whitened) <= output_error(svd) * (1 + 1e-6)


def test_ranks_pay_for_themselves_within_each_weight():
    assert rank_for((576, 576), 0.2) == 230  # 230 * 1152 <= 0.8 * 576^2
    assert rank_for((192, 576), 2 / 3) == 48
    assert rank_for((8, 8), 0.99) == 1  # never below one


def test_matrix_pca_takes_the_most_atoms_the_budget_pays_for(data):
    # Each role of 6 blocks costs S * (out * in) + 6 * S: the coefficients count
    dense = attention_weights(data.reference, data.targets)
    model, parameters, budget = _fit(fit_matrix_pca, data, 0.2)
    assert atoms_for(data.targets, data.reference, budget) == 4
    assert parameters == 4 * dense // 6 + 4 * 6 * 4 <= budget.max_parameters
    # At half, 3 atoms would be 72 coefficients over: 2 atoms
    assert atoms_for(data.targets, data.reference, Budget(0.5, dense)) == 2
