import pytest
import torch
from conftest import image_batch, tiny_vit
from custom_models import HalfHidden
from masasurgery.passes import Inputs, capture
from torch import nn

from masasurgery import CaptureError


def test_fx_capture_records_shapes_and_sizes():
    model = tiny_vit()
    captured = capture(model, Inputs.of(image_batch()))
    assert captured.path == "fx" and captured.failures == {}
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    qkv = [
        n for n in nodes.values() if n.op == "call_module" and n.target.endswith("qkv")
    ]
    assert qkv and qkv[0].meta["tensor_meta"].shape == (2, 17, 576)
    sizes = [
        n.meta["value"] for n in nodes.values() if isinstance(n.meta.get("value"), int)
    ]
    assert 17 in sizes  # the token count, read from x.shape


def test_capture_shares_the_models_modules_and_leaves_it_alone():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(model, Inputs.of(image_batch()))
    assert captured.gm.get_submodule("blocks.0.attn.qkv") is model.blocks[0].attn.qkv
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace a branch on a tensor's value
            return self.lin(x)
        return x


def test_a_model_no_path_can_read_fails_with_each_reason():
    with pytest.raises(
        CaptureError, match=r"every path failed:\n  fx: TraceError"
    ) as info:
        capture(DataDependent(), Inputs.of(torch.randn(2, 4)))
    assert isinstance(info.value, RuntimeError)
    assert "example inputs" in str(info.value)


def test_inputs_accept_tensors_tuples_and_keywords():
    x = torch.randn(1, 2)
    assert Inputs.of(x).args == (x,)
    assert Inputs.of((x, x)).args == (x, x)
    assert Inputs.of({"pixel_values": x}).kwargs == {"pixel_values": x}


def test_fx_names_the_leaves_that_own_projections():
    captured = capture(HalfHidden(), Inputs.of(torch.randn(1, 5, 32)), paths=["fx"])
    assert captured.hidden == ["mha.0", "mha.1"]
    exported = capture(HalfHidden(), Inputs.of(torch.randn(1, 5, 32)), ["export"])
    assert exported.hidden == []
