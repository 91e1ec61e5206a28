import copy
import importlib.util
import io
import warnings

import pytest
import torch
from conftest import image_batch, tiny_vit
from torch import nn

import masasurgery
from masasurgery import LayoutError, SharedProjection
from masasurgery.tolerances import tolerance_for


def _converted(depth=3, atoms=2, **kwargs):
    model = tiny_vit(depth=depth, **kwargs)
    masasurgery.convert(model, atoms=atoms, example_inputs=image_batch(), verify=False)
    return model


def test_materialize_gives_back_linears_with_the_same_outputs():
    model = _converted()
    x = image_batch()
    expected = model(x)

    done = masasurgery.materialize(model)

    assert not hasattr(model, "masa")
    assert not any(isinstance(m, SharedProjection) for m in model.modules())
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    assert set(done.layouts.values()) == {"linear"} and len(done.modules) == 6
    assert torch.equal(model(x), expected)


def test_the_materialized_state_dict_loads_into_the_original_architecture():
    model = _converted()
    x = image_batch()
    expected = model(x)
    masasurgery.materialize(model)

    fresh = tiny_vit(depth=3)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert list(fresh.state_dict()) == list(model.state_dict())
    assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable", [True, False])
def test_dtype_device_and_requires_grad_are_kept(dtype, trainable):
    model = _converted().to(dtype).requires_grad_(trainable)
    model.blocks[0].attn.qkv.bias.requires_grad_(True)
    masasurgery.materialize(model)
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.dtype == dtype and qkv.weight.device.type == "cpu"
    assert qkv.weight.requires_grad is trainable and qkv.bias.requires_grad


def test_a_model_without_shared_projections_is_left_alone():
    model, x = tiny_vit(depth=2), image_batch()
    expected, qkv = model(x), model.blocks[0].attn.qkv
    done = masasurgery.materialize(model)
    assert done.modules == {} and model.blocks[0].attn.qkv is qkv
    assert torch.equal(model(x), expected)


def test_a_layout_without_a_dense_builder_changes_nothing():
    model = _converted()
    model.blocks[1].attn.proj.layout = "no_such_layout"
    modules = dict(model.named_modules())
    with pytest.raises(LayoutError, match="blocks.1.attn.proj has layout 'no_such"):
        masasurgery.materialize(model)
    assert dict(model.named_modules()) == modules


def test_materialize_after_load_uses_the_saved_layouts(tmp_path):
    model = _converted()
    x = image_batch()
    masasurgery.save(model, tmp_path)
    fresh = tiny_vit(depth=3)
    masasurgery.load(fresh, tmp_path)
    masasurgery.materialize(fresh)
    assert type(fresh.blocks[2].attn.proj) is nn.Linear
    assert torch.equal(fresh(x), model(x))


def test_a_materialized_model_can_be_converted_again():
    model = _converted(atoms=3)
    masasurgery.materialize(model)
    conversion = masasurgery.convert(model, atoms=3, example_inputs=image_batch())
    assert conversion.verification.passed and conversion.lossless


# ---------------------------------------------------------------------------
# Export


def test_torch_export_of_the_materialized_model():
    model = _converted()
    masasurgery.materialize(model)
    x = image_batch()

    program = torch.export.export(model, (x,))

    assert torch.equal(program.module()(x), model(x))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in targets


def _onnx_run(model, x, **kwargs):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter says it is deprecated, and traces timm's asserts
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, input_names=["x"], **kwargs)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    return torch.from_numpy(ReferenceEvaluator(proto).run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize(
    "dynamo",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                importlib.util.find_spec("onnxscript") is None,
                reason="the torch.export-based ONNX exporter needs onnxscript "
                "(pip install onnxscript==0.7.2)",
            ),
        ),
    ],
    ids=["torchscript", "dynamo"],
)
def test_onnx_export_of_the_materialized_model_runs_the_same(dynamo):
    model = _converted()
    masasurgery.materialize(model)
    x = image_batch()
    with torch.no_grad():
        expected = model(x)

    actual = _onnx_run(copy.deepcopy(model), x, dynamo=dynamo)

    # The ONNX reference runtime reorders float32 sums
    tol = tolerance_for(torch.float32, "cpu")
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100)
    return GPT2LMHeadModel(config).eval(), {"input_ids": torch.randint(0, 100, (2, 7))}


def _encoder():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 3).eval(), (torch.randn(2, 5, 32),)


@pytest.mark.parametrize(
    ("make", "dense_type"),
    [(_gpt2, "Conv1D"), (_encoder, "MultiheadAttention")],
    ids=["gpt2-conv1d", "encoder-mha"],
)
def test_other_layouts_materialize_to_their_original_module_types(make, dense_type):
    model, inputs = make()
    masasurgery.convert(model, atoms=2, example_inputs=inputs, verify=False)
    with torch.no_grad():
        expected = _call(model, inputs)
    done = masasurgery.materialize(model)
    assert dense_type in {type(m).__name__ for m in done.modules.values()}
    assert not any(isinstance(m, SharedProjection) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(_call(model, inputs), expected, atol=1e-6, rtol=1e-6)


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.logits if hasattr(out, "logits") else out


def test_materialize_refuses_what_is_not_a_model():
    with pytest.raises(masasurgery.ConfigError, match="got str 'vit_tiny"):
        masasurgery.materialize("vit_tiny_patch16_224")
