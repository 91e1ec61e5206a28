"""Rewrite: swap projections for shared-dictionary modules, in the user's model.

The rewrite edits the module tree, not a graph copy: the user's model object keeps
its class, its methods and its config, and gains one attribute, ``masa``, the
:class:`DictionaryStore` that registers every dictionary once.

Every new module is built before anything in the model changes, and the swap is
undone if it fails half-way, so a failed rewrite leaves the model as it was.

A converted model describes itself: :mod:`masasurgery.passes.plans` reads its
structure off the module tree and rebuilds it on a freshly built original model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from masasurgery.passes.find_attention import Projection
from masasurgery.passes.group import Group
from masasurgery.passes.layouts import LAYOUTS, read_rows
from torch import Tensor, nn

from masasurgery.errors import (
    AlreadyConvertedError,
    MasaError,
)
from masasurgery.fit import MatrixPCA
from masasurgery.modules import AtomDictionary, DictionaryStore, SharedProjection

__all__ = [
    "STORE_NAME",
    "Rewrite",
    "check_free",
    "restore",
    "rewrite",
    "store_key",
    "swap",
]

logger = logging.getLogger(__name__)

#: The attribute of the model that holds the DictionaryStore.
STORE_NAME = "masa"


@dataclass
class Rewrite:
    """What a rewrite changed, enough to undo it.

    Attributes:
        store: The dictionaries, registered at ``model.masa``.
        originals: Each replaced module, by qualified name, as it was.
        replacements: Each new module, by qualified name.
    """

    store: DictionaryStore
    originals: dict[str, nn.Module]
    replacements: dict[str, nn.Module]
    originals_released: bool = False


def store_key(group: int, role: str) -> str:
    """Key of a dictionary in the store: ``group{g}_{role}``."""
    return f"group{group}_{role}"


def rewrite(
    model: nn.Module,
    groups: Sequence[Group],
    fits: Mapping[tuple[int, str], MatrixPCA],
) -> Rewrite:
    """Replace the projections of ``groups`` by shared-dictionary modules.

    Args:
        model: The model to edit in place.
        groups: The groups to convert.
        fits: The fit of each ``(group index, role)`` to share; roles without a
            fit stay dense (inside a fused projection) or untouched.

    Returns:
        The store, the original modules and their replacements.

    Raises:
        AlreadyConvertedError: The model already has a ``masa`` store.
    """
    # Build everything first: the model is not touched until the swap
    check_free(model)
    store = DictionaryStore(
        {
            store_key(g, role): AtomDictionary(fit.atoms, role)
            for (g, role), fit in fits.items()
        }
    )
    replacements: dict[str, nn.Module] = {}
    for group in groups:
        for layer, site in enumerate(group.sites):
            for projection in site.projections:
                shared = [r for r in projection.roles if (group.index, r) in fits]
                if not shared:
                    continue
                replacements[projection.target] = _build(
                    model, projection, group.index, layer, store, fits
                )

    # Atoms train when the weights they replace did
    trainable = any(
        p.requires_grad for m in replacements.values() for p in m.parameters()
    )
    store.requires_grad_(trainable)

    # Swap: the store first, then each projection
    originals = swap(model, store, replacements)
    logger.debug(
        "rewrote %d projections into %d dictionaries", len(originals), len(store)
    )
    return Rewrite(store=store, originals=originals, replacements=replacements)


def restore(model: nn.Module, done: Rewrite) -> None:
    """Undo :func:`rewrite`: put the original modules back, drop the store."""
    for target, module in done.originals.items():
        _set_submodule(model, target, module)
    if getattr(model, STORE_NAME, None) is done.store:
        delattr(model, STORE_NAME)


def check_free(model: nn.Module) -> None:
    """Raise unless ``model`` holds no masasurgery module and no ``masa`` attribute.

    Raises:
        AlreadyConvertedError: The model is already converted.
        MasaError: The model has an unrelated attribute named ``masa``.
    """
    existing = getattr(model, STORE_NAME, None)
    if isinstance(existing, DictionaryStore) or any(
        isinstance(m, SharedProjection) for m in model.modules()
    ):
        raise AlreadyConvertedError(
            f"{type(model).__name__} is already converted (it holds masasurgery "
            "modules); convert the original model, or call "
            "masasurgery.materialize(model) first to get dense weights back."
        )
    if existing is not None or STORE_NAME in dict(model.named_children()):
        raise MasaError(
            f"{type(model).__name__} already has an attribute {STORE_NAME!r} "
            f"({type(existing).__name__}); masasurgery stores its dictionaries "
            "there. Rename that attribute before converting."
        )


def _build(
    model: nn.Module,
    projection: Projection,
    group: int,
    layer: int,
    store: DictionaryStore,
    fits: Mapping[tuple[int, str], MatrixPCA],
) -> SharedProjection:
    """The replacement of one projection: shared roles, and dense rows for the rest."""
    module = model.get_submodule(projection.target)
    layout = LAYOUTS[projection.layout]
    new = layout.replacement(module)
    new.layout = projection.layout
    trainable = layout.weight(module).requires_grad

    # Parts in row order; rows no role owns stay dense
    position = 0
    for role, (start, stop) in sorted(projection.roles.items(), key=lambda kv: kv[1]):
        if start > position:
            _add_dense(new, module, projection, f"rows{position}", position, start)
        if (group, role) in fits:
            fit = fits[group, role]
            coefficients = fit.coefficients[layer].clone()
            residual = fit.residual(layer)
            if residual is not None:
                residual = (residual[0].clone(), residual[1].clone())
            new.add_shared(role, store[store_key(group, role)], coefficients, residual)
            for params in (new.coefficients, new.residual_up, new.residual_down):
                if role in params:
                    params[role].requires_grad_(trainable)
        else:
            _add_dense(new, module, projection, role, start, stop)
        position = stop
    if position < projection.out_features:
        _add_dense(
            new,
            module,
            projection,
            f"rows{position}",
            position,
            projection.out_features,
        )
    installed = layout.install(module, new)
    _shift_bias(layout.bias(installed), projection, group, layer, fits)
    return installed


def _shift_bias(
    bias: Tensor | None,
    projection: Projection,
    group: int,
    layer: int,
    fits: Mapping[tuple[int, str], MatrixPCA],
) -> None:
    """Add each shared role's bias shift (fits about the mean input) to its rows."""
    for role, (start, stop) in projection.roles.items():
        fit = fits.get((group, role))
        if fit is None or fit.bias_shift is None:
            continue
        if bias is None:
            raise MasaError(
                f"the fit of {projection.target} ({role}) shifts a bias, but the "
                "projection has none; fit it without centering (center=False)."
            )
        with torch.no_grad():
            bias[start:stop] += fit.bias_shift[layer].to(bias)


def _add_dense(
    new: SharedProjection,
    module: nn.Module,
    projection: Projection,
    name: str,
    start: int,
    stop: int,
) -> None:
    rows = read_rows(module, projection.layout, start, stop)
    new.add_dense(name, rows.detach().clone())
    new.dense[name].requires_grad_(rows.requires_grad)


def swap(
    model: nn.Module, store: DictionaryStore, replacements: dict[str, nn.Module]
) -> dict[str, nn.Module]:
    """Put ``store`` at ``model.masa`` and each replacement at its name.

    Returns:
        The modules replaced, by name. A swap that fails half-way is undone.
    """
    originals: dict[str, nn.Module] = {}
    try:
        setattr(model, STORE_NAME, store)
        for target, new in replacements.items():
            originals[target] = model.get_submodule(target)
            _set_submodule(model, target, new)
    except BaseException:
        # Undo the part of the swap that happened, then re-raise
        for target, module in originals.items():
            _set_submodule(model, target, module)
        if getattr(model, STORE_NAME, None) is store:
            delattr(model, STORE_NAME)
        raise
    return originals


def _set_submodule(model: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child_name = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)
