import copy
import io
import json
import pickle

import pytest
import torch
from conftest import image_batch, tiny_vit
from conftest import same_state as _same_state
from conftest import snapshot as _state
from custom_models import SeparateQKV, Stack
from safetensors.torch import load_file, save_file
from torch import nn

import masasurgery
from masasurgery import (
    AlreadyConvertedError,
    CheckpointError,
    ConfigError,
    SharedProjection,
)
from masasurgery.tolerances import tolerance_for


def _converted(depth=3, atoms=2, **kwargs):
    model = tiny_vit(depth=depth, **kwargs)
    # The conversion itself is verified in test_convert
    x = image_batch()
    conversion = masasurgery.convert(model, atoms=atoms, example_inputs=x, verify=False)
    return model, conversion


def _assert_shares_atoms(model):
    """Every shared part reads the store's dictionary; each atom tensor once."""
    store = model.masa
    for module in model.modules():
        if not isinstance(module, SharedProjection):
            continue
        for role, dictionary in module.dictionaries.items():
            assert any(dictionary is d for d in store.values()), role
            assert dictionary.atoms.dtype == module.coefficients[role].dtype
    atoms = [d.atoms for d in store.values()]
    parameters = list(model.parameters())
    for a in atoms:
        assert sum(p is a for p in parameters) == 1
    names = [n for n, _ in model.named_parameters() if n.endswith(".atoms")]
    assert names == [f"masa.{key}.atoms" for key in store]


# ---------------------------------------------------------------------------
# masasurgery.save / masasurgery.load


def test_save_then_load_is_bit_exact(tmp_path):
    model, conversion = _converted()
    x = image_batch()
    masasurgery.save(model, tmp_path, conversion=conversion)

    fresh = tiny_vit(depth=3)
    checkpoint = masasurgery.load(fresh, tmp_path)

    assert _same_state(fresh, model.state_dict())
    assert list(fresh.state_dict()) == list(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    _assert_shares_atoms(fresh)
    assert checkpoint.config == conversion.config
    assert masasurgery.plan_of(fresh) == masasurgery.plan_of(model)


def test_the_files_hold_atoms_once_and_a_plain_json_plan(tmp_path):
    model, conversion = _converted(atoms=2)
    saved = masasurgery.save(model, tmp_path, conversion=conversion)

    tensors = load_file(saved.weights_file)
    assert set(tensors) == set(model.state_dict())
    assert sum(k.endswith(".atoms") for k in tensors) == 4
    assert not any(k.endswith("qkv.weight") for k in tensors)

    data = json.loads(saved.plan_file.read_text())
    assert data["format"] == "masasurgery" and data["format_version"] == 1
    assert data["config"] == {"atoms": 2, "roles": ["q", "k", "v", "o"]}
    assert data["aliases"] == {}
    qkv = data["plan"]["projections"][0]
    assert qkv["target"] == "blocks.0.attn.qkv" and qkv["layout"] == "linear"
    assert [p["dictionary"] for p in qkv["parts"]] == [
        "group0_q",
        "group0_k",
        "group0_v",
    ]


def test_the_file_size_shrinks_by_the_parameters_removed(tmp_path):
    model = tiny_vit(depth=6)
    save_file(model.state_dict(), tmp_path / "original.safetensors")
    x = image_batch()
    conversion = masasurgery.convert(model, atoms=2, example_inputs=x, verify=False)
    saved = masasurgery.save(model, tmp_path / "converted", conversion=conversion)

    original = (tmp_path / "original.safetensors").stat().st_size
    removed = conversion.params.model_before - conversion.params.model_after
    # 4 bytes per float32 removed; the headers differ by a few hundred bytes
    assert original - saved.num_bytes == pytest.approx(4 * removed, abs=4096)
    p = conversion.params
    assert saved.num_bytes / original == pytest.approx(
        p.model_after / p.model_before, abs=1e-3
    )


def test_roles_left_dense_round_trip(tmp_path):
    model = tiny_vit(depth=3)
    x = image_batch()
    masasurgery.convert(model, atoms=1, roles=("q", "k"), example_inputs=x)
    masasurgery.save(model, tmp_path)

    fresh = tiny_vit(depth=3)
    checkpoint = masasurgery.load(fresh, tmp_path)
    assert checkpoint.config.roles == ("q", "k")
    assert list(fresh.blocks[0].attn.qkv.dense) == ["v"]
    assert isinstance(fresh.blocks[0].attn.proj, nn.Linear)
    assert torch.equal(fresh(x), model(x))


def test_custom_stages_round_trip(tmp_path):
    def make():
        return Stack(lambda d: SeparateQKV(d, heads=4, kv_heads=2), (3, 2), (32, 48))

    model, x = make(), torch.randn(2, 5, 32)
    masasurgery.convert(model, atoms=2, example_inputs=x)
    masasurgery.save(model, tmp_path)
    fresh = make()
    masasurgery.load(fresh, tmp_path)
    assert torch.equal(fresh(x), model(x))
    assert sorted(fresh.masa) == sorted(model.masa)


def _encoder():
    # nn.MultiheadAttention: a packed in_proj layout and a nested out_proj
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()


def _gpt2():
    # transformers' Conv1D layout, weights stored (in, out)
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50, n_positions=8)
    config.bos_token_id = config.eos_token_id = None
    return GPT2Model(config).eval()


