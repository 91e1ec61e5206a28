"""Options of a conversion, validated once and round-tripped through JSON."""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from masasurgery.errors import ConfigError

__all__ = ["ROLES", "MasaConfig"]

#: The projection roles of an attention block, in the order they are reported.
ROLES: tuple[str, ...] = ("q", "k", "v", "o")


@dataclass(frozen=True)
class MasaConfig:
    """What to share and how many atoms each dictionary gets.

    Args:
        atoms: Atoms per dictionary (one dictionary per group and role). A group with
            fewer blocks than ``atoms`` gets one atom per block (lossless there).
        roles: Which projection roles share a dictionary; the others stay dense.

    Example:
        >>> MasaConfig(atoms=4).to_json()
        '{"atoms": 4, "roles": ["q", "k", "v", "o"]}'
        >>> MasaConfig.from_json('{"atoms": 2, "roles": ["q", "k"]}').roles
        ('q', 'k')
    """

    atoms: int
    roles: tuple[str, ...] = field(default=ROLES)

    def __post_init__(self) -> None:
        # Check atoms: a positive integer, not a bool or a float
        atoms = self.atoms
        if isinstance(atoms, bool) or not isinstance(atoms, numbers.Integral):
            raise ConfigError(
                f"atoms must be a positive integer (atoms per dictionary), got "
                f"{atoms!r} of type {type(atoms).__name__}; pass e.g. atoms=4."
            )
        if atoms < 1:
            raise ConfigError(
                f"atoms must be at least 1, got {atoms}; with L blocks, atoms=L is "
                "lossless and atoms=L//3 removes two thirds of the attention weights."
            )
        object.__setattr__(self, "atoms", int(atoms))

        # Check roles: a non-empty subset of ROLES, kept in canonical order
        roles = (self.roles,) if isinstance(self.roles, str) else tuple(self.roles)
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise ConfigError(
                f"roles must be a non-empty subset of {list(ROLES)}, got {list(roles)}."
            )
        object.__setattr__(self, "roles", tuple(r for r in ROLES if r in roles))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        data = asdict(self)
        data["roles"] = list(self.roles)
        return data

    def to_json(self) -> str:
        """The options as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MasaConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        unknown = sorted(set(data) - {"atoms", "roles"})
        if unknown:
            raise ConfigError(
                f"unknown MasaConfig keys {unknown}; expected 'atoms' and 'roles'."
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MasaConfig:
        """Build from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))
