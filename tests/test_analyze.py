import json

import pytest
import torch
from conftest import image_batch, tiny_vit
from custom_models import HalfHidden, SeparateQKV, Stack

import masasurgery


def test_analysis_shows_groups_roles_and_shapes_before_anything_changes():
    model = tiny_vit(depth=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    analysis = masasurgery.analyze(model, image_batch())

    assert analysis.capture_path == "fx" and len(analysis.sites) == 4
    text = str(analysis)
    assert "4 attention blocks in 1 group (captured with fx)" in text
    assert "blocks.0.attn .. blocks.3.attn" in text and "192x192 qkv" in text
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    data = json.loads(json.dumps(analysis.to_dict()))
    assert data["groups"][0]["roles"]["o"] == [192, 192]


def test_analysis_restores_train_mode():
    model = tiny_vit(depth=2).train()
    masasurgery.analyze(model, image_batch())
    assert all(m.training for m in model.modules())


def test_singletons_are_listed_as_left_alone():
    model = Stack(SeparateQKV, depths=(2, 1), dims=(32, 48))
    analysis = masasurgery.analyze(model, torch.randn(1, 5, 32))
    assert "left alone (repeats nowhere): stages.1.0.attn" in str(analysis)


def test_attention_hidden_in_fx_leaves_is_found_by_export():
    analysis = masasurgery.analyze(HalfHidden().eval(), torch.randn(1, 5, 32))
    assert analysis.capture_path == "export" and len(analysis.sites) == 4


def test_a_name_or_none_is_not_a_model():
    with pytest.raises(masasurgery.ConfigError, match="got str 'vit'; build the"):
        masasurgery.analyze("vit", image_batch())
    with pytest.raises(masasurgery.ConfigError, match="expected a torch.nn.Module"):
        masasurgery.analyze(None)


def test_a_converted_model_is_refused_as_such():
    model = tiny_vit(depth=3)
    masasurgery.convert(model, atoms=1, example_inputs=image_batch(), verify=False)
    with pytest.raises(
        masasurgery.AlreadyConvertedError, match="already converted: 6 of its"
    ):
        masasurgery.analyze(model, image_batch())
