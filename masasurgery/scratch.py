"""Start a converted model from random atoms and coefficients, to train it.

The from-scratch recipe is: build the model, ``convert(model, atoms=k,
verify=False)`` (only the structure matters, the fit is thrown away), then
:func:`init_dictionaries`, then train. The dictionaries then start as random as
the dense weights they replace would have.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from masasurgery._uses import DictionaryUses, dictionary_uses
from masasurgery.errors import ConfigError

__all__ = ["InitSummary", "init_dictionaries"]

logger = logging.getLogger(__name__)

# Gram entries of Matrix-PCA atoms are within this of the identity (fp32 fits)
_ORTHONORMAL_TOL = 1e-3


@dataclass
class InitSummary:
    """What :func:`init_dictionaries` set.

    Attributes:
        dictionaries: Dictionaries whose atoms were drawn again.
        coefficients: Coefficient vectors drawn again (one per projection role).
        stds: The target std of the composed weights, by dictionary name.
    """

    dictionaries: int
    coefficients: int
    stds: dict[str, float] = field(default_factory=dict)


def init_dictionaries(
    model: nn.Module,
    *,
    std: float | None = None,
    generator: torch.Generator | None = None,
) -> InitSummary:
    """Draw every dictionary's atoms and every projection's coefficients again.

    Each composed weight ``W_l = sum_s c[l, s] * D_s`` gets entries of variance
    ``std**2``, like a dense weight drawn with that std:

    1. The atoms are iid ``N(0, std**2)``.
    2. The coefficient vector ``c[l]`` of each of the ``L`` users is a random unit
       vector of ``R^S`` (a Gaussian row, normalised). Then every entry of ``W_l``
       is a sum of ``S`` independent terms of variance ``c[l, s]**2 * std**2``,
       so ``Var(W_l[i, j]) = ||c[l]||**2 * std**2 = std**2`` exactly.
    3. Two users ``l, m`` have ``Cov(W_l[i, j], W_m[i, j]) = <c[l], c[m]> std**2``.
       When ``L <= S`` the rows are made orthonormal (QR), so the blocks start
       uncorrelated, as independent dense weights would; with fewer atoms than
       blocks they cannot all be, and the random rows keep them apart.

    A low-rank residual a calibrated fit added to a part is switched off (its
    ``residual_up`` zeroed, so it still trains from zero): it corrected the atoms
    that were drawn again.

    With ``std=None`` the target is measured per dictionary from the weights it
    composes now: their RMS, when the atoms are arbitrary. When the atoms are
    still the orthonormal Matrix-PCA atoms of ``convert`` (``S < L``), the
    composed weights are the rank-``S`` fit of ``L`` weights; for an untrained
    model those are iid, the ``L`` eigenvalues of their Gram matrix are equal up
    to ``O(sqrt(L / (out * in)))``, and the fit keeps ``S / L`` of their energy,
    so the RMS is scaled by ``sqrt(L / S)`` to recover the std they were drawn
    with (timm's ViT: 0.02). Pass ``std`` for a converted *trained* model.

    Dtypes and devices are kept; the draws run on the generator's device (or the
    parameter's, without one) in float32 and are copied in place under
    ``torch.no_grad()``, so optimizers built before keep working.

    Args:
        model: A converted model, e.g. by ``masasurgery.convert(model, atoms=k,
            verify=False)``.
        std: Target std of every composed weight entry; None measures it.
        generator: Random generator for reproducible draws.

    Returns:
        How many dictionaries and coefficient vectors were drawn, and the stds.

    Raises:
        ConfigError: The model holds no dictionary, ``std`` is not positive, or a
            coefficient is parametrized (call this before
            ``add_coefficient_mlp``).

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> summary = init_dictionaries(m, generator=torch.Generator().manual_seed(0))
        >>> summary.dictionaries, summary.coefficients
        (4, 8)
        >>> round(summary.stds["masa.group0_q"], 3)
        0.02
    """
    if std is not None and not std > 0:
        raise ConfigError(f"std must be a positive float, got {std!r}.")
    entries = dictionary_uses(model)
    _check_plain(entries)

    # Measure every target first, so no draw changes another's measurement
    stds = {e.name: std if std is not None else _measured_std(e) for e in entries}
    count = 0
    with torch.no_grad():
        for entry in entries:
            _draw_atoms(entry, stds[entry.name], generator)
            count += _draw_coefficients(entry, generator)
    logger.debug("drew %d dictionaries, stds %s", len(entries), stds)
    return InitSummary(dictionaries=len(entries), coefficients=count, stds=stds)


def _check_plain(entries: list[DictionaryUses]) -> None:
    for entry in entries:
        for use in entry.uses:
            if parametrize.is_parametrized(use.projection.coefficients):
                raise ConfigError(
                    f"the coefficients of {use.name} are parametrized (a "
                    "coefficient MLP is on); call init_dictionaries before "
                    "add_coefficient_mlp, or fold_coefficient_mlp first."
                )


def _measured_std(entry: DictionaryUses) -> float:
    """The std of the weights the dictionary's users were drawn with."""
    with torch.no_grad():
        weights = [u.projection.part_weight(u.role).double() for u in entry.uses]
        if not weights:
            return _rms(entry.dictionary.atoms.double())
        rms = math.sqrt(
            sum(w.square().sum().item() for w in weights)
            / sum(w.numel() for w in weights)
        )
        atoms = entry.dictionary.atoms.double().flatten(1)
        num_atoms, num_users = atoms.shape[0], len(weights)
        if num_atoms < num_users and _orthonormal(atoms):
            rms *= math.sqrt(num_users / num_atoms)
    if rms == 0.0:
        raise ConfigError(
            f"the weights composed from {entry.name} are all zero, so there is no "
            "std to measure; pass std= (e.g. 0.02) to init_dictionaries."
        )
    return rms


def _rms(tensor: Tensor) -> float:
    return tensor.square().mean().sqrt().item()


def _orthonormal(flat_atoms: Tensor) -> bool:
    gram = flat_atoms @ flat_atoms.T  # (S, S)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return bool((gram - eye).abs().max() < _ORTHONORMAL_TOL)


def _randn(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device)


def _draw_atoms(
    entry: DictionaryUses, std: float, generator: torch.Generator | None
) -> None:
    atoms = entry.dictionary.atoms
    atoms.copy_(_randn(tuple(atoms.shape), atoms, generator) * std)


def _draw_coefficients(entry: DictionaryUses, generator: torch.Generator | None) -> int:
    """Unit rows (orthonormal when they fit) as the users' coefficients."""
    if not entry.uses:
        return 0
    num_users, num_atoms = len(entry.uses), entry.dictionary.num_atoms
    like = entry.dictionary.atoms
    rows = _randn((num_users, num_atoms), like, generator).double()
    if num_users <= num_atoms:
        rows = torch.linalg.qr(rows.T).Q.T  # (L, S), orthonormal rows
    rows = rows / rows.norm(dim=1, keepdim=True)
    for use, row in zip(entry.uses, rows, strict=True):
        use.projection.coefficients[use.role].copy_(row)
        residual_up = getattr(use.projection, "residual_up", {})
        if use.role in residual_up:
            residual_up[use.role].zero_()
    return num_users
