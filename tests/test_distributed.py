"""DDP and FSDP2 on CPU (gloo, 2 processes) give the single-process gradients.

Each scenario spawns two processes once; each rank trains on its half of a fixed
batch, builds the same model on one process over the whole batch as reference,
and writes how far its gradients (and, for FSDP2, its losses and stepped
weights) are beyond the float64 tolerance. The test reads those figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_vit
from torch.nn.parallel import DistributedDataParallel
from torchvision.models import VisionTransformer

import masasurgery
from masasurgery.distributed import block_names, shard_converted
from masasurgery.scratch import init_dictionaries
from masasurgery.tolerances import tolerance_for

WORLD, BATCH = 2, 4
TOLERANCE = tolerance_for(torch.float64, "cpu")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _model() -> torch.nn.Module:
    """The same float64 from-scratch model on every rank and in the reference."""
    torch.manual_seed(0)
    model = tiny_vit(num_classes=4).double().train()
    masasurgery.convert(model, atoms=2, verify=False)
    init_dictionaries(model, generator=torch.Generator().manual_seed(0))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator, dtype=torch.float64)
    return images, torch.arange(BATCH) % 4


def _reference() -> tuple[torch.nn.Module, torch.Tensor]:
    """One process, the whole batch: the model after backward, and the loss."""
    model = _model()
    images, labels = _batch()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return model, loss.detach()


def _half(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return images[rows], labels[rows]


def _excess(actual: dict, expected: dict, names: list[str]) -> float:
    return max(TOLERANCE.excess(actual[n], expected[n]) for n in names)


def _grad_excess(model: torch.nn.Module, reference: torch.nn.Module) -> dict:
    """Worst excess over the atoms, the coefficients and every parameter."""
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    expected = {n: p.grad for n, p in reference.named_parameters()}
    atoms = [n for n in grads if n.endswith(".atoms")]
    coefficients = [n for n in grads if ".coefficients." in n]
    return {
        "atoms": _excess(grads, expected, atoms),
        "coefficients": _excess(grads, expected, coefficients),
        "all": _excess(grads, expected, list(expected)),
        "atom_count": len(atoms),
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # An FSDP2 gradient is a DTensor shard; gather it whole
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _run(worker, tmp_path: Path) -> list[dict]:
    init = f"file://{tmp_path}/process_group"
    mp.spawn(worker, args=(init, str(tmp_path)), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _start(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)


def _ddp_worker(rank: int, init: str, out: str) -> None:
    _start(rank, init)
    try:
        reference, _ = _reference()
        results = {"reentrant": timm.layers.use_reentrant_ckpt()}
        for checkpointing in (False, True):
            model = _model()
            model.set_grad_checkpointing(checkpointing)
            calls = _count_block_calls(model)
            ddp = DistributedDataParallel(model)
            images, labels = _half(rank)
            F.cross_entropy(ddp(images), labels).backward()
            key = "checkpointed" if checkpointing else "plain"
            results[key] = _grad_excess(model, reference) | {"block_calls": calls}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _count_block_calls(model: torch.nn.Module) -> list[int]:
    """A list that counts the forward calls of block 0's attention (live)."""
    calls = [0]

    def count(module, args) -> None:
        calls[0] += 1

    model.blocks[0].attn.register_forward_pre_hook(count)
    return calls


@pytest.mark.slow
def test_ddp_gives_the_single_process_atom_gradients(tmp_path):
    results = _run(_ddp_worker, tmp_path)

    for rank, result in enumerate(results):
        assert result["reentrant"] is False
        for key, calls in (("plain", 1), ("checkpointed", 2)):
            figures = result[key]
            assert figures["atom_count"] == 4
            assert figures["atoms"] <= 0, (rank, key, figures)
            assert figures["coefficients"] <= 0, (rank, key, figures)
            assert figures["all"] <= 0, (rank, key, figures)
            # Checkpointing runs each block again in backward
            assert figures["block_calls"] == [calls], (rank, key)


def _fsdp_worker(rank: int, init: str, out: str) -> None:
    _start(rank, init)
    try:
        reference, reference_loss = _reference()
        model = _model()
        plan = shard_converted(model)
        images, labels = _half(rank)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        results = _grad_excess(model, reference) | {
            "blocks": plan.blocks,
            "loss": _mean_loss_excess(loss, reference_loss),
            "step": _step_excess(model, reference),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _mean_loss_excess(loss: torch.Tensor, reference_loss: torch.Tensor) -> float:
    total = loss.detach().clone()
    dist.all_reduce(total)
    return TOLERANCE.excess(total / WORLD, reference_loss)


def _step_excess(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """One SGD step on both; how far the sharded weights are from the reference."""
    for m in (model, reference):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    weights = {n: _full(p.detach()) for n, p in model.named_parameters()}
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    return _excess(weights, expected, list(expected))


@pytest.mark.slow
def test_fsdp2_gives_the_single_process_gradients_and_step(tmp_path):
    results = _run(_fsdp_worker, tmp_path)

    for rank, result in enumerate(results):
        assert result["blocks"] == ["blocks.0", "blocks.1", "blocks.2"]
        assert result["atom_count"] == 4
        for key in ("atoms", "coefficients", "all", "loss", "step"):
            assert result[key] <= 0, (rank, key, result)


def test_block_names_find_the_repeated_blocks():
    vit = tiny_vit()
    masasurgery.convert(vit, atoms=1, verify=False)
    torchvision_vit = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=3,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    masasurgery.convert(
        torchvision_vit, atoms=1, example_inputs=torch.randn(1, 3, 32, 32), verify=False
    )

    assert block_names(vit) == ["blocks.0", "blocks.1", "blocks.2"]
    assert block_names(torchvision_vit) == [
        f"encoder.layers.encoder_layer_{i}" for i in range(3)
    ]
