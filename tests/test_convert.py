import pytest
import torch
from conftest import image_batch, set_fused_attn, tiny_vit
from conftest import same_state as _same_state
from conftest import snapshot as _state
from custom_models import NoAttention, SeparateQKV, Stack

import masasurgery
from masasurgery import ConfigError, NoAttentionError, SharedProjection
from masasurgery.tolerances import tolerance_for

# Plain timm ViTs: (model name, extra create_model kwargs)
TIMM_VITS = [
    ("vit_tiny_patch16_224", {}),
    ("vit_tiny_patch16_224", {"qkv_bias": False}),
    ("vit_tiny_patch16_224", {"qk_norm": True}),
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch14_dinov2", {"patch_size": 14, "img_size": 28}),
    ("vit_small_patch14_reg4_dinov2", {"patch_size": 14, "img_size": 28}),
]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "softmax"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    TIMM_VITS,
    ids=[f"{n}-{i}" for i, (n, _) in enumerate(TIMM_VITS)],
)
def test_timm_vits_convert_losslessly_at_atoms_equal_depth(name, kwargs, fused):
    model = tiny_vit(name, depth=3, **kwargs)
    set_fused_attn(model, fused)
    size = kwargs.get("img_size", 32)
    x = image_batch(size)
    expected = model(x)

    conversion = masasurgery.convert(model, atoms=3, example_inputs=x)

    assert type(model).__module__.startswith("timm.")
    assert conversion.verification.passed and conversion.lossless
    assert sum(isinstance(m, SharedProjection) for m in model.modules()) == 6
    tol = tolerance_for(torch.float32, "cpu")
    torch.testing.assert_close(model(x), expected, atol=tol.atol, rtol=tol.rtol)


def test_a_third_of_the_atoms_removes_two_thirds_of_the_shared_weights():
    model = tiny_vit(depth=6)
    conversion = masasurgery.convert(model, atoms=2, example_inputs=image_batch())
    p = conversion.params
    # 4 roles x 6 blocks x 192 x 192 weights -> 4 x 2 atoms + 4 x 6 x 2 coefficients
    assert p.shared_weights_before == 4 * 6 * 192 * 192
    assert p.shared_weights_after == 4 * 2 * 192 * 192 + 4 * 6 * 2
    assert p.shared_weights_reduction == pytest.approx(2 / 3, abs=1e-3)
    assert p.model_before - p.model_after == p.attention_before - p.attention_after
    assert p.model_after == sum(t.numel() for t in model.parameters())
    assert conversion.verification.rewrite_exact and not conversion.lossless
    assert "66.7% removed" in str(conversion)


def test_more_atoms_than_blocks_are_capped_and_reported():
    model = tiny_vit(depth=3)
    conversion = masasurgery.convert(model, atoms=8, example_inputs=image_batch())
    assert [r.atoms for r in conversion.capped] == [3, 3, 3, 3]
    assert conversion.lossless and conversion.verification.passed
    assert "atoms 8 was capped to 3 (lossless there)" in str(conversion)


def test_the_model_keeps_its_class_methods_and_config():
    model = tiny_vit(depth=3)
    cfg, num_features = model.pretrained_cfg, model.num_features
    masasurgery.convert(model, atoms=1, example_inputs=image_batch())
    assert model.pretrained_cfg is cfg and model.num_features == num_features
    assert model.forward_features(image_batch()).shape == (2, 17, 192)
    assert model.blocks[0].attn.qkv.weight.shape == (576, 192)


def test_timm_models_need_no_example_inputs():
    model = tiny_vit(depth=2)
    conversion = masasurgery.convert(model, atoms=2)
    assert conversion.verification.passed


def test_undo_restores_the_original_outputs():
    model = tiny_vit(depth=3)
    x = image_batch()
    expected, state = model(x), _state(model)
    conversion = masasurgery.convert(model, atoms=1, example_inputs=x)
    conversion.undo(model)
    assert _same_state(model, state) and torch.equal(model(x), expected)


@pytest.mark.parametrize("atoms", [0, 1.5, "3"])
def test_bad_atoms_change_nothing(atoms):
    model = tiny_vit(depth=3)
    state = _state(model)
    with pytest.raises(ConfigError):
        masasurgery.convert(model, atoms=atoms, example_inputs=image_batch())
    assert _same_state(model, state)


@pytest.mark.parametrize(
    ("model", "x", "found"),
    [
        (NoAttention(), torch.randn(2, 8), "found 0 attention blocks"),
        (
            Stack(SeparateQKV, depths=(1,)),
            torch.randn(2, 5, 32),
            "1 that repeat nowhere",
        ),
    ],
    ids=["no-attention", "one-block"],
)
def test_models_without_repeated_attention_are_refused_unchanged(model, x, found):
    state = _state(model)
    with pytest.raises(NoAttentionError, match=found) as info:
        masasurgery.convert(model, atoms=2, example_inputs=x)
    assert isinstance(info.value, ValueError) and "Nothing was changed" in str(
        info.value
    )
    assert _same_state(model, state) and not hasattr(model, "masa")


def test_models_without_an_input_size_ask_for_example_inputs():
    with pytest.raises(ConfigError, match="pass example_inputs="):
        masasurgery.convert(Stack(SeparateQKV, depths=(2,)), atoms=1)