LAYOUT_MODELS = {
    "mha_in_proj": (_encoder, lambda: torch.randn(2, 5, 32)),
    "conv1d": (_gpt2, lambda: torch.randint(0, 50, (2, 7))),
}


@pytest.mark.parametrize("layout", list(LAYOUT_MODELS))
def test_other_layouts_round_trip(tmp_path, layout):
    make, inputs = LAYOUT_MODELS[layout]
    model, x = make(), inputs()
    masasurgery.convert(model, atoms=2, example_inputs=x)
    saved = masasurgery.save(model, tmp_path)
    assert layout in {p.layout for p in saved.plan.projections}

    fresh = make()
    masasurgery.load(fresh, tmp_path)

    assert _same_state(fresh, model.state_dict())
    expected, actual = model(x), fresh(x)
    if layout == "conv1d":
        expected, actual = expected.last_hidden_state, actual.last_hidden_state
    assert torch.equal(actual, expected)
    _assert_shares_atoms(fresh)


@pytest.mark.parametrize(
    ("kwargs", "dtype", "key"),
    [
        ({"num_classes": 10}, None, "'head.weight' has shape (1000, 192) in the "),
        ({"qkv_bias": False}, None, "'blocks.0.attn.qkv.bias' is in the plan"),
        ({"depth": 2}, None, "replaces 'blocks.2.attn.qkv'"),
        ({"embed_dim": 96}, None, "'blocks.0.attn.qkv.weight' is 576x192"),
        ({}, torch.bfloat16, "'cls_token' is torch.float32 in the checkpoint"),
    ],
    ids=["head", "bias", "depth", "width", "dtype"],
)
def test_a_mismatching_model_is_named_and_left_as_it_was(tmp_path, kwargs, dtype, key):
    model, _ = _converted()
    masasurgery.save(model, tmp_path)
    other = tiny_vit(**{"depth": 3, **kwargs})
    if dtype is not None:
        other = other.to(dtype)
    state = _state(other)

    with pytest.raises(CheckpointError, match="does not match VisionTransformer") as e:
        masasurgery.load(other, tmp_path)

    assert key in str(e.value) and "The model was not changed" in str(e.value)
    assert isinstance(e.value, ValueError)
    assert _same_state(other, state) and not hasattr(other, "masa")
    assert not any(isinstance(m, SharedProjection) for m in other.modules())


def test_a_missing_tensor_is_named(tmp_path):
    model, _ = _converted()
    saved = masasurgery.save(model, tmp_path)
    tensors = load_file(saved.weights_file)
    del tensors["blocks.1.attn.qkv.coefficients.k"]
    save_file(tensors, saved.weights_file)

    fresh = tiny_vit(depth=3)
    state = _state(fresh)
    with pytest.raises(CheckpointError, match="coefficients.k' is in the model but"):
        masasurgery.load(fresh, tmp_path)
    assert _same_state(fresh, state) and not hasattr(fresh, "masa")


def test_loading_into_a_meta_model_fills_it(tmp_path):
    model, _ = _converted()
    x = image_batch()
    masasurgery.save(model, tmp_path)
    with torch.device("meta"):
        fresh = tiny_vit(depth=3)

    masasurgery.load(fresh, tmp_path)

    assert {p.device.type for p in [*fresh.parameters(), *fresh.buffers()]} == {"cpu"}
    assert torch.equal(fresh(x), model(x))
    _assert_shares_atoms(fresh)


