"""Save and load converted models: safetensors weights plus a JSON plan.

A checkpoint is a folder of two files:

* ``model.safetensors``: the model's ``state_dict()``. Every atom tensor is in it
  once (the store registers each dictionary once); a tensor the model ties to
  another key (tied embeddings) is stored once and listed as an alias.
* ``masasurgery.json``: the format version, the options of the conversion, the
  aliases and the plan (:class:`~masasurgery.passes.plans.RewritePlan`): which
  dictionaries exist and which parts make up each replaced projection, with its
  layout. That is enough to rebuild the converted structure on a freshly built
  original model, without running the analysis again.

Nothing in a checkpoint is executed: the weights are read by safetensors (no
pickle) and the plan by ``json``. Loading checks every key, shape and dtype
against the model before copying any weight, and a mismatch leaves the model as
it was.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from masasurgery._checks import check_module
from masasurgery.checkpoint import (
    FORMAT_VERSION,
    PLAN_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    checkpoint_from_dict,
)
from masasurgery.config import ROLES, MasaConfig
from masasurgery.errors import AlreadyConvertedError, CheckpointError
from masasurgery.passes.plans import RewritePlan, plan_of, skeleton, swap_in
from masasurgery.passes.rewrite import Rewrite, restore

if TYPE_CHECKING:
    from masasurgery.convert import Conversion

__all__ = [
    "FORMAT_VERSION",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "load",
    "read_checkpoint",
    "save",
]

logger = logging.getLogger(__name__)


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    conversion: Conversion | None = None,
) -> Checkpoint:
    """Save a converted model to the folder ``path``: weights and plan.

    Writes ``model.safetensors`` (the ``state_dict()``, atoms once, tied tensors
    once) and ``masasurgery.json`` (format version, options, aliases and the plan
    that rebuilds the structure). Existing files of those names are replaced;
    each file is written whole or not at all.

    Args:
        model: The converted model (a model that was never converted saves with
            an empty plan).
        path: The checkpoint folder; created if missing.
        conversion: The record :func:`masasurgery.convert` returned, to record its
            exact options; checked against the model.

    Returns:
        The checkpoint written: its files, plan and options.

    Raises:
        ConfigError: ``model`` is not a ``torch.nn.Module``.
        CheckpointError: ``path`` is a file or cannot be made a folder, the model
            has tensors on the meta device or state that is not a tensor, or
            ``conversion`` does not describe this model; nothing was written.

    Example:
        >>> import tempfile, timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> conversion = masasurgery.convert(m, atoms=1, verify=False)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     saved = masasurgery.save(m, folder, conversion=conversion)
        ...     files = sorted(p.name for p in saved.directory.iterdir())
        >>> files
        ['masasurgery.json', 'model.safetensors']
        >>> saved.config, len(saved.plan.projections)
        (MasaConfig(atoms=1, roles=('q', 'k', 'v', 'o')), 4)
    """
    # The plan and options, read off the model
    check_module(model)
    _check_folder(Path(path))
    plan = plan_of(model)
    if conversion is not None:
        _check_conversion(model, conversion, plan)
    tensors, aliases = _tensors_to_save(model)
    checkpoint = Checkpoint(
        directory=Path(path),
        model=type(model).__name__,
        plan=plan,
        config=conversion.config if conversion is not None else _config_of(plan),
        aliases=aliases,
        compression=_compression_of(conversion),
        masasurgery_version=_version(),
    )

    # Write each file under a temporary name, then move it into place
    _make_folder(checkpoint.directory)
    metadata = {"format": "pt", "masasurgery_format_version": str(FORMAT_VERSION)}
    _write(
        checkpoint.weights_file,
        lambda f: _safetensors().save_file(tensors, f, metadata=metadata),
    )
    text = json.dumps(checkpoint.to_dict(), indent=1)
    _write(checkpoint.plan_file, lambda f: Path(f).write_text(text + "\n"))
    logger.debug(
        "saved %d tensors (%d aliases) to %s", len(tensors), len(aliases), path
    )
    return checkpoint


def load(model: nn.Module, path: str | os.PathLike) -> Checkpoint:
    """Load a saved conversion into a freshly built original model, in place.

    The plan rebuilds the converted structure (no analysis runs), then the weights
    are loaded: copied into the model's own tensors, so the result is bit-exact
    and keeps the model's device. A model on the meta device gets the file's
    tensors themselves (on the CPU), ties re-made. A model already converted with
    the same plan just gets the weights.

    The plan is checked against the model before the structure is swapped in,
    and every key, shape and dtype of the file against the swapped-in model
    before any weight is copied; on a mismatch the original modules are put back,
    so the model is left as it was.

    Args:
        model: The original model, built by its own code with the options it was
            saved with, in the saved dtype (on any device, or on meta).
        path: The checkpoint folder :func:`save` wrote.

    Returns:
        The checkpoint read: its plan, options and aliases.

    Raises:
        ConfigError: ``model`` is not a ``torch.nn.Module``.
        CheckpointError: The folder is missing or not a readable checkpoint, or
            it does not match the model; the message names the first mismatching
            key.
        AlreadyConvertedError: The model is already converted, differently.

    Example:
        >>> import tempfile, timm, masasurgery
        >>> make = lambda: timm.create_model("vit_tiny_patch16_224", depth=2)
        >>> m = make()
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> fresh = make()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = masasurgery.save(m, folder)
        ...     _ = masasurgery.load(fresh, folder)
        >>> x = torch.randn(1, 3, 224, 224)
        >>> torch.equal(fresh.eval()(x), m.eval()(x))
        True
    """
    # Read the files, and build the structure without swapping it in
    check_module(model)
    checkpoint = read_checkpoint(path)
    tensors = _read_weights(checkpoint)
    done = _prepare(model, checkpoint)

    # Swap it in, check every entry, load; any failure swaps the originals back
    if done is not None:
        swap_in(model, done)
    try:
        expected = model.state_dict(keep_vars=True)
        _check_entries(model, checkpoint, expected, tensors)
        _load_entries(model, checkpoint, expected, tensors)
    except BaseException:
        if done is not None:
            restore(model, done)
        raise
    return checkpoint


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint's plan file (not its weights) and check its layout.

    Args:
        path: The checkpoint folder :func:`save` wrote.

    Returns:
        The plan, options and aliases it holds.

    Raises:
        CheckpointError: No such folder, no plan file, not JSON, another format,
            a newer format version, or a malformed plan; the message says which
            field.

    Example:
        >>> import tempfile, timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=2, roles=("q", "k"), verify=False)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = masasurgery.save(m, folder)
        ...     checkpoint = masasurgery.read_checkpoint(folder)
        >>> checkpoint.model, checkpoint.config.roles, checkpoint.format_version
        ('VisionTransformer', ('q', 'k'), 1)
        >>> [p.name for p in checkpoint.plan.projections[0].parts]
        ['q', 'k', 'v']
    """
    # The file, as JSON
    directory = Path(path)
    plan_file = directory / PLAN_FILE
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint folder {str(directory)!r} {what}; expected a folder "
            "written by masasurgery.save (a plan file and model.safetensors). "
            "Check the path."
        )
    if not plan_file.is_file():
        raise CheckpointError(
            f"{directory} has no {PLAN_FILE}; expected a folder written by "
            "masasurgery.save (a plan file and model.safetensors)."
        )
    try:
        data = json.loads(plan_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{plan_file} is not valid JSON: {e}") from e

    # Its format and version, then its content
    return checkpoint_from_dict(directory, data, plan_file)


# ---------------------------------------------------------------------------
# Saving


def _check_conversion(
    model: nn.Module, conversion: Conversion, plan: RewritePlan
) -> None:
    """The conversion replaced exactly the plan's projections, with its layouts,
    in this very model."""
    targets = {p.target: p.layout for p in plan.projections}
    replaced = sorted(conversion.rewrite.replacements)
    if replaced != sorted(targets):
        raise CheckpointError(
            f"the conversion replaced {len(replaced)} projections, the model holds "
            f"{len(targets)} ({sorted(set(replaced) ^ set(targets))[:3]} differ); "
            "pass the Conversion that convert returned for this very model."
        )
    foreign = conversion.foreign_target(model)
    if foreign is not None:
        raise CheckpointError(
            f"the conversion describes another {type(model).__name__}: its "
            f"replacement for {foreign!r} is not the module in this model. Pass "
            "the Conversion that convert returned for this very model, or none. "
            "Nothing was written."
        )
    for group in conversion.analysis.groups:
        for site in group.sites:
            for projection in site.projections:
                layout = targets.get(projection.target, projection.layout)
                if layout != projection.layout:
                    raise CheckpointError(
                        f"{projection.target}: the analysis found layout "
                        f"{projection.layout!r}, the module says {layout!r}."
                    )


def _check_folder(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"cannot save to {str(directory)!r}: it is a file, and a checkpoint is "
            f"a folder ({WEIGHTS_FILE} and {PLAN_FILE}). Pass the path of a new "
            "or existing folder. Nothing was written."
        )


def _make_folder(directory: Path) -> None:
    # A file on the way (a/b where a is a file), or no permission
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot make the checkpoint folder {str(directory)!r}: "
            f"{type(e).__name__}: {e.strerror or e}. Pass a folder path that can be "
            "created. Nothing was written."
        ) from e


