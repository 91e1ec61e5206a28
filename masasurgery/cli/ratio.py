"""``--ratio``: the atoms count that reaches a target compression.

A dictionary of ``S`` atoms stands for the ``L`` weights ``(out, in)`` of one role
in one group at the cost of ``S * out * in + L * S`` parameters, instead of
``L * out * in``. One ``atoms`` count applies to every group (capped at each
group's block count), so the ratio is met over all the shared weights together:
the largest ``S`` whose shared weights after are at most ``(1 - ratio)`` of before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from masasurgery.analyze import Analysis
from masasurgery.config import ROLES
from masasurgery.errors import ConfigError

__all__ = ["AtomsChoice", "atoms_for_ratio"]


@dataclass
class AtomsChoice:
    """The atoms count picked for a target ratio, and what it gives.

    Attributes:
        ratio: The reduction of the shared weights asked for.
        atoms: The atoms per dictionary chosen.
        reduction: The reduction it gives, at least ``ratio``.
        shared_before: Parameters of the shared roles' weights, before.
        shared_after: Their atoms and coefficients, after.
    """

    ratio: float
    atoms: int
    reduction: float
    shared_before: int
    shared_after: int

    def __str__(self) -> str:
        return (
            f"--ratio {self.ratio:g}: atoms={self.atoms} removes "
            f"{self.reduction:.2%} of the shared weights "
            f"({self.shared_before:,} -> {self.shared_after:,})"
        )


def atoms_for_ratio(
    analysis: Analysis, ratio: float, roles: Sequence[str] = ROLES
) -> AtomsChoice:
    """The largest atoms count whose reduction of the shared weights is at least
    ``ratio``.

    Args:
        analysis: What :func:`masasurgery.analyze` found.
        ratio: Share of the shared weights to remove, between 0 and 1.
        roles: The roles to share.

    Raises:
        ConfigError: ``ratio`` is out of range, or even one atom removes less.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=6, img_size=32)
        >>> atoms_for_ratio(masasurgery.analyze(m), 0.66).atoms
        2
    """
    # TODO: point at the budget solver of issue 7 (masasurgery.compress) once it
    # lands; it can give each group and role its own atoms count.
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"--ratio is the share of the shared weights to remove, between 0 and 1 "
            f"(e.g. 0.66), got {ratio}."
        )
    sizes = [
        (group.num_blocks, rows * cols)
        for group in analysis.groups
        for role in group.roles
        if role in roles
        for rows, cols in [group.role_shape(role)]
    ]
    if not sizes:
        raise ConfigError(
            f"{analysis.model} has no group of repeated attention blocks with roles "
            f"{list(roles)}, so no ratio can be met."
        )

    # Shared weights after grow with the atoms: keep the largest count that fits
    before = sum(blocks * numel for blocks, numel in sizes)
    choice = None
    for atoms in range(1, max(blocks for blocks, _ in sizes) + 1):
        after = sum(min(atoms, L) * (numel + L) for L, numel in sizes)
        if after > (1.0 - ratio) * before:
            break
        choice = AtomsChoice(ratio, atoms, 1.0 - after / before, before, after)
    if choice is None:
        one = sum(numel + L for L, numel in sizes)
        raise ConfigError(
            f"--ratio {ratio} cannot be reached: one atom per dictionary already "
            f"keeps {one / before:.2%} of the shared weights; ask for at most "
            f"{1.0 - one / before:.3f}."
        )
    return choice
