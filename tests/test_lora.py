"""LoRA from peft on a converted model: on the MLPs and the shared projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, tiny_vit
from torchvision.models import VisionTransformer

import masasurgery
from masasurgery.lora import lora_targets, register_shared_lora
from masasurgery.modules import SharedProjection
from masasurgery.tolerances import tolerance_for

peft = pytest.importorskip("peft")


def converted():
    model = tiny_vit(num_classes=4)
    masasurgery.convert(model, atoms=2, verify=False)
    return model


def peft_model(model, targets: list[str]):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    return peft.get_peft_model(model, register_shared_lora(config))


def train(model, steps: int = 6) -> list[float]:
    model.train()
    images, labels = image_batch(batch=8), torch.arange(8) % 4
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_lora_on_shared_projections_and_mlps_trains_only_the_adapters():
    model, x = converted(), image_batch()
    with torch.no_grad():
        before = model(x)
    frozen = {
        "atoms": model.masa.group0_q.atoms,
        "coefficients": model.blocks[1].attn.proj.coefficients["o"],
    }
    values = {k: p.detach().clone() for k, p in frozen.items()}
    wrapped = peft_model(model, [*lora_targets(model), "fc1", "fc2"])

    # B starts at zero: the adapters change nothing yet
    with torch.no_grad():
        assert torch.equal(wrapped(x), before)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(".attn.qkv.lora_" in n for n in trainable) == 2 * 3

    losses = train(wrapped)

    assert losses[-1] < 0.7 * losses[0]
    for key, p in frozen.items():
        assert not p.requires_grad and torch.equal(p, values[key]), key
    qkv = wrapped.get_base_model().blocks[0].attn.qkv
    assert isinstance(qkv.get_base_layer(), SharedProjection)
    assert qkv.lora_B["default"].weight.abs().sum() > 0


def test_merge_and_unload_of_mlp_adapters_keeps_the_shared_projections():
    model, x = converted(), image_batch()
    wrapped = peft_model(model, ["fc1", "fc2"])
    train(wrapped, steps=3)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(x)

    merged = wrapped.merge_and_unload()

    assert isinstance(merged.blocks[0].attn.qkv, SharedProjection)
    assert type(merged.blocks[0].mlp.fc1) is torch.nn.Linear
    assert masasurgery.plan_of(merged).dictionaries
    with torch.no_grad():
        torch.testing.assert_close(
            merged(x), expected, **vars(tolerance_for(torch.float32, "cpu"))
        )


def test_merging_into_a_shared_projection_is_refused():
    model = converted()
    wrapped = peft_model(model, lora_targets(model))

    with pytest.raises(masasurgery.LayoutError, match="atoms shared by every block"):
        wrapped.merge_and_unload()


def test_an_uncalled_projection_is_neither_listed_nor_wrapped():
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=3,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    masasurgery.convert(
        model, atoms=1, example_inputs=torch.randn(1, 3, 32, 32), verify=False
    )

    # nn.MultiheadAttention reads in_proj's weight and never calls it
    targets = lora_targets(model)
    assert targets == [
        f"encoder.layers.encoder_layer_{i}.self_attention.out_proj" for i in range(3)
    ]
    with pytest.raises(masasurgery.LayoutError, match="never called"):
        peft_model(model, ["in_proj"])
