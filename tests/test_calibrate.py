"""Calibration statistics: exact X^T X per projection, bounded memory, cache."""

import pytest
import torch
from conftest import image_batch, projection_inputs, tiny_vit
from torch import nn

from masasurgery.calibrate import Calibration, collect_statistics
from masasurgery.errors import ConfigError, ModelRunError


def test_statistics_equal_xtx_of_the_projection_inputs():
    model = tiny_vit(depth=2)
    batches = [image_batch(), image_batch()]
    calibration = collect_statistics(model, batches)

    for target in ("blocks.0.attn.qkv", "blocks.1.attn.proj"):
        x = projection_inputs(model, target, batches).double()
        stats = calibration[target]
        assert stats.tokens == x.shape[0]
        torch.testing.assert_close(stats.xtx, x.T @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats.mean, x.mean(0))
        centered = (x - x.mean(0)).T @ (x - x.mean(0))
        torch.testing.assert_close(stats.centered(), centered, rtol=1e-5, atol=1e-4)
    assert calibration.targets == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
    ]


def test_bounded_memory_runs_several_passes_and_reads_back(tmp_path):
    model = tiny_vit(depth=2)
    batches = [image_batch()]
    full = collect_statistics(model, batches)

    # Each statistic is 192 * 192 * 8 bytes: one per pass
    bounded = collect_statistics(
        model, batches, cache_dir=tmp_path, max_bytes=192 * 192 * 8
    )
    assert bounded._memory == {}
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    for target in full.targets:
        assert torch.equal(bounded[target].xtx, full[target].xtx)

    # Saved statistics load lazily
    again = Calibration.load(tmp_path)
    assert sorted(again.targets) == sorted(full.targets)
    assert torch.equal(again["blocks.1.attn.qkv"].xtx, full["blocks.1.attn.qkv"].xtx)
    assert torch.equal(again["blocks.1.attn.qkv"].mean, full["blocks.1.attn.qkv"].mean)


def test_statistics_saved_without_the_input_sum_still_load(tmp_path):
    from safetensors.torch import save_file

    # As written before the sum was collected: X^T X and the token count only
    x = torch.randn(10, 4, dtype=torch.float64)
    tensors = {"xtx": x.T @ x, "tokens": torch.tensor([10])}
    save_file(tensors, tmp_path / "blocks.0.attn.qkv.safetensors")
    stats = Calibration.load(tmp_path)["blocks.0.attn.qkv"]
    assert stats.tokens == 10 and stats.mean is None
    with pytest.raises(ConfigError, match="no input sum"):
        stats.centered()


def test_one_shot_iterators_work_for_one_pass_and_are_refused_for_several(tmp_path):
    model = tiny_vit(depth=2)
    stats = collect_statistics(model, iter([image_batch(), image_batch()]))
    assert stats["blocks.0.attn.qkv"].tokens == 2 * 2 * 17

    with pytest.raises(ConfigError, match="one-shot iterator"):
        collect_statistics(
            model, iter([image_batch()]), cache_dir=tmp_path, max_bytes=192 * 192 * 8
        )


def test_bad_options_are_explained(tmp_path):
    model = tiny_vit(depth=2)
    with pytest.raises(ConfigError, match="cache_dir"):
        collect_statistics(model, [image_batch()], max_bytes=10**9)
    with pytest.raises(ConfigError, match="raise max_bytes"):
        collect_statistics(model, [image_batch()], cache_dir=tmp_path, max_bytes=8)
    with pytest.raises(ConfigError, match="no module"):
        collect_statistics(model, [image_batch()], targets=["blocks.9.attn.qkv"])
    with pytest.raises(ConfigError, match="nn.Linear"):
        collect_statistics(model, [image_batch()], targets=["blocks.0.norm1"])
    with pytest.raises(ConfigError, match="at least one batch"):
        collect_statistics(model, [], targets=["blocks.0.attn.qkv"])
    with pytest.raises(ModelRunError, match="calibration batch 0"):
        collect_statistics(
            model, [torch.randn(1, 5, 32, 32)], targets=["blocks.0.attn.qkv"]
        )
    with pytest.raises(ConfigError, match="holds no calibration"):
        Calibration.load(tmp_path)


def test_multihead_attention_reads_the_query():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    stats = collect_statistics(model, [x], targets=["layers.0.self_attn"])
    flat = x.reshape(-1, 16).double()
    torch.testing.assert_close(
        stats["layers.0.self_attn"].xtx, flat.T @ flat, rtol=1e-5, atol=1e-5
    )


def test_a_batch_the_model_cannot_take_is_named():
    model = tiny_vit(depth=2)
    with pytest.raises(ModelRunError, match="batch 0: .*a tensor, a tuple"):
        collect_statistics(model, ["not an image"])
