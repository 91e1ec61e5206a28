import importlib

import pytest
import torch
from conftest import image_batch, tiny_vit
from masasurgery.passes import restore, rewrite
from masasurgery.passes.layouts import read_rows
from torch import nn

from masasurgery import (
    AlreadyConvertedError,
    DictionaryStore,
    MasaError,
    SharedProjection,
)
from masasurgery.analyze import analyze
from masasurgery.fit import matrix_pca


def _fits(model, analysis, atoms, roles=("q", "k", "v", "o")):
    fits = {}
    for group in analysis.groups:
        for role in roles:
            weights = []
            for site in group.sites:
                p = site.projection_of(role)
                weights.append(
                    read_rows(model.get_submodule(p.target), p.layout, *p.roles[role])
                )
            fits[group.index, role] = matrix_pca(weights, atoms)
    return fits


def test_rewrite_keeps_the_model_object_and_registers_atoms_once():
    model = tiny_vit(depth=3)
    analysis = analyze(model, image_batch())
    done = rewrite(model, analysis.groups, _fits(model, analysis, 3))
    assert type(model).__name__ == "VisionTransformer" and hasattr(
        model, "forward_features"
    )
    assert isinstance(model.masa, DictionaryStore) and set(model.masa) == {
        "group0_q",
        "group0_k",
        "group0_v",
        "group0_o",
    }
    assert isinstance(model.blocks[2].attn.qkv, SharedProjection)
    assert model.blocks[2].attn.qkv.parts == ["q", "k", "v"]
    atom_names = [n for n, _ in model.named_parameters() if n.endswith("atoms")]
    assert len(atom_names) == 4
    assert set(done.originals) == {
        f"blocks.{i}.attn.{p}" for i in range(3) for p in ("qkv", "proj")
    }


def test_roles_left_out_stay_dense_inside_a_fused_projection():
    model = tiny_vit(depth=3)
    analysis = analyze(model, image_batch())
    original_v = model.blocks[1].attn.qkv.weight[384:].clone()
    rewrite(model, analysis.groups, _fits(model, analysis, 2, roles=("q", "k")))
    qkv = model.blocks[1].attn.qkv
    assert qkv.parts == ["q", "k", "v"] and list(qkv.dense) == ["v"]
    assert torch.equal(qkv.weight[384:], original_v)
    assert isinstance(model.blocks[1].attn.proj, nn.Linear)  # o not shared: untouched


def test_restore_puts_the_original_modules_back():
    model = tiny_vit(depth=3)
    x = image_batch()
    expected = model(x)
    analysis = analyze(model, x)
    originals = {n: m for n, m in model.named_modules() if n.endswith(("qkv", "proj"))}
    done = rewrite(model, analysis.groups, _fits(model, analysis, 1))
    restore(model, done)
    assert not hasattr(model, "masa")
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(model(x), expected)


def test_converting_twice_is_refused():
    model = tiny_vit(depth=3)
    analysis = analyze(model, image_batch())
    rewrite(model, analysis.groups, _fits(model, analysis, 2))
    with pytest.raises(AlreadyConvertedError, match="already converted"):
        rewrite(model, analysis.groups, _fits(model, analysis, 2))


def test_an_attribute_named_masa_is_not_overwritten():
    model = tiny_vit(depth=3)
    model.masa = nn.Linear(2, 2)
    analysis = analyze(model, image_batch())
    with pytest.raises(MasaError, match="already has an attribute 'masa'"):
        rewrite(model, analysis.groups, _fits(model, analysis, 2))
    assert isinstance(model.masa, nn.Linear)


def test_a_failing_build_leaves_the_model_as_it_was():
    model = tiny_vit(depth=3)
    analysis = analyze(model, image_batch())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # The last block's projection vanishes between analysis and rewrite
    del model.blocks[2].attn.proj
    model.blocks[2].attn.register_module("proj", None)
    with pytest.raises(AttributeError):
        rewrite(model, analysis.groups, _fits_partial(model, analysis))
    assert not hasattr(model, "masa")
    assert not any(isinstance(m, SharedProjection) for m in model.modules())
    kept = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(kept[k], state[k]) for k in kept)


def _fits_partial(model, analysis):
    # Fit from saved weights: the model itself lost a module
    group = analysis.groups[0]
    fits = {}
    for role in ("q", "k", "v", "o"):
        shape = group.role_shape(role)
        fits[0, role] = matrix_pca([torch.randn(*shape) for _ in group.sites], 2)
    return fits


def test_a_swap_that_fails_half_way_is_rolled_back(monkeypatch):
    # The package re-exports the function under the module's name
    rewrite_module = importlib.import_module("masasurgery.passes.rewrite")

    model = tiny_vit(depth=3)
    x = image_batch()
    expected = model(x)
    analysis = analyze(model, x)
    fits = _fits(model, analysis, 2)
    calls = []
    real = rewrite_module._set_submodule

    def flaky(root, target, module):
        calls.append(target)
        if len(calls) == 3:
            raise RuntimeError("simulated failure in the third swap")
        real(root, target, module)

    monkeypatch.setattr(rewrite_module, "_set_submodule", flaky)
    with pytest.raises(RuntimeError, match="third swap"):
        rewrite(model, analysis.groups, fits)
    assert not hasattr(model, "masa")
    assert not any(isinstance(m, SharedProjection) for m in model.modules())
    assert torch.equal(model(x), expected)