def _config_of(plan: RewritePlan) -> MasaConfig | None:
    if not plan.dictionaries:
        return None
    roles = {d.role for d in plan.dictionaries}
    return MasaConfig(
        atoms=max(d.atoms for d in plan.dictionaries),
        roles=tuple(r for r in ROLES if r in roles),
    )


def _compression_of(conversion: Conversion | None) -> dict[str, Any] | None:
    # What compress chose (target, metric, atoms and ranks), for the plan file
    if conversion is None or conversion.compression is None:
        return None
    return conversion.compression.to_dict()


def _tensors_to_save(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict, each storage view once, contiguous and on the CPU."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        # Only real tensors can be written
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a "
                "tensor; safetensors stores tensors only."
            )
        if value.is_meta:
            raise CheckpointError(
                f"{key!r} is on the meta device, so it holds no data to save; "
                "load or initialise the weights before saving."
            )

        # A second key for the very same view is an alias (tied weights)
        view = _view(value)
        if view is not None and view in views:
            aliases[key] = views[view]
            continue
        if view is not None:
            views[view] = key
        tensors[key] = value.detach().cpu().contiguous()
    return _unshare(tensors), aliases


def _view(t: Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    storage = t.untyped_storage()
    return (
        t.device,
        storage.data_ptr(),
        t.storage_offset(),
        t.dtype,
        t.shape,
        t.stride(),
    )


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # Different views of one storage (e.g. slices of a packed weight) are copied
    owners: dict[int, int] = {}
    for t in tensors.values():
        ptr = t.untyped_storage().data_ptr()
        owners[ptr] = owners.get(ptr, 0) + 1
    return {
        key: t.clone()
        if t.numel() and owners[t.untyped_storage().data_ptr()] > 1
        else t
        for key, t in tensors.items()
    }


def _write(target: Path, write: Any) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        write(str(partial))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _version() -> str:
    from masasurgery import __version__

    return __version__


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:  # imported here so `import masasurgery` works without
        raise ImportError(
            "masasurgery.save and masasurgery.load need safetensors: "
            "pip install safetensors"
        ) from e
    return safetensors.torch


# ---------------------------------------------------------------------------
# Loading


def _read_weights(checkpoint: Checkpoint) -> dict[str, Tensor]:
    path = checkpoint.weights_file
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint.directory} has a plan file but no {WEIGHTS_FILE}; the "
            "checkpoint is incomplete."
        )
    try:
        return _safetensors().load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"could not read {path}: {e}") from e


