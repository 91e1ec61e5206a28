import pytest
import torch
from conftest import image_batch, set_fused_attn, tiny_vit
from custom_models import (
    ChannelsFirst,
    CosineRotary,
    Factorized,
    FusedKV,
    GatedPositional,
    GlobalQuery,
    HaloWindows,
    InterleavedHeads,
    NoAttention,
    PooledQuery,
    PrefixRotary,
    ResidualQuery,
    SeparateQKV,
    SharedLayer,
    Stack,
    TalkingHeads,
)
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


def _roles(site):
    """``{projection name: roles}``, by the last part of each qualified name."""
    return {p.target.rsplit(".", 1)[1]: p.roles for p in site.projections}


QKV_32 = {"q": (0, 32), "k": (32, 64), "v": (64, 96)}


@pytest.mark.parametrize(
    ("make", "x", "expected"),
    [
        # A concatenation is followed into every input (rotary on tokens 1..N)
        (PrefixRotary, torch.randn(2, 5, 32), {"qkv": QKV_32, "proj": {"o": (0, 32)}}),
        # Reductions and pooling over tokens keep each channel's row
        (PooledQuery, torch.randn(2, 6, 32), {"qkv": QKV_32, "proj": {"o": (0, 32)}}),
        # Constant padding holds no row; Tensor.unfold is data movement
        (
            HaloWindows,
            torch.randn(2, 6, 32),
            {"q": {"q": (0, 32)}, "kv": {"k": (0, 32), "v": (32, 64)}},
        ),
    ],
    ids=["prefix_rotary", "pooled_query", "halo_windows"],
)
def test_walks_through_concat_pooling_and_padding(make, x, expected):
    site = _find(Stack(make, depths=(2,)), x).sites[0]
    assert {k: v for k, v in _roles(site).items() if k in expected} == expected


def test_head_mixing_linears_are_part_of_the_core_not_projections():
    # cait's talking heads: proj_l / proj_w mix the heads of the scores
    site = _find(Stack(TalkingHeads, depths=(2,)), torch.randn(2, 5, 32)).sites[0]
    targets = [p.target.rsplit(".", 2)[1:] for p in site.projections]
    assert targets == [
        ["q", "linear"],
        ["k", "linear"],
        ["v", "linear"],
        ["attn", "proj"],
    ]
    assert site.roles == ["q", "k", "v", "o"]


def test_probabilities_reach_v_through_gating_and_renormalisation():
    # convit's GPSA: the softmax meets v after elementwise mixing
    site = _find(Stack(GatedPositional, depths=(2,)), torch.randn(2, 5, 32)).sites[0]
    assert _roles(site) == {
        "qk": {"q": (0, 32), "k": (32, 64)},
        "v": {"v": (0, 32)},
        "proj": {"o": (0, 32)},
    }


class _Conv(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.blocks = torch.nn.Sequential(ChannelsFirst(dim), ChannelsFirst(dim))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("path", ["fx", "export"])
def test_1x1_convolutions_are_projections_with_rows_on_channels(path):
    # shvit / efficientvit: conv + BatchNorm qkv, a depthwise conv on q, the
    # probabilities as the second operand of the value matmul
    captured = capture(_Conv(), Inputs.of(torch.randn(1, 16, 4, 4)), paths=[path])
    site = find_attention(captured).sites[1]
    qkv, proj = site.projections
    assert (qkv.target, qkv.layout) == ("blocks.1.qkv.0", "conv1x1")
    assert qkv.roles == {"q": (0, 8), "k": (8, 16), "v": (16, 32)}
    assert (proj.target, proj.roles) == ("blocks.1.proj.1", {"o": (0, 16)})


def test_a_role_without_a_projection_is_left_out_of_its_site():
    # gcvit's global attention: q is learned, and "qkv" holds k and v only
    site = _find(Stack(GlobalQuery, depths=(2,)), torch.randn(2, 5, 32)).sites[0]
    assert site.roles == ["k", "v", "o"]
    assert _roles(site)["qkv"] == {"k": (0, 32), "v": (32, 64)}


def test_a_projection_plus_a_shortcut_is_not_the_projection_of_q():
    site = _find(Stack(ResidualQuery, depths=(2,)), torch.randn(2, 5, 32)).sites[0]
    assert site.roles == ["k", "v"]


def test_a_projection_that_feeds_several_cores_belongs_to_none():
    found = _find(SharedLayer(), torch.randn(2, 5, 32))
    assert found.sites == [] and len(found.skipped) == 3
    assert "also feed other attention cores" in found.skipped[0].reason


def test_rows_interleaved_per_head_are_skipped_with_the_reason():
    found = _find(Stack(InterleavedHeads, depths=(2,)), torch.randn(2, 5, 32))
    assert found.sites == []
    assert "that are not contiguous" in found.skipped[0].reason


def test_a_linear_with_batchnorm_and_reshape_as_is_a_projection():
    # levit's LinearNorm: bn(x.flatten(0, 1)).reshape_as(x)
    site = _find(Stack(TalkingHeads, depths=(2,)), torch.randn(2, 5, 32)).sites[0]
    assert site.projection_of("q").target.endswith("attn.q.linear")


def test_factorized_attention_reads_k_from_the_softmax_and_q_from_the_last_matmul():
    site = _find(Stack(Factorized, depths=(2,)), torch.randn(2, 5, 32)).sites[0]
    assert site.kind == "factorized"
    assert _roles(site) == {"qkv": QKV_32, "proj": {"o": (0, 32)}}


def test_a_norm_of_the_tensor_itself_and_a_constant_table_are_not_data():
    # x / x.norm(...).expand_as(x): the norm derives from the walked tensor;
    # k * cos with cos as large as k: cos is computed from constants
    site = _find(Stack(CosineRotary, depths=(2,)), torch.randn(2, 5, 32)).sites[0]
    assert _roles(site) == {"q": {"q": (0, 32)}, "kv": {"k": (0, 8), "v": (8, 16)}}
