"""The checkpoint record and its plan file's JSON form, checked field by field.

A checkpoint's ``masasurgery.json`` holds the format name and version, the
conversion's options, the tied-tensor aliases and the plan
(:class:`~masasurgery.passes.plans.RewritePlan`). :class:`Checkpoint` is that
file in memory; :func:`checkpoint_from_dict` reads it back, refusing anything
malformed with a :class:`~masasurgery.errors.CheckpointError` that names the
field. Saving and loading the weights are in :mod:`masasurgery.io`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from masasurgery.config import MasaConfig
from masasurgery.errors import CheckpointError, ConfigError
from masasurgery.passes.plans import (
    DictionaryPlan,
    PartPlan,
    ProjectionPlan,
    RewritePlan,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "checkpoint_from_dict",
]

#: Version of the plan file's layout; a reader refuses newer versions.
FORMAT_VERSION = 1
#: The name every plan file declares.
FORMAT_NAME = "masasurgery"
#: File names inside a checkpoint folder.
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "masasurgery.json"


@dataclass
class Checkpoint:
    """A saved conversion: where its files are and what its plan file says.

    Attributes:
        directory: The checkpoint folder.
        model: Class name of the model it was saved from.
        plan: The converted structure; empty for a model that was not converted.
        config: The conversion's options: those of the ``Conversion`` when one was
            passed to :func:`save`, else read off the dictionaries (``atoms`` is
            then the largest dictionary). None when nothing was converted.
        compression: What :func:`masasurgery.compress` chose (its
            :meth:`~masasurgery.compress.Compression.to_dict`: the target, the
            metric, the atoms and ranks of every dictionary), when the saved
            conversion came from it; None otherwise.
        aliases: Tied tensors: a ``state_dict`` key -> the key whose tensor it
            shares, stored once under that key.
        format_version: Version of the plan file's layout.
        masasurgery_version: The masasurgery that wrote it.
    """

    directory: Path
    model: str
    plan: RewritePlan = field(repr=False)
    config: MasaConfig | None
    aliases: dict[str, str] = field(default_factory=dict, repr=False)
    compression: dict[str, Any] | None = field(default=None, repr=False)
    format_version: int = FORMAT_VERSION
    masasurgery_version: str = ""

    def __str__(self) -> str:
        options = "not converted" if self.config is None else self.config.to_json()
        if self.compression is not None:
            options += f" (compressed to {self.compression.get('target')})"
        return (
            f"masasurgery checkpoint of {self.model} at {self.directory} "
            f"(format {self.format_version}): {options}, "
            f"{len(self.plan.projections)} shared projections, "
            f"{len(self.plan.dictionaries)} dictionaries"
        )

    @property
    def weights_file(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def plan_file(self) -> Path:
        return self.directory / PLAN_FILE

    @property
    def num_bytes(self) -> int:
        """Size of the weights file, in bytes."""
        return self.weights_file.stat().st_size

    def to_dict(self) -> dict[str, Any]:
        """The plan file's content, as plain data."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "masasurgery_version": self.masasurgery_version,
            "model": self.model,
            "weights": WEIGHTS_FILE,
            "config": None if self.config is None else self.config.to_dict(),
            "aliases": dict(self.aliases),
            "compression": self.compression,
            "plan": {
                "dictionaries": [asdict(d) for d in self.plan.dictionaries],
                "projections": [_projection_dict(p) for p in self.plan.projections],
            },
        }


def checkpoint_from_dict(
    directory: Path, data: Any, plan_file: Path | None = None
) -> Checkpoint:
    """The checkpoint a plan file describes, after checking its format.

    Args:
        directory: The checkpoint folder.
        data: The plan file's content, as parsed JSON.
        plan_file: The file it came from, for the messages.

    Raises:
        CheckpointError: Another format, a newer format version, or a malformed
            field; the message says which.
    """
    plan_file = directory / PLAN_FILE if plan_file is None else plan_file
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{plan_file} is not a masasurgery plan: expected format "
            f"{FORMAT_NAME!r}, got {got!r}."
        )
    version = _field(data, "format_version", int, "the plan file")
    if version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{plan_file} has format version {version}; this masasurgery reads "
            f"versions 1 to {FORMAT_VERSION}. Upgrade masasurgery to load it."
        )
    return _checkpoint(directory, data)


