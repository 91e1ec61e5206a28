"""The training stabiliser: coefficients produced by a small shared MLP.

While the stabiliser is on, every coefficient vector of a projection role is

    c[l] = base[l] + mlp(embedding[l])

where ``mlp`` is one small MLP per dictionary, shared by every block that reads
the dictionary, and ``embedding[l]`` is a learned vector of that block. The blocks'
coefficients then move together through the MLP's weights rather than each on its
own, which is what steadies training from scratch. ``base[l]`` is the coefficient
vector at the moment the stabiliser was added, frozen by default; the MLP's last
layer starts at zero, so adding the stabiliser changes no output, bit for bit.

The implementation is just ``torch.nn.utils.parametrize`` on each entry of
``SharedProjection.coefficients``: reading ``proj.coefficients[role]`` returns the
produced vector, and :func:`fold_coefficient_mlp` removes the parametrizations
with ``leave_parametrized=True``, writing the produced vectors into the very same
coefficient Parameters. Each MLP is registered once, as the child
``coefficient_mlp`` of its :class:`~masasurgery.modules.AtomDictionary` (the
parametrizations reach it through a plain reference to the dictionary), so
``model.parameters()``, ``state_dict()`` and DDP see it once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from masasurgery._uses import DictionaryUses, dictionary_uses, shared_projections
from masasurgery.errors import ConfigError
from masasurgery.modules import AtomDictionary, SharedProjection

__all__ = [
    "CoefficientMLP",
    "ProducedCoefficients",
    "StabilizerSummary",
    "add_coefficient_mlp",
    "fold_coefficient_mlp",
]

logger = logging.getLogger(__name__)

#: Name of the MLP inside each AtomDictionary.
MLP_NAME = "coefficient_mlp"


@dataclass
class StabilizerSummary:
    """What :func:`add_coefficient_mlp` added.

    Attributes:
        dictionaries: MLPs added (one per dictionary).
        coefficients: Coefficient vectors now produced by an MLP.
        parameters: New trainable parameters (MLPs and embeddings).
    """

    dictionaries: int
    coefficients: int
    parameters: int


class CoefficientMLP(nn.Module):
    """``embedding (E,) -> GELU MLP -> coefficient offset (S,)``, last layer zero.

    Args:
        num_atoms: ``S``, the width of the output.
        hidden: Width of the hidden layer.
        embedding_dim: ``E``, the width of the input.
    """

    def __init__(self, num_atoms: int, hidden: int, embedding_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embedding_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_atoms)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(embedding)))


class ProducedCoefficients(nn.Module):
    """The parametrization of one coefficient vector: ``base + mlp(embedding)``.

    Holds the block's embedding; reads the MLP off its dictionary at each call.

    Args:
        dictionary: The dictionary whose ``coefficient_mlp`` produces the offset.
        embedding: The block's initial embedding, shape ``(E,)``.
        base_requires_grad: ``requires_grad`` of the coefficient before, restored
            by :func:`fold_coefficient_mlp`.
    """

    def __init__(
        self, dictionary: AtomDictionary, embedding: Tensor, base_requires_grad: bool
    ) -> None:
        super().__init__()
        self.embedding = nn.Parameter(embedding)  # (E,)
        self.base_requires_grad = base_requires_grad
        object.__setattr__(self, "_dictionary", dictionary)

    def forward(self, base: Tensor) -> Tensor:
        mlp = getattr(self._dictionary, MLP_NAME)
        return base + mlp(self.embedding).to(base.dtype)


def add_coefficient_mlp(
    model: nn.Module,
    *,
    hidden: int = 64,
    embedding_dim: int = 16,
    train_base: bool = False,
    generator: torch.Generator | None = None,
) -> StabilizerSummary:
    """Produce every coefficient vector by its dictionary's MLP while training.

    Each dictionary gets a :class:`CoefficientMLP` (child ``coefficient_mlp``) and
    each of its users a learned embedding, drawn ``N(0, 1)``; the MLP's first
    layer is drawn ``N(0, 1 / E)`` with zero bias, its last layer is zero, so the
    produced coefficients equal the current ones until the first step. MLPs and
    embeddings take the atoms' dtype and device. Build the optimizer after this
    call (the new parameters must be in it), and call
    :func:`fold_coefficient_mlp` when training ends.

    Args:
        model: A converted model.
        hidden: Width of the MLPs' hidden layer.
        embedding_dim: Width of each block's embedding.
        train_base: Keep training the coefficient Parameters themselves too; by
            default they are frozen and only the MLP path moves the coefficients.
        generator: Random generator for the embeddings and first layers.

    Returns:
        How many MLPs, coefficient vectors and new parameters.

    Raises:
        ConfigError: The model holds no dictionary, already has a stabiliser, or
            ``hidden`` / ``embedding_dim`` is not a positive integer.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> x = torch.randn(1, 3, 224, 224)
        >>> before = m(x)
        >>> add_coefficient_mlp(m, hidden=8, embedding_dim=4)
        StabilizerSummary(dictionaries=4, coefficients=8, parameters=228)
        >>> torch.equal(m(x), before)
        True
    """
    # Check everything before the first change
    entries = dictionary_uses(model)
    for name, value in (("hidden", hidden), ("embedding_dim", embedding_dim)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    _check_not_stabilized(entries)

    # One MLP per dictionary, one embedding per user
    count = parameters = 0
    for entry in entries:
        mlp = _new_mlp(entry.dictionary, hidden, embedding_dim, generator)
        entry.dictionary.add_module(MLP_NAME, mlp)
        parameters += sum(p.numel() for p in mlp.parameters())
        for use in entry.uses:
            embedding = _randn((embedding_dim,), entry.dictionary.atoms, generator)
            _produce(use.projection, use.role, entry.dictionary, embedding, train_base)
            parameters += embedding_dim
            count += 1
    logger.debug("stabiliser on %d dictionaries, %d coefficients", len(entries), count)
    return StabilizerSummary(len(entries), count, parameters)


def _check_not_stabilized(entries: list[DictionaryUses]) -> None:
    for entry in entries:
        if hasattr(entry.dictionary, MLP_NAME) or any(
            parametrize.is_parametrized(u.projection.coefficients) for u in entry.uses
        ):
            raise ConfigError(
                f"{entry.name} already has a coefficient MLP; call "
                "fold_coefficient_mlp(model) before adding a new one."
            )


def _randn(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    device = generator.device if generator is not None else like.device
    sample = torch.randn(shape, generator=generator, device=device)
    return sample.to(device=like.device, dtype=like.dtype)


def _new_mlp(
    dictionary: AtomDictionary,
    hidden: int,
    embedding_dim: int,
    generator: torch.Generator | None,
) -> CoefficientMLP:
    atoms = dictionary.atoms
    mlp = CoefficientMLP(dictionary.num_atoms, hidden, embedding_dim)
    mlp.to(device=atoms.device, dtype=atoms.dtype)
    with torch.no_grad():
        weight = _randn((hidden, embedding_dim), atoms, generator)
        mlp.fc1.weight.copy_(weight / math.sqrt(embedding_dim))
        for tensor in (mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias):
            tensor.zero_()
    return mlp


def _produce(
    projection: SharedProjection,
    role: str,
    dictionary: AtomDictionary,
    embedding: Tensor,
    train_base: bool,
) -> None:
    base = projection.coefficients[role]
    produced = ProducedCoefficients(dictionary, embedding, base.requires_grad)
    parametrize.register_parametrization(projection.coefficients, role, produced)
    if not train_base:
        base.requires_grad_(False)


def fold_coefficient_mlp(model: nn.Module) -> int:
    """Write the produced coefficients into plain Parameters; drop the MLPs.

    Afterwards the model has exactly the structure of a plain converted model
    (the same modules, parameter objects and ``state_dict()`` keys in the same
    order), so ``masasurgery.save``, ``plan_of`` and ``materialize`` work on it.
    The coefficient Parameters are the ones that were there before
    :func:`add_coefficient_mlp`, with their ``requires_grad`` restored; an
    optimizer that holds them keeps them.

    Args:
        model: A model with a stabiliser, or without (then nothing happens).

    Returns:
        How many coefficient vectors were folded.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> _ = add_coefficient_mlp(m)
        >>> fold_coefficient_mlp(m)
        8
        >>> masasurgery.plan_of(m).dictionaries[0].key
        'group0_q'
    """
    # Fold every parametrized coefficient vector, keeping the Parameter objects
    count = 0
    for _, projection in shared_projections(model):
        coefficients = projection.coefficients
        if not parametrize.is_parametrized(coefficients):
            continue
        order = list(coefficients.keys())
        for role in list(coefficients.parametrizations.keys()):
            produced = coefficients.parametrizations[role][0]
            with torch.no_grad():
                parametrize.remove_parametrizations(coefficients, role)
            coefficients[role].requires_grad_(produced.base_requires_grad)
            count += 1
        _reorder(coefficients, [*projection.parts, *order])

    # Then drop the MLPs
    for module in model.modules():
        if isinstance(module, AtomDictionary) and hasattr(module, MLP_NAME):
            delattr(module, MLP_NAME)
    return count


def _reorder(coefficients: nn.ParameterDict, order: list[str]) -> None:
    """Put the entries back in their original order (removal appends them)."""
    keys = list(dict.fromkeys(k for k in order if k in coefficients))
    params = [(k, coefficients[k]) for k in keys]
    for key, _ in params:
        del coefficients[key]
    for key, param in params:
        coefficients[key] = param
