import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masasurgery import AtomDictionary, DictionaryStore, MasaError, SharedProjection


class TwoLayers(nn.Module):
    """Two projections reading one dictionary, registered once in a store."""

    def __init__(self, dense_rows: bool = False):
        super().__init__()
        self.masa = DictionaryStore(
            {"group0_q": AtomDictionary(torch.randn(3, 4, 6), "q")}
        )
        self.layers = nn.ModuleList()
        for _ in range(2):
            proj = SharedProjection(6, bias=torch.randn(6 if dense_rows else 4))
            proj.add_shared("q", self.masa["group0_q"], torch.randn(3))
            if dense_rows:
                proj.add_dense("v", torch.randn(2, 6))
            self.layers.append(proj)

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([layer(x)[..., :4], x[..., 4:]], dim=-1)
        return x


def test_weight_is_the_mixture_of_atoms():
    model = TwoLayers()
    atoms = model.masa["group0_q"].atoms
    for layer in model.layers:
        c = layer.coefficients["q"]
        expected = sum(c[s] * atoms[s] for s in range(3))
        torch.testing.assert_close(layer.weight, expected)
        x = torch.randn(5, 6)
        torch.testing.assert_close(layer(x), F.linear(x, expected, layer.bias))


def test_dense_parts_follow_shared_rows():
    layer = TwoLayers(dense_rows=True).layers[0]
    assert layer.parts == ["q", "v"]
    assert layer.weight.shape == (6, 6) and layer.out_features == 6
    torch.testing.assert_close(layer.weight[4:], layer.dense["v"])


def test_atoms_appear_once_in_parameters_and_state_dict():
    model = TwoLayers()
    names = [name for name, _ in model.named_parameters()]
    assert names.count("masa.group0_q.atoms") == 1
    assert sum("atoms" in n for n in names) == 1
    assert sum("atoms" in k for k in model.state_dict()) == 1
    assert "layers.1.coefficients.q" in model.state_dict()


def test_gradients_reach_shared_atoms_from_every_layer():
    model = TwoLayers()
    model(torch.randn(2, 6)).sum().backward()
    assert model.masa["group0_q"].atoms.grad is not None
    assert all(layer.coefficients["q"].grad is not None for layer in model.layers)


def _shares(model: TwoLayers) -> bool:
    owner = model.masa["group0_q"]
    return all(layer.dictionaries["q"] is owner for layer in model.layers)


@pytest.mark.parametrize(
    "transform",
    [
        lambda m: copy.deepcopy(m),
        lambda m: m.to(torch.float64),
        lambda m: m.half(),
    ],
    ids=["deepcopy", "to-float64", "half"],
)
def test_sharing_survives_copies_and_casts(transform):
    model = TwoLayers()
    x = torch.randn(3, 6)
    expected = model(x)
    moved = transform(model)
    assert _shares(moved)
    dtype = moved.masa["group0_q"].atoms.dtype
    assert all(layer.weight.dtype == dtype for layer in moved.layers)
    tol = {torch.float16: 1e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(moved(x.to(dtype)).float(), expected, atol=tol, rtol=tol)


def test_load_state_dict_with_assign_keeps_one_atom_tensor():
    source, target = TwoLayers(), TwoLayers()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True), assign=True)
    assert _shares(target)
    x = torch.randn(2, 6)
    torch.testing.assert_close(target(x), source(x), atol=0.0, rtol=0.0)


def test_weight_cannot_be_assigned():
    layer = TwoLayers().layers[0]
    with pytest.raises(MasaError, match="cannot be assigned"):
        layer.weight = torch.zeros(4, 6)


def test_shape_checks_name_both_sides():
    d = AtomDictionary(torch.randn(2, 4, 6), "q")
    with pytest.raises(ValueError, match=r"in_features 6, projection has 5"):
        SharedProjection(5, bias=None).add_shared("q", d, torch.randn(2))
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
        SharedProjection(6, bias=None).add_shared("q", d, torch.randn(3))
    with pytest.raises(ValueError, match=r"\(S, out_features, in_features\)"):
        AtomDictionary(torch.randn(4, 6), "q")


def test_weight_cache_is_reused_and_never_stale():
    from masasurgery import set_weight_cache

    model = TwoLayers()
    layer = model.layers[0]
    assert set_weight_cache(model) == 2
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # served from the cache

        # An in-place update of the shared atoms invalidates every layer's cache
        model.masa["group0_q"].atoms.mul_(2.0)
        second = layer.weight
        assert second is not first
        torch.testing.assert_close(second, 2.0 * first)

        # So does an update of the layer's own coefficients
        layer.coefficients["q"].zero_()
        assert layer.weight.abs().max() == 0

    # Under autograd the weight is always composed, so gradients flow
    assert layer.weight is not layer.weight
    set_weight_cache(model, enabled=False)
    assert "_cache" not in layer.__dict__