def test_loading_twice_loads_the_weights_into_the_same_structure(tmp_path):
    model, _ = _converted()
    masasurgery.save(model, tmp_path)
    fresh = tiny_vit(depth=3)
    masasurgery.load(fresh, tmp_path)
    store = fresh.masa
    with torch.no_grad():
        store.group0_q.atoms.zero_()

    masasurgery.load(fresh, tmp_path)
    assert fresh.masa is store and _same_state(fresh, model.state_dict())


def test_a_model_converted_differently_is_refused(tmp_path):
    model, _ = _converted(atoms=2)
    masasurgery.save(model, tmp_path)
    other, _ = _converted(atoms=1)
    state = _state(other)
    with pytest.raises(AlreadyConvertedError, match="another structure"):
        masasurgery.load(other, tmp_path)
    assert _same_state(other, state)


class _TiedLM(nn.Module):
    """Token embedding tied to the output head, around attention blocks."""

    def __init__(self, vocab=50, dim=32, depth=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = Stack(SeparateQKV, depths=(depth,), dims=(dim,))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.blocks(self.embed(tokens)))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tied_weights_are_stored_once_and_tied_again(tmp_path, device):
    model, tokens = _TiedLM(), torch.randint(0, 50, (2, 7))
    masasurgery.convert(model, atoms=2, example_inputs=tokens)
    saved = masasurgery.save(model, tmp_path)
    assert saved.aliases == {"head.weight": "embed.weight"}
    assert "head.weight" not in load_file(saved.weights_file)

    with torch.device(device):
        fresh = _TiedLM()
    masasurgery.load(fresh, tmp_path)

    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh(tokens), model(tokens))
    _assert_shares_atoms(fresh)


def test_an_unconverted_model_saves_with_an_empty_plan(tmp_path):
    model, x = tiny_vit(depth=2), image_batch()
    saved = masasurgery.save(model, tmp_path)
    assert saved.config is None and saved.plan.projections == ()

    fresh = tiny_vit(depth=2)
    masasurgery.load(fresh, tmp_path)
    assert not hasattr(fresh, "masa") and torch.equal(fresh(x), model(x))


def test_save_refuses_a_meta_model_and_a_foreign_conversion(tmp_path):
    model, _ = _converted()
    _, other = _converted(depth=4)
    with pytest.raises(CheckpointError, match="pass the Conversion that convert"):
        masasurgery.save(model, tmp_path, conversion=other)
    with pytest.raises(CheckpointError, match="meta device, so it holds no data"):
        masasurgery.save(copy.deepcopy(model).to("meta"), tmp_path)


def test_save_refuses_the_record_of_another_model_of_the_same_shape(tmp_path):
    model, _ = _converted()
    _, twin = _converted()
    with pytest.raises(CheckpointError, match="describes another"):
        masasurgery.save(model, tmp_path / "ckpt", conversion=twin)
    assert not (tmp_path / "ckpt").exists()


class _Payload:
    """Unpickling this calls ``_PAYLOAD_CALLS.append``: a stand-in for any code."""

    def __reduce__(self):
        return (_PAYLOAD_CALLS.append, ("ran",))


_PAYLOAD_CALLS: list[str] = []


def test_loading_never_unpickles(tmp_path):
    model, _ = _converted()
    saved = masasurgery.save(model, tmp_path)
    saved.weights_file.write_bytes(pickle.dumps({"x": _Payload()}))

    with pytest.raises(CheckpointError, match="could not read"):
        masasurgery.load(tiny_vit(depth=3), tmp_path)
    assert _PAYLOAD_CALLS == []


def _edit_plan(data):
    data["plan"]["projections"][0]["parts"][0]["rows"] = "192"


def _drop_dictionary(data):
    data["plan"]["dictionaries"].pop(0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=2), "format version 2; this masasurgery"),
        (lambda d: d.update(format="other"), "expected format 'masasurgery'"),
        (_edit_plan, "'rows' must be a int, got '192'"),
        (_drop_dictionary, "reads dictionary 'group0_q', which the plan does not"),
        (lambda d: d["config"].update(atoms=0), "config is invalid: atoms must be"),
    ],
    ids=["newer", "format", "field", "dictionary", "config"],
)
def test_a_bad_plan_file_is_refused_with_the_field_named(tmp_path, edit, message):
    model, _ = _converted()
    saved = masasurgery.save(model, tmp_path)
    data = json.loads(saved.plan_file.read_text())
    edit(data)
    saved.plan_file.write_text(json.dumps(data))
    fresh = tiny_vit(depth=3)

    with pytest.raises(CheckpointError, match=message):
        masasurgery.load(fresh, tmp_path)
    assert not hasattr(fresh, "masa")


