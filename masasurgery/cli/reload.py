"""A saved checkpoint, loaded onto its rebuilt original, as a verifiable record.

:func:`masasurgery.verify` needs the :class:`~masasurgery.Conversion` that
``convert`` (or ``compress``) returned: the groups, the original projections and
the fits the converted weights must reproduce. A checkpoint holds none of them,
so they are made again from the rebuilt original model:

1. analyse the original model: its attention sites and their projections;
2. group the sites as the checkpoint's plan does (each shared part names its
   dictionary, ``group{g}_{role}``), so per-group atoms and regrouped runs are
   read as saved;
3. rebuild the plan's structure (keeping the original projections) and load the
   checkpoint's weights into it;
4. make each fit of the loaded atoms, coefficients and residuals, and measure
   each layer's error against the original weights again, so that the checks
   hold for the weights as saved (also after fine-tuning).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masasurgery.analyze import Analysis, analyze
from masasurgery.convert import Conversion, ParameterCount, RoleFit
from masasurgery.errors import CheckpointError
from masasurgery.fit import MatrixPCA, matrix_pca, relative_error, stack_residuals
from masasurgery.io import Checkpoint, load, read_checkpoint
from masasurgery.modules import SharedMultiheadAttention, SharedProjection
from masasurgery.passes.find_attention import AttentionSite, Projection
from masasurgery.passes.group import Group
from masasurgery.passes.layouts import LAYOUTS, read_rows
from masasurgery.passes.plans import RewritePlan, rebuild
from masasurgery.passes.rewrite import Rewrite, restore

__all__ = ["Reloaded", "reload_conversion"]

_KEY = re.compile(r"group(\d+)_(\w+)")


@dataclass
class Reloaded:
    """A checkpoint loaded onto its original model.

    Attributes:
        checkpoint: What the plan file says.
        conversion: A record of the loaded conversion, ready for ``verify``.
    """

    checkpoint: Checkpoint
    conversion: Conversion


def reload_conversion(
    model: nn.Module, directory: Path, example_inputs: Any
) -> Reloaded:
    """Load the checkpoint at ``directory`` onto ``model`` (the rebuilt original,
    in place), and return it with a record that describes the loaded weights.

    Raises:
        CheckpointError: The checkpoint holds no conversion, or its projections
            are not attention projections of ``model``.
    """
    # Steps: read, analyse and group the original, rebuild and load, records
    checkpoint = read_checkpoint(directory)
    if checkpoint.config is None:
        raise CheckpointError(
            f"{directory} holds a model that was never converted; there is no "
            "conversion to verify."
        )
    analysis = analyze(model, example_inputs)
    groups = _groups_of(analysis, checkpoint.plan, directory)
    done = rebuild(model, checkpoint.plan)
    try:
        load(model, directory)
    except BaseException:
        restore(model, done)
        raise

    fits = {
        (g, role): _fit(done, groups[g], role, key)
        for g, role, key in _dictionaries(checkpoint.plan)
    }
    conversion = Conversion(
        config=checkpoint.config,
        analysis=replace(analysis, groups=groups),
        roles=[_role_fit(groups[g], role, fit) for (g, role), fit in fits.items()],
        params=_count(model, done, fits),
        fits=fits,
        rewrite=done,
    )
    return Reloaded(checkpoint, conversion)


def _dictionaries(plan: RewritePlan) -> list[tuple[int, str, str]]:
    """``(group, role, store key)`` of every dictionary of the plan."""
    found = []
    for d in plan.dictionaries:
        match = _KEY.fullmatch(d.key)
        if match is None or match.group(2) != d.role:
            raise CheckpointError(
                f"dictionary key {d.key!r} is not of the form group<g>_{d.role}."
            )
        found.append((int(match.group(1)), d.role, d.key))
    return found


def _groups_of(analysis: Analysis, plan: RewritePlan, directory: Path) -> list[Group]:
    """The original's sites, grouped as the plan's dictionaries group them."""
    owner = {p.target: s for s in analysis.sites for p in s.projections}
    members: dict[int, list[AttentionSite]] = {}
    for projection in plan.projections:
        site = owner.get(projection.target)
        if site is None:
            raise CheckpointError(
                f"{directory} replaces {projection.target!r}, which is not an "
                f"attention projection of the rebuilt {analysis.model}; the "
                "checkpoint was made from another model or with other options."
            )
        for part in projection.parts:
            if part.dictionary is None:
                continue
            sites = members.setdefault(_index(part.dictionary), [])
            if not any(s is site for s in sites):
                sites.append(site)

    order = {id(s): i for i, s in enumerate(analysis.sites)}
    if sorted(members) != list(range(len(members))):
        raise CheckpointError(f"{directory}: group indices {sorted(members)} skip one.")
    return [
        Group(g, sorted(members[g], key=lambda s: order[id(s)]))
        for g in range(len(members))
    ]


def _index(key: str) -> int:
    match = _KEY.fullmatch(key)
    if match is None:
        raise CheckpointError(
            f"dictionary key {key!r} is not of the form group<g>_<role>."
        )
    return int(match.group(1))


def _fit(done: Rewrite, group: Group, role: str, key: str) -> MatrixPCA:
    """The loaded atoms, coefficients and residuals of one dictionary as a fit."""
    coefficients, ups, downs, originals, shifts = [], [], [], [], []
    for site in group.sites:
        projection = site.projection_of(role)
        module = _shared_part(done.replacements[projection.target])
        coefficients.append(module.coefficients[role].detach())
        ups.append(_residual_part(module, role, "residual_up"))
        downs.append(_residual_part(module, role, "residual_down"))
        start, stop = projection.roles[role]
        original = done.originals[projection.target]
        originals.append(read_rows(original, projection.layout, start, stop))
        shifts.append(_bias_shift(done, projection, role))
    residual_up, residual_down, ranks = stack_residuals(ups, downs)

    atoms = done.store[key].atoms.detach()
    with torch.no_grad():
        eigenvalues = matrix_pca(originals, 1).eigenvalues  # all L of them
    fit = MatrixPCA(
        atoms=atoms,
        coefficients=torch.stack(coefficients),
        eigenvalues=eigenvalues,
        layer_errors=eigenvalues.new_zeros(len(originals)),
        requested_atoms=atoms.shape[0],
        residual_up=residual_up,
        residual_down=residual_down,
        residual_ranks=ranks,
        bias_shift=_stack_shifts(shifts),
    )
    fit.layer_errors = _layer_errors(fit, originals)
    return fit


def _bias_shift(
    done: Rewrite, projection: Projection, role: str
) -> torch.Tensor | None:
    """The loaded bias less the original's over one role's rows (centered fits
    shift it), or None without a bias."""
    layout = LAYOUTS[projection.layout]
    loaded = layout.bias(done.replacements[projection.target])
    original = layout.bias(done.originals[projection.target])
    if loaded is None or original is None:
        return None
    start, stop = projection.roles[role]
    return (loaded[start:stop].double() - original[start:stop].double()).detach()


def _stack_shifts(shifts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(s is None or not s.any() for s in shifts):
        return None
    shown = next(s for s in shifts if s is not None)
    return torch.stack(
        [shown.new_zeros(shown.shape) if s is None else s for s in shifts]
    )


def _residual_part(
    module: SharedProjection, role: str, name: str
) -> torch.Tensor | None:
    if not module.residual_rank(role):
        return None
    return getattr(module, name)[role].detach()


def _shared_part(module: nn.Module) -> SharedProjection:
    # nn.MultiheadAttention's packed input projection is its child in_proj
    if isinstance(module, SharedMultiheadAttention):
        return module.in_proj
    return module


def _layer_errors(fit: MatrixPCA, originals: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        errors = [
            relative_error(w, fit.reconstruct(i)) for i, w in enumerate(originals)
        ]
    return torch.stack(errors).cpu()


def _role_fit(group: Group, role: str, fit: MatrixPCA) -> RoleFit:
    return RoleFit(
        group=group.index,
        role=role,
        blocks=group.num_blocks,
        shape=group.role_shape(role),
        atoms=fit.num_atoms,
        requested_atoms=fit.requested_atoms,
        energy_kept=fit.energy_kept,
        layer_errors=fit.layer_errors.tolist(),
        residual_rank=fit.residual_rank,
    )


def _count(
    model: nn.Module, done: Rewrite, fits: dict[tuple[int, str], MatrixPCA]
) -> ParameterCount:
    shared_before = sum(
        fit.num_layers * fit.atoms.shape[1] * fit.atoms.shape[2]
        for fit in fits.values()
    )
    attention_before = _unique(done.originals.values())
    attention_after = _unique([done.store, *done.replacements.values()])
    model_after = _unique([model])
    return ParameterCount(
        shared_weights_before=shared_before,
        shared_weights_after=sum(fit.num_parameters for fit in fits.values()),
        attention_before=attention_before,
        attention_after=attention_after,
        model_before=model_after - attention_after + attention_before,
        model_after=model_after,
    )


def _unique(modules: Iterable[nn.Module]) -> int:
    tensors = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in tensors.values())
