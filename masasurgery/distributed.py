"""Train a converted model on ``torch.distributed``: DDP and FSDP2.

**DDP** needs nothing special. Every atom tensor is registered once (in
``model.masa``), so DDP holds it once and all-reduces its gradient once per step,
after autograd has summed the contributions of every block that reads it. A
parameter read by several modules in one forward is fine for DDP; every
dictionary is read in every forward, so ``find_unused_parameters`` is not needed.
Non-reentrant activation checkpointing (``use_reentrant=False``, timm's default)
recomputes the composed weights in backward and gives the same gradients.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) gathers the parameters of a
sharding unit in the unit's pre-forward hook and frees them after its forward.
A dictionary is read by many blocks, so it must be gathered while *all* of its
users run: :func:`shard_converted` makes each block its own unit (its
coefficients, biases, MLP and norms) and leaves ``model.masa`` in the root unit,
whose forward encloses every block. Sharding ``model.masa`` as a unit of its own
would not work: the store's forward never runs, so its atoms would never be
gathered and the first block would fail with "got mixed torch.Tensor and
DTensor".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from masasurgery._uses import dictionary_uses, shared_projections

__all__ = ["ShardPlan", "block_names", "block_of", "shard_converted"]

logger = logging.getLogger(__name__)


@dataclass
class ShardPlan:
    """The sharding units :func:`shard_converted` made.

    Attributes:
        blocks: Modules sharded as units of their own, innermost first.
        dictionaries: The dictionaries, all in the root unit.
        root_parameters: Names of the parameters left in the root unit (the atoms,
            the stabiliser's MLPs, and whatever lies outside the blocks).
    """

    blocks: list[str]
    dictionaries: list[str]
    root_parameters: list[str]


def block_names(model: nn.Module) -> list[str]:
    """The blocks that hold the shared projections, in module order.

    A projection's block is its deepest ancestor held by a container (an
    ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict``): ``blocks.3`` for
    timm's ``blocks.3.attn.qkv``, ``encoder.layer.3`` for BERT's
    ``encoder.layer.3.attention.self.query``, ``encoder.layers.encoder_layer_3``
    for torchvision's ViT. A projection in no container has no block.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> block_names(m)
        ['blocks.0', 'blocks.1']
    """
    modules = dict(model.named_modules())
    blocks = [block_of(modules, name) for name, _ in shared_projections(model)]
    return list(dict.fromkeys(b for b in blocks if b is not None))


def block_of(modules: dict[str, nn.Module], name: str) -> str | None:
    """The block of the module ``name``: its deepest container-held ancestor.

    Args:
        modules: ``dict(model.named_modules())``.
        name: A qualified module name, e.g. ``"blocks.3.attn.qkv"``.

    Returns:
        The block's qualified name, or None when no ancestor is in a container.
    """
    held = [a for a in _ancestors(name) if isinstance(modules[_parent(a)], _CONTAINERS)]
    return held[-1] if held else None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b"]``: the strict ancestors, outermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def shard_converted(
    model: nn.Module,
    *,
    mesh: Any | None = None,
    blocks: Sequence[str] | None = None,
    **fully_shard_kwargs: Any,
) -> ShardPlan:
    """Apply FSDP2's ``fully_shard`` so each dictionary is gathered for all users.

    Steps:

    1. ``fully_shard`` each block (:func:`block_names`, or ``blocks``), innermost
       first: a block's own parameters, its coefficients and biases included,
       are gathered for its forward and backward only.
    2. ``fully_shard`` the root: ``model.masa`` (every dictionary, and the
       stabiliser's MLPs) and the parameters outside the blocks. The root
       unit is gathered before the first block runs and stays gathered until
       the last block's backward, so every block reads whole atoms, and each
       atom gradient is reduce-scattered once, summed over its users.

    The atoms are thus held whole on every rank for a step, as small as they are
    (``S`` matrices per role, where the dense model had ``L``).

    Needs an initialised process group. Runs on CPU with the gloo backend in
    torch >= 2.6 (tested with 2 processes in ``tests/test_distributed.py``).

    Args:
        model: A converted model, not yet sharded.
        mesh: The device mesh; None lets ``fully_shard`` use the default
            (every rank, the current device type).
        blocks: Names of the modules to shard as units; None finds them.
        **fully_shard_kwargs: Passed to every ``fully_shard`` call (e.g.
            ``reshard_after_forward``, ``mp_policy``).

    Returns:
        The units made and what stayed in the root.

    Raises:
        masasurgery.ConfigError: The model holds no dictionary.

    Example:
        >>> import tempfile, timm, masasurgery, torch.distributed as dist
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> init = f"file://{tempfile.mkdtemp()}/pg"
        >>> dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        >>> plan = shard_converted(m)
        >>> plan.blocks, plan.dictionaries[:2]
        (['blocks.0', 'blocks.1'], ['masa.group0_q', 'masa.group0_k'])
        >>> type(m.masa.group0_q.atoms).__name__
        'DTensor'
        >>> dist.destroy_process_group()
    """
    from torch.distributed.fsdp import fully_shard

    # Read the structure before fully_shard changes the classes
    dictionaries = [entry.name for entry in dictionary_uses(model)]
    units = list(blocks) if blocks is not None else block_names(model)
    units.sort(key=lambda name: name.count("."), reverse=True)
    in_blocks = {
        f"{unit}.{name}"
        for unit in units
        for name, _ in model.get_submodule(unit).named_parameters()
    }
    root = [name for name, _ in model.named_parameters() if name not in in_blocks]

    # Blocks first (innermost first), then the root with the dictionaries
    kwargs = dict(fully_shard_kwargs)
    if mesh is not None:
        kwargs["mesh"] = mesh
    for unit in units:
        fully_shard(model.get_submodule(unit), **kwargs)
    fully_shard(model, **kwargs)
    logger.debug("sharded %d blocks; root keeps %d parameters", len(units), len(root))
    return ShardPlan(blocks=units, dictionaries=dictionaries, root_parameters=root)
