"""``--calibration PATH``: the data a calibrated conversion is fitted to.

PATH is one of:

* a folder of input statistics written by ``Calibration.save`` (or
  ``collect_statistics(cache_dir=...)``): used as they are;
* a ``.safetensors`` file, or a ``.pt`` file of tensors (``torch.save``): one
  tensor of model inputs (images ``(N, C, H, W)``, token ids ``(N, T)``), or
  several tensors named after ``forward`` arguments (``input_ids``,
  ``attention_mask``), all with ``N`` rows. They are cut into batches of
  ``--batch-size``.

The data goes to :func:`masasurgery.compress.compress`, which fits the atoms to
the projections' inputs and, with ``--ratio``, spends the budget where the data
says it matters.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masasurgery.cli.examples import to_model
from masasurgery.errors import ConfigError

__all__ = ["read_calibration"]


def read_calibration(path: str, model: nn.Module, batch_size: int) -> Any:
    """The calibration data at ``path``: statistics, or a list of batches on the
    model's device.

    Raises:
        ConfigError: The path does not exist, or its tensors do not form inputs.

    Example:
        >>> import tempfile, timm
        >>> from safetensors.torch import save_file
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = f"{folder}/x.safetensors"
        ...     save_file({"images": torch.randn(5, 3, 32, 32)}, path)
        ...     batches = read_calibration(path, m, 2)
        >>> [tuple(b.shape) for b in batches]
        [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    """
    source = Path(path)
    if source.is_dir():
        from masasurgery.calibrate import Calibration

        return Calibration.load(source)
    if not source.is_file():
        raise ConfigError(f"--calibration {path}: no such file or folder.")

    tensors = _read_tensors(source)
    rows = {t.shape[0] if t.dim() else 0 for t in tensors.values()}
    if len(rows) != 1 or 0 in rows:
        raise ConfigError(
            f"--calibration {path}: every tensor needs the same number of rows "
            f"(examples) in dimension 0, got shapes "
            f"{ {k: tuple(t.shape) for k, t in tensors.items()} }."
        )
    (count,) = rows
    keyword = _keyword(tensors, model, path)
    batches = []
    for start in range(0, count, batch_size):
        chunk = {k: t[start : start + batch_size] for k, t in tensors.items()}
        batches.append(
            to_model(chunk if keyword else next(iter(chunk.values())), model)
        )
    return batches


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file it cannot read
        raise ConfigError(
            f"--calibration {path} is neither a safetensors file nor a torch file of "
            f"tensors ({type(e).__name__}: {str(e).splitlines()[0]})."
        ) from e
    if isinstance(data, torch.Tensor):
        return {"inputs": data}
    if isinstance(data, dict) and all(
        isinstance(t, torch.Tensor) for t in data.values()
    ):
        return dict(data)
    raise ConfigError(
        f"--calibration {path} holds a {type(data).__name__}; expected a tensor or "
        "a dict of tensors."
    )


def _keyword(tensors: dict[str, torch.Tensor], model: nn.Module, path: str) -> bool:
    """True when the tensors are keyword arguments of ``forward``; False for one
    positional input."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if all(name in parameters for name in tensors):
        return True
    if len(tensors) == 1:
        return False
    raise ConfigError(
        f"--calibration {path} holds tensors {sorted(tensors)}; several tensors must "
        f"be named after {type(model).__name__}.forward arguments "
        f"({', '.join(list(parameters)[:5])})."
    )
