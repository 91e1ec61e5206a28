import pytest
import torch
from conftest import image_batch, set_fused_attn, tiny_vit
from custom_models import FusedKV, NoAttention, SeparateQKV, Stack
from masasurgery.passes import Inputs, capture, find_attention


def _find(model, x):
    return find_attention(capture(model, Inputs.of(x)))


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "softmax"])
def test_timm_fused_qkv_rows_split_in_q_k_v_order(fused):
    model = tiny_vit(depth=2)
    set_fused_attn(model, fused)
    found = _find(model, image_batch())
    assert [s.kind for s in found.sites] == ["sdpa" if fused else "softmax"] * 2
    site = found.sites[1]
    assert site.block == "blocks.1.attn"
    qkv, proj = site.projections
    assert qkv.target == "blocks.1.attn.qkv"
    assert qkv.roles == {"q": (0, 192), "k": (192, 384), "v": (384, 576)}
    assert proj.target == "blocks.1.attn.proj" and proj.roles == {"o": (0, 192)}
    assert (site.num_heads, site.head_dim) == (3, 64)


def test_qk_norm_and_layer_scale_do_not_hide_projections():
    model = tiny_vit(depth=2, qk_norm=True, init_values=1e-5)
    site = _find(model, image_batch()).sites[0]
    assert site.roles == ["q", "k", "v", "o"]


def test_separate_projections_with_grouped_kv_heads():
    model = Stack(lambda d: SeparateQKV(d, heads=4, kv_heads=2), depths=(2,))
    site = _find(model, torch.randn(2, 5, 32)).sites[0]
    assert site.kind == "softmax"
    assert {p.target.rsplit(".", 1)[1]: p.roles for p in site.projections} == {
        "q_proj": {"q": (0, 32)},
        "k_proj": {"k": (0, 16)},
        "v_proj": {"v": (0, 16)},
        "o_proj": {"o": (0, 32)},
    }


def test_fused_kv_rows_split_in_k_v_order():
    model = Stack(FusedKV, depths=(2,))
    site = _find(model, torch.randn(2, 5, 32)).sites[0]
    kv = site.projection_of("k")
    assert kv is site.projection_of("v")
    assert kv.roles == {"k": (0, 32), "v": (32, 64)}


def test_no_attention_finds_nothing():
    found = _find(NoAttention(), torch.randn(2, 8))
    assert found.sites == [] and found.skipped == []
