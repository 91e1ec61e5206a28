"""The paper's pretrained-model pipeline, built from masasurgery's parts.

"Share Your Attention" compresses a pretrained model in three steps after Matrix
PCA; this is our reading of them, at a given parameter budget:

1. **Grouping.** Consecutive blocks are grouped by calibration data: cut where
   the KL divergence between consecutive blocks' logit-lens distributions is
   largest (1 - cosine of block outputs for models without an LM head), one run
   per six blocks (:func:`masasurgery.grouping.block_divergences`).
2. **Atoms.** Plain Matrix PCA of each run's stacked weights (the weight metric),
   with half of the budget: ``S = (1 - ratio) / 2 * L_run`` atoms, at least one.
3. **Refinement.** Each layer's residual gets a whitened low-rank correction
   (SVD-LLM), with the other half of the budget shared between roles 2:2:1:1
   for q, o, k, v (more to q and o than to k and v).

It is a baseline for ``benchmarks/fidelity.py``, not a library feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from masasurgery.passes.group import Group
from torch import nn

from masasurgery.analyze import Analysis, analyze
from masasurgery.calibrate import Calibration
from masasurgery.config import MasaConfig
from masasurgery.convert import Conversion, apply_fits, role_weights
from masasurgery.fit_data import fit_calibrated
from masasurgery.grouping import block_divergences, regroup, segment_by_divergence

__all__ = ["PaperChoice", "paper_pipeline"]

#: Share of the residual budget each role gets.
ROLE_SHARES = {"q": 2.0, "o": 2.0, "k": 1.0, "v": 1.0}

#: Blocks per run of the grouping.
BLOCKS_PER_RUN = 6


@dataclass
class PaperChoice:
    """What the pipeline chose, for the report."""

    runs: list[int]
    atoms: dict[str, list[int]]
    ranks: dict[str, int]


def paper_pipeline(
    model: nn.Module,
    reference: nn.Module,
    statistics: Calibration,
    batches: Sequence[Any],
    max_parameters: int,
) -> tuple[Conversion, PaperChoice]:
    """Compress ``model`` (a copy of ``reference``) the paper's way."""
    # Grouping by divergence, on the original
    analysis = analyze(reference, batches[0])
    groups = _grouping(reference, analysis, batches)
    analysis = replace(analysis, groups=groups)
    dense = sum(
        math.prod(g.role_shape(r)) * g.num_blocks for g in groups for r in g.roles
    )
    ratio = 1.0 - max_parameters / dense

    # Half the budget to atoms, the rest to ranks 2:2:1:1
    atoms = {
        (g.index, r): max(1, math.floor((1 - ratio) / 2 * g.num_blocks))
        for g in groups
        for r in g.roles
    }
    spent = sum(
        s * math.prod(groups[g].role_shape(r)) + s * groups[g].num_blocks
        for (g, r), s in atoms.items()
    )
    ranks = _ranks(groups, max(0, max_parameters - spent))

    # Fit and rewrite
    fits = {}
    with torch.no_grad():
        for (g, role), count in atoms.items():
            weights = role_weights(model, groups[g], role)
            xtx = [
                statistics[s.projection_of(role).target].xtx for s in groups[g].sites
            ]
            fits[g, role] = fit_calibrated(
                weights, xtx, count, ranks[role], shared_metric="weight"
            )
    config = MasaConfig(atoms=max(atoms.values()))
    conversion = apply_fits(model, analysis, fits, config)
    choice = PaperChoice(
        runs=[g.num_blocks for g in groups],
        atoms={r: [atoms[g.index, r] for g in groups] for r in groups[0].roles},
        ranks=ranks,
    )
    return conversion, choice


def _grouping(
    reference: nn.Module, analysis: Analysis, batches: Sequence[Any]
) -> list[Group]:
    cuts = {}
    for group in analysis.groups:
        runs = min(
            max(1, round(group.num_blocks / BLOCKS_PER_RUN)), group.num_blocks // 2
        )
        if runs <= 1:
            continue
        blocks = [site.block.rpartition(".")[0] for site in group.sites]
        distances = block_divergences(reference, blocks, batches[:4])
        cuts[group.index] = segment_by_divergence(distances, runs)
    return regroup(analysis.groups, cuts)


def _ranks(groups: list[Group], left: int) -> dict[str, int]:
    """One rank per role: its share of ``left``, over every layer's factors."""
    roles = groups[0].roles
    total = sum(ROLE_SHARES[r] for r in roles)
    ranks = {}
    for role in roles:
        per_rank = sum(g.num_blocks * sum(g.role_shape(role)) for g in groups)
        top = min(groups[0].role_shape(role))
        ranks[role] = min(top, math.floor(left * ROLE_SHARES[role] / total / per_rank))
    return ranks
