import torch
from conftest import image_batch, tiny_vit
from custom_models import FusedKV, GlobalQuery, SeparateQKV, Stack
from masasurgery.passes import Inputs, capture, find_attention, group_sites


def _group(model, x):
    captured = capture(model, Inputs.of(x))
    return group_sites(captured, find_attention(captured).sites)


def test_repeated_vit_blocks_form_one_group_in_order():
    grouping = _group(tiny_vit(depth=4), image_batch())
    assert len(grouping.groups) == 1 and grouping.singletons == []
    group = grouping.groups[0]
    assert group.blocks == [f"blocks.{i}.attn" for i in range(4)]
    assert group.role_shape("q") == (192, 192)


def test_stages_of_different_widths_form_one_group_each():
    model = Stack(SeparateQKV, depths=(3, 2), dims=(32, 48))
    grouping = _group(model, torch.randn(2, 5, 32))
    assert [g.num_blocks for g in grouping.groups] == [3, 2]
    assert [g.role_shape("o") for g in grouping.groups] == [(32, 32), (48, 48)]


def test_different_attention_subgraphs_do_not_share_a_group():
    # Same widths, different wiring: a stage of FusedKV then a stage of SeparateQKV
    model = Stack(SeparateQKV, depths=(2,))
    model.stages.append(Stack(FusedKV, depths=(2,)).stages[0])
    model.downs.append(torch.nn.Identity())
    grouping = _group(model, torch.randn(2, 5, 32))
    assert [g.blocks[0].split(".")[1] for g in grouping.groups] == ["0", "1"]


def test_a_block_that_repeats_nowhere_is_a_singleton():
    model = Stack(SeparateQKV, depths=(2, 1), dims=(32, 48))
    grouping = _group(model, torch.randn(2, 5, 32))
    assert [g.num_blocks for g in grouping.groups] == [2]
    assert [s.block for s in grouping.singletons] == ["stages.1.0.attn"]


def test_blocks_that_lack_a_role_group_apart_from_full_blocks():
    # gcvit alternates local attention (q, k, v) and global attention, whose q
    # is no projection: the two kinds of blocks form two groups
    model = Stack(FusedKV, depths=(2,))
    model.stages.append(Stack(GlobalQuery, depths=(2,)).stages[0])
    model.downs.append(torch.nn.Identity())
    grouping = _group(model, torch.randn(2, 5, 32))
    assert [g.roles for g in grouping.groups] == [["q", "k", "v", "o"], ["k", "v", "o"]]
    assert [g.num_blocks for g in grouping.groups] == [2, 2]
