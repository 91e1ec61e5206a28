"""Sequential refit: each block refitted for the inputs the blocks before it give."""

import copy

import pytest
import torch
from conftest import image_batch, same_state, snapshot, tiny_llama, tiny_vit
from custom_models import Stack
from transformers import GPT2Config, GPT2LMHeadModel

from masasurgery.compress import compress, prepare_compression
from masasurgery.errors import ConfigError, ModelRunError


def _images(count=4, batch=4):
    return [image_batch(batch=batch) for _ in range(count)]


def _outputs(model, target, batches):
    """The outputs of one submodule over the batches, by a forward hook."""
    seen = []
    handle = model.get_submodule(target).register_forward_hook(
        lambda module, args, output: seen.append(output.detach().double())
    )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def test_the_refit_lowers_each_projection_error_against_the_original():
    original = tiny_vit(depth=4)
    data = _images()
    plan = prepare_compression(original, data, metric="output", center=False)
    plain, refitted = copy.deepcopy(original), copy.deepcopy(original)
    compress(plain, plan, ratio=0.6, verify=False)
    conversion = compress(refitted, plan, ratio=0.6, sequential=True)

    # Measured here, from the models' own outputs: ||X W^T - X~ W^^T|| per target
    deepest = [f"blocks.3.attn.{name}" for name in ("qkv", "proj")]
    for target in deepest:
        expected = _outputs(original, target, data)
        before = (_outputs(plain, target, data) - expected).norm()
        after = (_outputs(refitted, target, data) - expected).norm()
        assert after < before, target

    report = conversion.compression.sequential
    assert report.blocks == [f"blocks.{i}" for i in range(4)]
    assert report.chains == ["blocks.0"]
    assert len(report.parts) == 4 * 4  # q, k, v, o in every block
    assert all(p.after <= p.before for p in report.parts)
    assert conversion.verification.rewrite_exact  # the record follows the model
    assert "Sequential refit of 16 parts" in str(conversion.compression)
    assert conversion.to_dict()["compression"]["sequential"]["chains"] == ["blocks.0"]


def test_the_first_projections_keep_their_fit_and_the_output_one_improves():
    # Block 0's qkv sees the original inputs, so W* = W and nothing better
    # exists; its output projection reads what the compressed q, k, v give
    original = tiny_vit(depth=3)
    data = _images(count=3)
    conversion = compress(
        copy.deepcopy(original), data, ratio=0.5, sequential=True, metric="output"
    )
    parts = conversion.compression.sequential.parts
    qkv = [p for p in parts if p.target == "blocks.0.attn.qkv"]
    assert [p.role for p in qkv] == ["q", "k", "v"]
    assert all(abs(p.before - p.after) < 1e-6 for p in qkv)
    (proj,) = [p for p in parts if p.target == "blocks.0.attn.proj"]
    assert proj.after < proj.before


def test_a_stage_boundary_starts_a_new_chain():
    model = Stack(depths=(2, 2), dims=(32, 48)).eval()
    data = [torch.randn(2, 6, 32) for _ in range(3)]
    conversion = compress(model, data, ratio=0.5, sequential=True, metric="output")
    report = conversion.compression.sequential
    assert report.chains == ["stages.0.0", "stages.1.0"]
    assert conversion.verification.rewrite_exact


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_blocks_take_their_recorded_keywords(family):
    # Llama's layers get position_embeddings and masks as keywords; GPT-2's
    # Conv1D projections are refitted through their (in, out) layout
    if family == "llama":
        model = tiny_llama(layers=4, mlp=48)
    else:
        config = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64)
        model = GPT2LMHeadModel(config).eval()
    data = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(3)]
    conversion = compress(model, data, ratio=0.5, sequential=True, metric="output")
    report = conversion.compression.sequential
    assert len(report.blocks) == 4 and len(report.chains) == 1
    assert report.parts and not report.skipped
    assert conversion.verification.rewrite_exact


def test_a_plan_from_statistics_alone_is_refused():
    original = tiny_vit(depth=2)
    data = _images(count=2)
    statistics = prepare_compression(original, data, metric="output").statistics
    plan = prepare_compression(
        original, statistics, example_inputs=data[0], metric="output"
    )
    state = snapshot(original)
    with pytest.raises(ConfigError, match="sequential=True runs the model"):
        compress(original, plan, ratio=0.5, sequential=True)
    assert same_state(original, state)


def test_a_failing_refit_leaves_the_model_as_it_was():
    original = tiny_vit(depth=3)
    plan = prepare_compression(
        original, _images(count=2), metric="output", center=False
    )
    plan.batches.append(torch.randn(2, 3, 48, 48))  # not the model's size
    state = snapshot(original)
    with pytest.raises(ModelRunError, match="sequential refit"):
        compress(original, plan, ratio=0.5, sequential=True)
    assert same_state(original, state)
    assert not hasattr(original, "masa")