def test_custom_stages_with_gqa_convert_per_stage():
    model = Stack(
        lambda d: SeparateQKV(d, heads=4, kv_heads=2), depths=(3, 2), dims=(32, 48)
    )
    x = torch.randn(2, 5, 32)
    conversion = masasurgery.convert(model, atoms=3, example_inputs=x)
    shapes = {(r.group, r.role): (r.shape, r.atoms) for r in conversion.roles}
    assert shapes[0, "k"] == ((16, 32), 3) and shapes[1, "k"] == ((24, 48), 2)
    assert conversion.verification.passed and conversion.lossless


def test_conversion_report_round_trips_to_plain_data():
    import json

    model = tiny_vit(depth=3)
    conversion = masasurgery.convert(model, atoms=1, example_inputs=image_batch())
    data = json.loads(json.dumps(conversion.to_dict()))
    assert data["config"] == {"atoms": 1, "roles": ["q", "k", "v", "o"]}
    assert data["params"]["shared_weights_reduction"] == pytest.approx(
        conversion.params.shared_weights_reduction
    )
    assert data["verification"]["rewrite_exact"] is True
    assert len(data["replaced"]) == 6


def test_releasing_the_originals_frees_them_and_forbids_undo():
    model = tiny_vit(depth=3)
    conversion = masasurgery.convert(
        model, atoms=1, example_inputs=image_batch(), keep_originals=False
    )
    assert conversion.verification.rewrite_exact  # verified before the release
    assert conversion.rewrite.originals == {}
    with pytest.raises(masasurgery.MasaError, match="cannot be undone"):
        conversion.undo(model)
    with pytest.raises(masasurgery.MasaError, match="nothing to verify against"):
        masasurgery.verify(model, conversion, image_batch())


def test_a_sequential_root_still_computes_the_same_function():
    from custom_models import Block

    model = torch.nn.Sequential(*[Block(SeparateQKV(32), 32) for _ in range(3)]).eval()
    x = torch.randn(2, 5, 32)
    expected = model(x)
    conversion = masasurgery.convert(model, atoms=3, example_inputs=x)
    assert conversion.verification.passed
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# A record used with the wrong model, and arguments that are not models


def _modules(model):
    return {name: module for name, module in model.named_modules()}


def test_undo_with_another_models_record_is_refused_and_changes_nothing():
    x = image_batch()
    converted, other = tiny_vit(depth=3), tiny_vit(depth=3)
    first = masasurgery.convert(converted, atoms=1, example_inputs=x)
    masasurgery.convert(other, atoms=1, example_inputs=x)
    fresh = tiny_vit(depth=3)

    for model in (other, fresh):
        state, modules = _state(model), _modules(model)
        with pytest.raises(
            masasurgery.ConversionMismatchError, match="does not belong to"
        ):
            first.undo(model)
        assert _same_state(model, state) and _modules(model) == modules
    assert isinstance(converted.blocks[0].attn.qkv, SharedProjection)


def test_undoing_twice_says_the_record_was_undone_already():
    model, x = tiny_vit(depth=3), image_batch()
    conversion = masasurgery.convert(model, atoms=1, example_inputs=x)
    conversion.undo(model)
    state = _state(model)
    with pytest.raises(masasurgery.ConversionMismatchError, match="undone already"):
        conversion.undo(model)
    assert _same_state(model, state)


def test_undo_with_the_record_of_an_earlier_conversion_keeps_the_new_one():
    model, x = tiny_vit(depth=3), image_batch()
    first = masasurgery.convert(model, atoms=1, example_inputs=x)
    masasurgery.materialize(model)
    masasurgery.convert(model, atoms=2, example_inputs=x)
    store, state = model.masa, _state(model)

    with pytest.raises(masasurgery.ConversionMismatchError, match="does not belong"):
        first.undo(model)
    assert model.masa is store and _same_state(model, state)


@pytest.mark.parametrize(
    ("model", "got"),
    [
        ("vit_tiny_patch16_224", "got str 'vit_tiny_patch16_224'"),
        ({"a": 1}, "got dict"),
        (None, "got None"),
    ],
    ids=["name", "state-dict", "none"],
)
def test_convert_refuses_what_is_not_a_model(model, got):
    with pytest.raises(ConfigError, match="expected a torch.nn.Module") as e:
        masasurgery.convert(model, atoms=1)
    assert got in str(e.value) and "build the model" in str(e.value)


def test_inputs_the_original_rejects_are_reported_before_any_rewriting():
    model = tiny_vit(depth=3)
    state, modules = _state(model), _modules(model)
    with pytest.raises(masasurgery.ModelRunError, match="before any rewriting") as e:
        masasurgery.convert(model, atoms=1, example_inputs=image_batch(64))
    message = str(e.value)
    assert "while verifying" not in message and ".." not in message
    assert "doesn't match model (32). Check" in message
    assert _same_state(model, state) and _modules(model) == modules


def test_a_residual_only_row_shows_its_ranks_and_no_energy():
    from masasurgery.convert import RoleFit, _role_row

    fit = RoleFit(0, "q", 3, (8, 8), 0, 0, 0.0, [0.1, 0.3, 0.2], 5, (2, 5, 3))
    row = _role_row(fit)
    assert row[4] == "0 + rank 2..5"
    assert row[5] == "-"  # no atoms: no energy share to show
    same = RoleFit(0, "q", 3, (8, 8), 2, 2, 0.5, [0.1, 0.3, 0.2], 4, (4, 4, 4))
    assert _role_row(same)[4:6] == ["2 + rank 4", "50.00%"]
