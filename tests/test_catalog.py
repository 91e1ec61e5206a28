"""The timm family list and the rule that says which modules are attention."""

import timm
import torch
from timm.layers import SEModule
from timm.models import _registry
from torch import nn

from masasurgery.zoo import catalog
from masasurgery.zoo.catalog import UNSUPPORTED, FamilyModel


class _Attention(nn.Module):  # the class name says it
    def forward(self, x):
        return x


class _Mixer(nn.Module):  # owns q and k projections
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn


def test_rank_puts_size_words_first_and_joins_x_small():
    names = [
        "edgenext_small_rw",
        "edgenext_base",
        "edgenext_xx_small",
        "edgenext_small",
    ]
    assert catalog.rank_variants(names)[0] == "edgenext_xx_small"
    assert catalog.smallest_variant(["fastvit_sa12", "fastvit_t8"]) == "fastvit_t8"


def test_attention_by_class_name_child_name_or_projections():
    assert catalog.attention_modules(_Block(_Attention())) == ["attn"]
    assert catalog.attention_modules(_Block(nn.Conv2d(4, 4, 1))) == ["attn"]
    assert catalog.attention_modules(nn.Sequential(_Mixer())) == ["0"]
    assert catalog.has_attention(nn.MultiheadAttention(8, 2))
    assert catalog.has_attention(nn.Sequential(nn.MultiheadAttention(8, 2)))


def test_channel_gates_and_placeholders_under_attn_are_not_attention():
    # byobnet / cspnet keep squeeze-excite at `attn`; ViTs an Identity
    assert not catalog.has_attention(_Block(SEModule(8)))
    assert not catalog.has_attention(_Block(nn.Identity()))
    with torch.device("meta"):
        resnest = timm.create_model("resnest14d")  # split attention: a gate
        convit = timm.create_model("convit_tiny")  # GPSA: no "Attention" in it
    assert not catalog.has_attention(resnest)
    assert "blocks.0.attn" in catalog.attention_modules(convit)


def test_the_family_list_names_registered_families_and_models():
    families = catalog.timm_families()
    registry = _registry._module_to_models
    assert len(families) >= 45
    for f in families:
        assert f.model in registry[f.family], f
    assert set(UNSUPPORTED) <= {f.family for f in families}


def test_family_records_round_trip_through_plain_data():
    family = FamilyModel(
        "vit", "vit_tiny_patch16_224", 5, {"img_size": 64}, (3, 64, 64)
    )
    assert FamilyModel.from_dict(family.to_dict()) == family