def _projection_dict(p: ProjectionPlan) -> dict[str, Any]:
    data = asdict(p)
    data["parts"] = [asdict(part) for part in p.parts]
    return data


# ---------------------------------------------------------------------------
# Reading the plan file, field by field


def _checkpoint(directory: Path, data: dict[str, Any]) -> Checkpoint:
    where = "the plan file"
    plan = _field(data, "plan", dict, where)
    dictionaries = _field(plan, "dictionaries", list, "plan")
    projections = _field(plan, "projections", list, "plan")
    aliases = _field(data, "aliases", dict, where)
    if not all(isinstance(v, str) for v in [*aliases, *aliases.values()]):
        raise CheckpointError(f"{where}: aliases must map strings to strings.")
    return Checkpoint(
        directory=directory,
        model=_field(data, "model", str, where),
        plan=RewritePlan(
            dictionaries=tuple(_dictionary_plan(d) for d in dictionaries),
            projections=tuple(_projection_plan(p) for p in projections),
        ),
        config=_config_from(data.get("config")),
        aliases=dict(aliases),
        compression=_compression_from(data.get("compression")),
        format_version=data["format_version"],
        masasurgery_version=str(data.get("masasurgery_version", "")),
    )


def _dictionary_plan(data: Any) -> DictionaryPlan:
    where = "a plan dictionary"
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be an object, got {data!r}.")
    return DictionaryPlan(
        key=_name(data, "key", where),
        role=_field(data, "role", str, where),
        atoms=_count(data, "atoms", where, minimum=0),
        out_features=_count(data, "out_features", where),
        in_features=_count(data, "in_features", where),
    )


def _projection_plan(data: Any) -> ProjectionPlan:
    if not isinstance(data, dict):
        raise CheckpointError(f"a plan projection must be an object, got {data!r}.")
    where = f"plan projection {data.get('target')!r}"
    parts = []
    for part in _field(data, "parts", list, where):
        if not isinstance(part, dict):
            raise CheckpointError(f"{where}: a part must be an object, got {part!r}.")
        dictionary = part.get("dictionary")
        if dictionary is not None and not isinstance(dictionary, str):
            raise CheckpointError(
                f"{where}: a part's dictionary must be a string or null, got "
                f"{dictionary!r}."
            )
        rank = part.get("rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise CheckpointError(
                f"{where}: a part's rank must be a non-negative integer, got {rank!r}."
            )
        parts.append(
            PartPlan(
                _name(part, "name", where),
                _count(part, "rows", where),
                dictionary,
                rank,
            )
        )
    return ProjectionPlan(
        target=_field(data, "target", str, where),
        layout=_field(data, "layout", str, where),
        in_features=_count(data, "in_features", where),
        bias=_field(data, "bias", bool, where),
        parts=tuple(parts),
    )


def _config_from(data: Any) -> MasaConfig | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"the plan file's config must be an object, got {data!r}."
        )
    try:
        return MasaConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"the plan file's config is invalid: {e}") from e


def _compression_from(data: Any) -> dict[str, Any] | None:
    # Written by format 1 files since compress recorded its choice; optional
    if data is not None and not isinstance(data, dict):
        raise CheckpointError(
            f"the plan file's compression must be an object or null, got {data!r}."
        )
    return data


def _field(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    # bool is an int in Python; a count must not be True
    wrong = kind is int and isinstance(value, bool)
    if not isinstance(value, kind) or wrong:
        raise CheckpointError(
            f"{where}: {key!r} must be a {kind.__name__}, got {value!r}; the plan "
            "file is damaged or was not written by masasurgery.save."
        )
    return value


def _count(data: dict[str, Any], key: str, where: str, minimum: int = 1) -> int:
    value = _field(data, key, int, where)
    if value < minimum:
        raise CheckpointError(
            f"{where}: {key!r} must be at least {minimum}, got {value}."
        )
    return value


def _name(data: dict[str, Any], key: str, where: str) -> str:
    # Module and parameter names: no dots, not empty
    value = _field(data, key, str, where)
    if not value or "." in value:
        raise CheckpointError(
            f"{where}: {key!r} must be a non-empty name without dots, got {value!r}."
        )
    return value
