"""init_dictionaries: random atoms and coefficients at the scale of a dense init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, tiny_vit
from torch import nn

import masasurgery
from masasurgery.modules import AtomDictionary, DictionaryStore, SharedProjection
from masasurgery.scratch import init_dictionaries

TIMM_STD = 0.02  # timm's ViT draws every Linear weight with trunc_normal(std=0.02)


def converted(atoms: int, depth: int = 3, **kwargs):
    model = tiny_vit(depth=depth, **kwargs)
    masasurgery.convert(model, atoms=atoms, verify=False)
    return model


def part_weights(model) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (name, role): m.part_weight(role).detach()
        for name, m in model.named_modules()
        if isinstance(m, SharedProjection)
        for role in m.coefficients
    }


@pytest.mark.parametrize("atoms", [1, 2, 3])
def test_every_composed_weight_has_the_dense_init_std(atoms):
    model = converted(atoms)

    summary = init_dictionaries(model, generator=torch.Generator().manual_seed(1))

    # atoms=1 and 2 of 3 blocks go through the PCA correction, 3 measures directly
    assert summary.dictionaries == 4 and summary.coefficients == 12
    for key, std in summary.stds.items():
        assert std == pytest.approx(TIMM_STD, rel=0.05), key
    for key, weight in part_weights(model).items():
        assert weight.std().item() == pytest.approx(TIMM_STD, rel=0.2), key


def test_a_given_std_is_used_and_a_second_call_keeps_the_scale():
    model = converted(2)

    init_dictionaries(model, std=0.05)
    again = init_dictionaries(model)

    # Random atoms are not orthonormal: measured as they are, not scaled up
    assert all(s == pytest.approx(0.05, rel=0.05) for s in again.stds.values())
    for key, weight in part_weights(model).items():
        assert weight.std().item() == pytest.approx(0.05, rel=0.2), key


def test_blocks_of_a_group_get_different_weights():
    model = converted(3)

    init_dictionaries(model)

    # With as many atoms as blocks the coefficient rows are orthonormal, so the
    # blocks' weights are uncorrelated, as independent dense draws would be
    weights = [
        w.flatten() for (_, role), w in part_weights(model).items() if role == "q"
    ]
    assert len(weights) == 3
    corr = torch.corrcoef(torch.stack(weights))
    off_diagonal = corr[~torch.eye(3, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.05


def test_fewer_atoms_than_blocks_still_give_distinct_blocks():
    model = converted(2)

    init_dictionaries(model)

    q = [w for (_, role), w in part_weights(model).items() if role == "q"]
    assert not torch.allclose(q[0], q[1]) and not torch.allclose(q[1], q[2])


def test_dtype_device_and_parameter_objects_are_kept():
    model = converted(2).double()
    atoms = model.masa.group0_q.atoms
    coefficients = model.blocks[0].attn.qkv.coefficients["q"]

    init_dictionaries(model)

    assert model.masa.group0_q.atoms is atoms and atoms.dtype == torch.float64
    assert model.blocks[0].attn.qkv.coefficients["q"] is coefficients
    assert coefficients.dtype == torch.float64
    assert coefficients.norm().item() == pytest.approx(1.0)


def test_a_generator_makes_the_draw_reproducible():
    first, second = converted(2), converted(2)

    # The two models' random weights differ, so fix the std too
    init_dictionaries(first, std=0.02, generator=torch.Generator().manual_seed(3))
    init_dictionaries(second, std=0.02, generator=torch.Generator().manual_seed(3))

    assert torch.equal(first.masa.group0_v.atoms, second.masa.group0_v.atoms)
    assert torch.equal(
        first.blocks[2].attn.proj.coefficients["o"],
        second.blocks[2].attn.proj.coefficients["o"],
    )


def test_a_few_sgd_steps_reduce_the_loss():
    model = converted(2, num_classes=4).train()
    init_dictionaries(model, generator=torch.Generator().manual_seed(0))
    images, labels = image_batch(batch=8), torch.arange(8) % 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.5 * losses[0]
    assert model.masa.group0_q.atoms.grad is not None


def test_errors_say_what_to_do():
    with pytest.raises(masasurgery.ConfigError, match="holds no AtomDictionary"):
        init_dictionaries(tiny_vit())
    with pytest.raises(masasurgery.ConfigError, match="positive"):
        init_dictionaries(converted(1), std=0.0)


def test_a_residual_is_switched_off():
    dictionary = AtomDictionary(torch.randn(2, 4, 8), role="q")
    proj = SharedProjection(8, bias=None)
    proj.add_shared(
        "q", dictionary, torch.ones(2), (torch.ones(4, 1), torch.ones(1, 8))
    )
    model = nn.ModuleDict(
        {"masa": DictionaryStore({"group0_q": dictionary}), "p": proj}
    )

    init_dictionaries(model, std=0.1)

    assert torch.equal(proj.residual_up["q"], torch.zeros(4, 1))
    torch.testing.assert_close(
        proj.weight, dictionary.compose(proj.coefficients["q"]), rtol=0, atol=0
    )
