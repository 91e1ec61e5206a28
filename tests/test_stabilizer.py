"""The coefficient MLP: adding it changes nothing, it trains, and it folds away."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, tiny_vit

import masasurgery
from masasurgery.scratch import init_dictionaries
from masasurgery.stabilizer import (
    CoefficientMLP,
    add_coefficient_mlp,
    fold_coefficient_mlp,
)
from masasurgery.tolerances import tolerance_for


def converted(**kwargs):
    model = tiny_vit(**kwargs)
    masasurgery.convert(model, atoms=2, verify=False)
    return model


def train(model, steps: int = 6, lr: float = 3e-3) -> list[float]:
    """AdamW on a fixed batch; the losses."""
    model.train()
    images, labels = image_batch(batch=8), torch.arange(8) % 4
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr
    )
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_adding_the_stabiliser_changes_no_output():
    model, x = converted(), image_batch()
    with torch.no_grad():
        before = model(x)

    summary = add_coefficient_mlp(model, hidden=16, embedding_dim=8)

    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert (summary.dictionaries, summary.coefficients) == (4, 12)


def test_each_mlp_and_embedding_is_a_parameter_once():
    model = converted()
    add_coefficient_mlp(model, hidden=16, embedding_dim=8)

    names = [n for n, _ in model.named_parameters()]
    mlp_names = [n for n in names if ".coefficient_mlp." in n]
    embeddings = [n for n in names if n.endswith(".embedding")]
    assert len(mlp_names) == 4 * 4 and all(n.startswith("masa.") for n in mlp_names)
    assert len(embeddings) == 12
    assert isinstance(model.masa.group0_q.coefficient_mlp, CoefficientMLP)
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))


def test_the_base_coefficients_are_frozen_unless_asked():
    frozen, trained = converted(), converted()

    add_coefficient_mlp(frozen)
    add_coefficient_mlp(trained, train_base=True)

    base = "parametrizations.q.original"
    assert not frozen.blocks[0].attn.qkv.coefficients.get_parameter(base).requires_grad
    assert trained.blocks[0].attn.qkv.coefficients.get_parameter(base).requires_grad


def test_training_with_the_stabiliser_reduces_the_loss_and_moves_coefficients():
    model = converted(num_classes=4)
    init_dictionaries(model, generator=torch.Generator().manual_seed(0))
    add_coefficient_mlp(model, generator=torch.Generator().manual_seed(0))
    coefficients = model.blocks[1].attn.proj.coefficients
    base = coefficients.get_parameter("parametrizations.o.original").detach().clone()

    losses = train(model)

    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(coefficients.get_parameter("parametrizations.o.original"), base)
    assert not torch.allclose(coefficients["o"], base)


def test_fold_keeps_outputs_structure_and_parameter_objects():
    model, x = converted(num_classes=4), image_batch()
    keys_before = list(model.state_dict())
    plan_before = masasurgery.plan_of(model)
    parameter = model.blocks[2].attn.qkv.coefficients["v"]
    add_coefficient_mlp(model)
    train(model, steps=2)
    model.eval()
    with torch.no_grad():
        stabilised = model(x)

    folded = fold_coefficient_mlp(model)

    assert folded == 12
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), stabilised, **vars(tolerance_for(torch.float32, "cpu"))
        )
    assert list(model.state_dict()) == keys_before
    assert masasurgery.plan_of(model) == plan_before
    assert model.blocks[2].attn.qkv.coefficients["v"] is parameter
    assert parameter.requires_grad
    assert not hasattr(model.masa.group0_v, "coefficient_mlp")
    assert fold_coefficient_mlp(model) == 0


def test_a_folded_model_saves_and_loads(tmp_path):
    model, x = converted(), image_batch()
    add_coefficient_mlp(model)
    train(model, steps=2)
    fold_coefficient_mlp(model)
    model.eval()

    masasurgery.save(model, tmp_path)
    fresh = tiny_vit()
    masasurgery.load(fresh, tmp_path)

    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_errors_say_what_to_do():
    model = converted()
    add_coefficient_mlp(model)

    with pytest.raises(masasurgery.ConfigError, match="fold_coefficient_mlp"):
        add_coefficient_mlp(model)
    with pytest.raises(masasurgery.ConfigError, match="before add_coefficient_mlp"):
        init_dictionaries(model)
    with pytest.raises(masasurgery.ConfigError, match="positive integer"):
        add_coefficient_mlp(converted(), hidden=0)


def test_a_deep_copy_reads_its_own_mlp():
    model, x = converted(), image_batch()
    add_coefficient_mlp(model)
    twin = copy.deepcopy(model)

    with torch.no_grad():
        twin.masa.group0_q.coefficient_mlp.fc2.bias.fill_(0.5)
        changed, same = twin(x), model(x)

    assert not torch.equal(changed, same)
    with torch.no_grad():
        offset = (
            twin.blocks[0].attn.qkv.coefficients["q"]
            - (model.blocks[0].attn.qkv.coefficients["q"])
        )
    torch.testing.assert_close(offset, torch.full((2,), 0.5))
