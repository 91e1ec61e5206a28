"""Which shared projections read which dictionary, in module order."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from masasurgery.errors import ConfigError
from masasurgery.modules import AtomDictionary, SharedProjection

__all__ = ["DictionaryUses", "Use", "dictionary_uses", "shared_projections"]


@dataclass(frozen=True)
class Use:
    """One projection reading one dictionary for one role."""

    name: str
    projection: SharedProjection
    role: str


@dataclass
class DictionaryUses:
    """A dictionary, its qualified name, and the projections that read it."""

    name: str
    dictionary: AtomDictionary
    uses: list[Use] = field(default_factory=list)


def shared_projections(model: nn.Module) -> list[tuple[str, SharedProjection]]:
    """Every shared projection of ``model`` with its qualified name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, SharedProjection)
    ]


def dictionary_uses(model: nn.Module) -> list[DictionaryUses]:
    """Every dictionary registered in ``model`` and its users, in module order.

    Raises:
        ConfigError: The model holds no dictionary (it was not converted).
    """
    # Each dictionary once, under the name the model registers it at
    found: dict[int, DictionaryUses] = {}
    for name, module in model.named_modules():
        if isinstance(module, AtomDictionary) and id(module) not in found:
            found[id(module)] = DictionaryUses(name, module)
    if not found:
        raise ConfigError(
            f"{type(model).__name__} holds no AtomDictionary; expected a model "
            "converted by masasurgery.convert (model.masa holds the dictionaries)."
        )

    # Then who reads it, role by role
    for name, projection in shared_projections(model):
        for role, dictionary in projection.dictionaries.items():
            if id(dictionary) in found:
                found[id(dictionary)].uses.append(Use(name, projection, role))
    return list(found.values())
