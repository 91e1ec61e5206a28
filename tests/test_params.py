"""Atoms, coefficients and biases are ordinary parameters, each stepped once."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, tiny_vit
from torch import nn

import masasurgery
from masasurgery.modules import AtomDictionary, DictionaryStore, SharedProjection
from masasurgery.params import param_groups, parameter_kinds, set_trainable
from masasurgery.stabilizer import add_coefficient_mlp
from masasurgery.tolerances import tolerance_for

LR, BETAS, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.999), 1e-8, 0.1


def converted(dtype: torch.dtype = torch.float32, **kwargs):
    model = tiny_vit(**kwargs).to(dtype)
    masasurgery.convert(model, atoms=2, verify=False)
    return model


def backward(model, images: torch.Tensor | None = None) -> None:
    if images is None:
        images = image_batch(batch=4)
    images = images.to(next(model.parameters()).dtype)
    F.cross_entropy(model(images), torch.arange(4)).backward()


def test_parameters_list_each_atom_tensor_once():
    model = converted()

    params = list(model.parameters())

    ids = [id(p) for p in params]
    assert len(ids) == len(set(ids))
    for dictionary in model.masa.values():
        assert ids.count(id(dictionary.atoms)) == 1
    kinds = parameter_kinds(model)
    assert sum(k == "atoms" for k in kinds.values()) == 4
    assert sum(k == "coefficients" for k in kinds.values()) == 12


def test_one_adamw_step_equals_the_hand_computation():
    model = converted(torch.float64)
    atoms = model.masa.group0_k.atoms
    coefficients = model.blocks[1].attn.qkv.coefficients["k"]
    backward(model)
    expected = {
        name: _adamw_by_hand(p.detach(), p.grad)
        for name, p in (("atoms", atoms), ("coefficients", coefficients))
    }

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    optimizer.step()

    tolerance = vars(tolerance_for(torch.float64, "cpu"))
    torch.testing.assert_close(atoms.detach(), expected["atoms"], **tolerance)
    torch.testing.assert_close(
        coefficients.detach(), expected["coefficients"], **tolerance
    )


def _adamw_by_hand(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """AdamW's first step: moments from zero, bias-corrected, decoupled decay."""
    b1, b2 = BETAS
    m = (1 - b1) * grad
    v = (1 - b2) * grad * grad
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)
    return p * (1 - LR * WEIGHT_DECAY) - LR * m_hat / (v_hat.sqrt() + EPS)


def test_the_atom_gradient_sums_every_block_that_reads_it():
    model = converted(torch.float64)
    dense = copy.deepcopy(model)
    masasurgery.materialize(dense)  # the same weights, as plain Linear layers

    images = image_batch(batch=4)
    backward(model, images)
    backward(dense, images)

    # d loss / d atoms[s] = sum over blocks l of c[l, s] * d loss / d W_l
    expected = sum(
        torch.einsum("s,oi->soi", block.attn.proj.coefficients["o"].detach(), grad)
        for block, grad in zip(
            model.blocks, [b.attn.proj.weight.grad for b in dense.blocks], strict=True
        )
    )
    torch.testing.assert_close(
        model.masa.group0_o.atoms.grad,
        expected,
        **vars(tolerance_for(torch.float64, "cpu")),
    )


def test_param_groups_list_every_trainable_tensor_once():
    model = converted()
    set_trainable(model, biases=False)

    groups = param_groups(model, weight_decay=0.05, lr=1e-3, lr_scale={"atoms": 2})

    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(trainable)
    by_name = {g["name"]: g for g in groups}
    assert "biases" not in by_name
    assert by_name["atoms"]["weight_decay"] == 0.05 and by_name["atoms"]["lr"] == 2e-3
    assert by_name["coefficients"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in by_name["rest_no_decay"]["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert id(model.blocks[0].norm1.weight) in no_decay
    assert id(model.blocks[0].mlp.fc1.weight) in {
        id(p) for p in by_name["rest"]["params"]
    }
    torch.optim.AdamW(groups)  # torch accepts them: no tensor in two groups


def test_param_groups_patterns_and_the_stabiliser():
    model = converted()
    add_coefficient_mlp(model)

    groups = param_groups(model, weight_decay=0.05, no_decay=("*mlp.fc1.weight",))

    by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    mlp = model.masa.group0_q.coefficient_mlp
    assert id(mlp.fc1.weight) in by_name["coefficients"]  # 2-D, yet no decay
    assert id(model.blocks[0].mlp.fc1.weight) in by_name["rest_no_decay"]
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})


@pytest.mark.parametrize("frozen", ["atoms", "coefficients"])
def test_a_frozen_kind_does_not_move_while_the_other_does(frozen):
    model = converted()
    summary = set_trainable(model, **{frozen: False})
    atoms = model.masa.group0_q.atoms
    coefficients = model.blocks[0].attn.qkv.coefficients["q"]
    before = {"atoms": atoms.detach().clone(), "coefficients": coefficients.clone()}

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    backward(model)
    optimizer.step()

    now = {"atoms": atoms.detach(), "coefficients": coefficients.detach()}
    moving = "coefficients" if frozen == "atoms" else "atoms"
    assert torch.equal(now[frozen], before[frozen])
    assert not torch.equal(now[moving], before[moving])
    assert summary.trainable[frozen] == 0 and summary.frozen[frozen] > 0


def test_set_trainable_leaves_unnamed_kinds_and_counts_elements():
    model = converted()

    set_trainable(model, rest=False)
    summary = set_trainable(model, atoms=False)

    assert summary.trainable["rest"] == 0
    assert summary.frozen["atoms"] == 4 * 2 * 192 * 192
    assert summary.trainable["coefficients"] == 3 * 4 * 2
    assert summary.trainable["biases"] == 3 * (576 + 192)
    assert "kind" in str(summary)


def test_lr_scale_needs_lr():
    with pytest.raises(masasurgery.ConfigError, match="pass lr="):
        param_groups(converted(), weight_decay=0.0, lr_scale={"atoms": 2.0})
    with pytest.raises(masasurgery.ConfigError, match="unknown kinds"):
        param_groups(converted(), weight_decay=0.0, lr=1.0, lr_scale={"atom": 2.0})


def test_residuals_are_their_own_kind_and_decay():
    dictionary = AtomDictionary(torch.randn(2, 4, 8), role="q")
    proj = SharedProjection(8, bias=torch.zeros(4))
    proj.add_shared(
        "q", dictionary, torch.ones(2), (torch.zeros(4, 1), torch.ones(1, 8))
    )
    model = nn.ModuleDict(
        {"masa": DictionaryStore({"group0_q": dictionary}), "p": proj}
    )

    kinds = parameter_kinds(model)
    summary = set_trainable(model, residuals=False)
    frozen_groups = param_groups(model, weight_decay=0.1)
    set_trainable(model, residuals=True)
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}

    assert kinds["p.residual_up.q"] == kinds["p.residual_down.q"] == "residuals"
    assert summary.frozen["residuals"] == 4 + 8
    assert "residuals" not in {g["name"] for g in frozen_groups}
    assert len(groups["residuals"]["params"]) == 2
    assert groups["residuals"]["weight_decay"] == 0.1