def _prepare(model: nn.Module, checkpoint: Checkpoint) -> Rewrite | None:
    """The skeleton to swap in; None when the model already has the plan's shape."""
    plan = checkpoint.plan
    current = plan_of(model)
    if current == plan:
        return None
    if current.projections or current.dictionaries:
        raise AlreadyConvertedError(
            f"{type(model).__name__} is already converted, with another structure "
            f"than the checkpoint ({_plan_difference(current, plan)}); load into a "
            "freshly built original model."
        )
    try:
        return skeleton(model, plan)
    except CheckpointError as e:
        # The skeleton's own "build the model ..." advice: _mismatch gives it
        what = str(e).split("; build the model", 1)[0].rstrip(".")
        raise _mismatch(model, checkpoint, what) from e


def _shapes(plan: RewritePlan) -> list[str]:
    return [
        f"{d.key}: {d.atoms}x{d.out_features}x{d.in_features}"
        for d in plan.dictionaries
    ]


def _plan_difference(current: RewritePlan, saved: RewritePlan) -> str:
    if current.dictionaries != saved.dictionaries:
        return (
            f"dictionaries {_shapes(current)} in the model vs {_shapes(saved)} in "
            "the checkpoint (key: atoms x out x in)"
        )
    for now, then in zip(current.projections, saved.projections, strict=False):
        if now != then:
            return f"first difference at {now.target}"
    return (
        f"{len(current.projections)} projections in the model vs "
        f"{len(saved.projections)} in the checkpoint"
    )