def test_a_folder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="has no masasurgery.json"):
        masasurgery.read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="'/nonexistent' does not exist"):
        masasurgery.load(tiny_vit(depth=3), "/nonexistent")
    (tmp_path / "masasurgery.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        masasurgery.read_checkpoint(tmp_path)


# ---------------------------------------------------------------------------
# Plain PyTorch paths: the sharing survives, outputs match


def _rebuilt_like(model):
    fresh = tiny_vit(depth=3)
    masasurgery.rebuild(fresh, masasurgery.plan_of(model))
    return fresh


def _strict(model):
    fresh = _rebuilt_like(model)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


def _assign(model):
    fresh = _rebuilt_like(model)
    fresh.load_state_dict(_state(model), assign=True)
    return fresh


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _rebuilt_like(model)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def _meta_then_to_empty(model):
    fresh = copy.deepcopy(model).to("meta")
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(model.state_dict())
    return fresh


def _rebuilt_on_meta(model):
    with torch.device("meta"):
        fresh = tiny_vit(depth=3)
    masasurgery.rebuild(fresh, masasurgery.plan_of(model))
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(model.state_dict())
    return fresh


EXACT_PATHS = {
    "load_state_dict": _strict,
    "load_state_dict-assign": _assign,
    "torch.save-weights_only": _torch_save,
    "deepcopy": copy.deepcopy,
    "to-cpu": lambda m: m.to("cpu"),
    "meta-to_empty": _meta_then_to_empty,
    "rebuild-on-meta": _rebuilt_on_meta,
}


@pytest.mark.parametrize("path", list(EXACT_PATHS))
def test_plain_pytorch_paths_keep_the_sharing_and_the_outputs(path):
    model, _ = _converted()
    x = image_batch()
    expected = model(x)

    moved = EXACT_PATHS[path](model)

    _assert_shares_atoms(moved)
    assert torch.equal(moved(x), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_casts_keep_the_sharing_and_the_outputs(dtype):
    model, _ = _converted()
    x = image_batch()
    expected = model(x)

    cast = {torch.float16: nn.Module.half, torch.bfloat16: nn.Module.bfloat16}
    moved = cast.get(dtype, lambda m: m.to(dtype))(model)

    assert moved.masa.group0_q.atoms.dtype == dtype
    _assert_shares_atoms(moved)
    # Against the float32 run: the tolerance of the coarser of the two dtypes
    coarser = dtype if dtype.itemsize < 4 else torch.float32
    tol = tolerance_for(coarser, "cpu")
    actual = moved(x.to(dtype)).float()
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_and_back_keeps_the_sharing(tmp_path):
    model, _ = _converted()
    x = image_batch()
    expected = model(x)
    model.to("cuda")
    _assert_shares_atoms(model)
    tol = tolerance_for(torch.float32, "cuda")
    torch.testing.assert_close(
        model(x.cuda()).cpu(), expected, atol=tol.atol, rtol=tol.rtol
    )

    masasurgery.save(model, tmp_path)
    fresh = tiny_vit(depth=3).cuda()
    masasurgery.load(fresh, tmp_path)
    assert fresh.masa.group0_q.atoms.device.type == "cuda"
    assert torch.equal(fresh(x.cuda()), model(x.cuda()))


def test_saving_onto_a_file_is_refused_and_writes_nothing(tmp_path):
    model, conversion = _converted()
    target = tmp_path / "report.json"
    target.write_text("{}")
    with pytest.raises(CheckpointError, match="it is a file, and a checkpoint"):
        masasurgery.save(model, target, conversion=conversion)
    with pytest.raises(CheckpointError, match="cannot make the checkpoint folder"):
        masasurgery.save(model, target / "inside", conversion=conversion)
    assert target.read_text() == "{}" and sorted(tmp_path.iterdir()) == [target]


def test_a_model_of_another_depth_is_told_once_how_to_build_it(tmp_path):
    model, _ = _converted()
    masasurgery.save(model, tmp_path)
    with pytest.raises(CheckpointError, match="has no such module. The model") as e:
        masasurgery.load(tiny_vit(depth=2), tmp_path)
    assert str(e.value).lower().count("build the model") == 1


@pytest.mark.parametrize("step", ["save", "load"])
def test_save_and_load_refuse_what_is_not_a_model(tmp_path, step):
    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        getattr(masasurgery, step)({"blocks.0.attn.qkv.weight": None}, tmp_path)
    assert list(tmp_path.iterdir()) == []
