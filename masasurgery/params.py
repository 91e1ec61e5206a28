"""Which parameters of a converted model train, and in which optimizer group.

A converted model's atoms, coefficients and biases are ordinary Parameters, each
registered once: ``model.parameters()`` lists every atom tensor once however many
blocks read it, so any ``torch.optim`` optimizer steps it once per step, with the
gradient summed over its users by autograd. This module sorts the parameters into
kinds, freezes kinds, and builds weight-decay groups that list each tensor once.

The kinds:

* ``"atoms"``: ``AtomDictionary.atoms``.
* ``"coefficients"``: every ``SharedProjection.coefficients`` entry, and, while
  the training stabiliser is on, its MLPs, embeddings and base vectors.
* ``"residuals"``: the per-layer low-rank residuals of shared parts
  (``residual_up`` / ``residual_down``), where a calibrated fit added them.
* ``"biases"``: the biases of the replaced projections.
* ``"rest"``: every other parameter (the rows a projection keeps dense included).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from masasurgery.errors import ConfigError
from masasurgery.modules import AtomDictionary, SharedProjection
from masasurgery.report import format_count, format_table

__all__ = [
    "KINDS",
    "TrainableSummary",
    "param_groups",
    "parameter_kinds",
    "set_trainable",
]

#: The kinds of parameters, in the order groups and summaries list them.
KINDS = ("atoms", "coefficients", "residuals", "biases", "rest")


@dataclass
class TrainableSummary:
    """Trainable and frozen parameter elements per kind.

    Attributes:
        trainable: Elements with ``requires_grad``, by kind.
        frozen: Elements without, by kind.
    """

    trainable: dict[str, int]
    frozen: dict[str, int]

    @property
    def num_trainable(self) -> int:
        return sum(self.trainable.values())

    @property
    def num_frozen(self) -> int:
        return sum(self.frozen.values())

    def __str__(self) -> str:
        rows = [
            [k, format_count(self.trainable[k]), format_count(self.frozen[k])]
            for k in KINDS
        ]
        return format_table(["kind", "trainable", "frozen"], rows)


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """The kind of every parameter, by its name in ``model.named_parameters()``.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> kinds = parameter_kinds(m)
        >>> kinds["masa.group0_q.atoms"], kinds["blocks.1.attn.qkv.coefficients.k"]
        ('atoms', 'coefficients')
        >>> kinds["blocks.1.attn.proj.bias"], kinds["blocks.1.mlp.fc1.weight"]
        ('biases', 'rest')
    """
    # Sort by identity first: a tensor has one kind wherever it is registered
    by_id: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, AtomDictionary):
            by_id[id(module.atoms)] = "atoms"
            for name, p in module.named_parameters():
                if name != "atoms":  # the stabiliser's coefficient MLP
                    by_id[id(p)] = "coefficients"
        elif isinstance(module, SharedProjection):
            for p in module.coefficients.parameters():
                by_id[id(p)] = "coefficients"
            for p in _residuals(module):
                by_id[id(p)] = "residuals"
            if module.bias is not None:
                by_id[id(module.bias)] = "biases"
    return {name: by_id.get(id(p), "rest") for name, p in model.named_parameters()}


def _residuals(module: SharedProjection) -> list[nn.Parameter]:
    return [
        p
        for name in ("residual_up", "residual_down")
        for p in getattr(module, name, nn.ParameterDict()).parameters()
    ]


def set_trainable(
    model: nn.Module,
    *,
    atoms: bool | None = None,
    coefficients: bool | None = None,
    residuals: bool | None = None,
    biases: bool | None = None,
    rest: bool | None = None,
) -> TrainableSummary:
    """Freeze or unfreeze each kind of parameter; None leaves a kind as it is.

    Each tensor is set once, however many blocks share it. With the training
    stabiliser on, ``coefficients`` also sets its MLPs, embeddings and base
    vectors (``coefficients=True`` then trains the bases too, like
    ``add_coefficient_mlp(train_base=True)``).

    Args:
        model: A model, converted or not (then all its parameters are ``rest``).
        atoms: Train the dictionaries' atoms.
        coefficients: Train the projections' coefficients.
        residuals: Train the shared parts' low-rank residuals, if any.
        biases: Train the replaced projections' biases.
        rest: Train every other parameter.

    Returns:
        Trainable and frozen elements per kind, after the change.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> summary = set_trainable(m, rest=False, biases=False)
        >>> summary.trainable
        {'atoms': 147456, 'coefficients': 8, 'residuals': 0, 'biases': 0, 'rest': 0}
    """
    flags = {"atoms": atoms, "coefficients": coefficients, "residuals": residuals}
    flags |= {"biases": biases, "rest": rest}
    params = dict(model.named_parameters())
    for name, kind in parameter_kinds(model).items():
        if flags[kind] is not None:
            params[name].requires_grad_(flags[kind])
    return trainable_summary(model)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable and frozen elements per kind, each tensor counted once."""
    trainable, frozen = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    params = dict(model.named_parameters())
    for name, kind in parameter_kinds(model).items():
        counts = trainable if params[name].requires_grad else frozen
        counts[kind] += params[name].numel()
    return TrainableSummary(trainable=trainable, frozen=frozen)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    lr: float | None = None,
    lr_scale: Mapping[str, float] | None = None,
    no_decay: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: decay for matrices, none for the rest.

    Every trainable parameter is in exactly one group, once (frozen ones in
    none). The rule, per parameter:

    1. Coefficients (and the stabiliser's MLPs and embeddings) never decay: they
       set each block's mixture, and decaying them as well as the atoms would
       shrink every composed weight twice.
    2. Otherwise no decay for tensors of one dimension or less (biases, norm
       weights), names ending in ``.bias``, names the model lists in
       ``model.no_weight_decay()`` (timm's position embeddings and class token)
       and names matching a ``no_decay`` pattern (``fnmatch``).
    3. Everything else decays: atoms, residual factors, dense weights,
       convolution kernels.

    Groups are per kind and decay (``"atoms"``, ``"rest_no_decay"``, ...), named
    by an extra ``"name"`` key; empty groups are left out.

    Args:
        model: The model to train.
        weight_decay: Weight decay of the decaying groups.
        lr: Base learning rate to write into every group; None leaves it to the
            optimizer's default.
        lr_scale: Multiplier of ``lr`` per kind, e.g. ``{"coefficients": 10.0}``.
        no_decay: More name patterns that must not decay, e.g. ``("*embed*",)``.

    Returns:
        The groups, to pass to any ``torch.optim`` optimizer.

    Raises:
        ConfigError: ``lr_scale`` without ``lr``, or with an unknown kind.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> groups = param_groups(m, weight_decay=0.05)
        >>> [g["name"] for g in groups]
        ['atoms', 'coefficients', 'biases', 'rest', 'rest_no_decay']
        >>> [g["weight_decay"] for g in groups]
        [0.05, 0.0, 0.0, 0.05, 0.0]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
    """
    _check_lr_scale(lr, lr_scale)
    skip = set(_model_no_decay(model))
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    params = dict(model.named_parameters())
    for name, kind in parameter_kinds(model).items():
        p = params[name]
        if not p.requires_grad:
            continue
        decay = kind != "coefficients" and not _no_decay(name, p, skip, no_decay)
        buckets.setdefault((kind, decay), []).append(p)
    return [
        _group(kind, decay, buckets[kind, decay], weight_decay, lr, lr_scale)
        for kind in KINDS
        for decay in (True, False)
        if (kind, decay) in buckets
    ]


def _check_lr_scale(lr: float | None, lr_scale: Mapping[str, float] | None) -> None:
    if lr_scale is None:
        return
    if lr is None:
        raise ConfigError(
            f"lr_scale={dict(lr_scale)} multiplies lr, but lr is None; pass lr= too."
        )
    unknown = sorted(set(lr_scale) - set(KINDS))
    if unknown:
        raise ConfigError(f"lr_scale has unknown kinds {unknown}; known: {KINDS}.")


def _model_no_decay(model: nn.Module) -> Sequence[str]:
    # timm models name their embeddings and tokens this way
    method = getattr(model, "no_weight_decay", None)
    return tuple(method()) if callable(method) else ()


def _no_decay(
    name: str, p: nn.Parameter, skip: set[str], patterns: Sequence[str]
) -> bool:
    if p.dim() <= 1 or name.endswith(".bias") or name in skip:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _group(
    kind: str,
    decay: bool,
    params: list[nn.Parameter],
    weight_decay: float,
    lr: float | None,
    lr_scale: Mapping[str, float] | None,
) -> dict[str, Any]:
    # Name the group after its kind, with a suffix only where a kind is split
    name = kind if decay or kind in ("coefficients", "biases") else f"{kind}_no_decay"
    group: dict[str, Any] = {
        "name": name,
        "params": params,
        "weight_decay": weight_decay if decay else 0.0,
    }
    if lr is not None:
        group["lr"] = lr * (lr_scale or {}).get(kind, 1.0)
    return group