def _check_entries(
    model: nn.Module,
    checkpoint: Checkpoint,
    expected: dict[str, Tensor],
    tensors: dict[str, Tensor],
) -> None:
    """Raise naming the first key whose presence, shape or dtype differs."""
    mismatches = []
    for key, want in expected.items():
        source = checkpoint.aliases.get(key, key)
        got = tensors.get(source)
        if got is None:
            mismatches.append(f"{key!r} is in the model but not in the checkpoint")
        elif got.shape != want.shape:
            mismatches.append(
                f"{key!r} has shape {tuple(got.shape)} in the checkpoint, "
                f"{tuple(want.shape)} in the model"
            )
        elif got.dtype != want.dtype:
            mismatches.append(
                f"{key!r} is {got.dtype} in the checkpoint, {want.dtype} in the "
                f"model (cast the model first: model.to({got.dtype}))"
            )
    unexpected = [k for k in [*tensors, *checkpoint.aliases] if k not in expected]
    mismatches += [
        f"{k!r} is in the checkpoint but not in the model" for k in unexpected
    ]
    if not mismatches:
        return

    others = len(mismatches) - 1
    more = f" ({others} more mismatch{'es' * (others > 1)})" if others else ""
    raise _mismatch(model, checkpoint, f"first mismatching key: {mismatches[0]}{more}")


def _mismatch(model: nn.Module, checkpoint: Checkpoint, what: str) -> CheckpointError:
    return CheckpointError(
        f"{checkpoint.directory} does not match {type(model).__name__}: {what}. "
        f"The model was not changed. Build the model as it was saved "
        f"({checkpoint.model}, same architecture and options, same dtype) before "
        "loading."
    )


def _load_entries(
    model: nn.Module,
    checkpoint: Checkpoint,
    expected: dict[str, Tensor],
    tensors: dict[str, Tensor],
) -> None:
    """Copy into the model's tensors; a meta model takes the file's tensors."""
    state = {key: tensors[checkpoint.aliases.get(key, key)] for key in expected}
    if not any(t.is_meta for t in expected.values()):
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        return
    _check_meta_buffers(model, expected)
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, checkpoint.aliases)


def _check_meta_buffers(model: nn.Module, expected: dict[str, Tensor]) -> None:
    # Buffers kept out of state_dict would stay on meta: no data anywhere
    missing = [n for n, b in model.named_buffers() if b.is_meta and n not in expected]
    if missing:
        raise CheckpointError(
            f"{type(model).__name__} is on the meta device and has buffers that no "
            f"checkpoint holds (non-persistent; first: {missing[0]!r}); build it on "
            "a real device, or call model.to_empty(device=...) and initialise "
            "them, then load. The model was not changed."
        )


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias the very tensor of its source again (``assign`` split them)."""
    for alias, source in aliases.items():
        owner_name, _, name = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        source_owner_name, _, source_name = source.rpartition(".")
        source_owner = model.get_submodule(source_owner_name)
        if name in owner._parameters:
            owner._parameters[name] = source_owner._parameters[source_name]
        elif name in owner._buffers:
            owner._buffers[name] = source_owner._buffers[source_name]
