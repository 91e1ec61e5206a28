"""Each projection layout: read its rows, build its replacement, same outputs."""

import pytest
import torch
from masasurgery.passes.layouts import LAYOUTS, read_rows
from torch import nn
from transformers.pytorch_utils import Conv1D

from masasurgery import AtomDictionary, SharedConv1D, SharedMultiheadAttention


def _linear():
    return nn.Linear(8, 12)


def _conv1d():
    conv = Conv1D(nf=12, nx=8)
    nn.init.normal_(conv.bias)
    return conv


def _mha():
    mha = nn.MultiheadAttention(8, num_heads=2, batch_first=True)
    nn.init.normal_(mha.in_proj_bias)
    return mha


def _replace(module, layout_name):
    """Replace ``module`` by a shared copy whose atoms are its own rows (lossless)."""
    layout = LAYOUTS[layout_name]
    weight = layout.weight(module)  # (out, in)
    new = layout.replacement(module)
    rows = weight.shape[0] // 3 if layout_name == "mha_in_proj" else weight.shape[0]
    for i, role in enumerate(("q", "k", "v")[: weight.shape[0] // rows]):
        block = read_rows(module, layout_name, i * rows, (i + 1) * rows).detach()
        new.add_shared(role, AtomDictionary(block[None].clone(), role), torch.ones(1))
    return layout.install(module, new)


@pytest.mark.parametrize(
    ("make", "name", "cls"),
    [(_linear, "linear", nn.Module), (_conv1d, "conv1d", SharedConv1D)],
    ids=["linear", "conv1d"],
)
def test_projection_layouts_keep_weight_layout_and_outputs(make, name, cls):
    module = make()
    new = _replace(module, name)
    assert isinstance(new, cls)
    assert new.weight.shape == module.weight.shape  # (in, out) for Conv1D
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(new(x), module(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(LAYOUTS[name].bias(new), module.bias)


def test_conv1d_rows_are_columns_of_the_stored_weight():
    conv = _conv1d()
    torch.testing.assert_close(read_rows(conv, "conv1d", 4, 8), conv.weight[:, 4:8].T)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_multihead_attention_reads_its_packed_weight_from_atoms(training):
    mha = _mha().train(training)
    new = _replace(mha, "mha_in_proj")
    assert isinstance(new, SharedMultiheadAttention) and new.in_proj.parts == [
        "q",
        "k",
        "v",
    ]
    assert "in_proj_weight" not in dict(new.named_parameters())
    assert (
        mha.in_proj_weight is dict(mha.named_parameters())["in_proj_weight"]
    )  # untouched
    torch.testing.assert_close(new.in_proj_weight, mha.in_proj_weight)
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    expected = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(new(x, x, x, need_weights=False)[0], expected)


def test_multihead_attention_with_its_own_kdim_is_refused():
    mha = nn.MultiheadAttention(8, num_heads=2, kdim=4, vdim=4)
    with pytest.raises(NotImplementedError, match="kdim/vdim"):
        SharedMultiheadAttention.from_module(
            mha, LAYOUTS["linear"].replacement(nn.Linear(8, 8))
        )
