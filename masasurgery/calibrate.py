"""Calibration: the input statistics ``X^T X`` of every projection, streamed.

A data-aware fit minimises the error of a projection's *outputs*,
``||(W - W^) X||_F^2 = tr((W - W^) C (W - W^)^T)`` with ``C = X^T X``, so all it
needs of the data is ``C`` for the input of each projection: an ``(in, in)``
matrix, summed over every token of every calibration batch, in float64.

:func:`collect_statistics` runs the model on the batches with forward hooks on
the projections and adds each batch's ``X^T X`` (float32 products of one batch,
summed in float64). With ``max_bytes`` it bounds what it holds: the projections
are split into passes whose statistics fit, each pass runs the data once, and
finished statistics go to ``cache_dir`` (safetensors) and are read back one at a
time by the :class:`Calibration` that is returned.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from masasurgery.errors import MODEL_FAILURES, ConfigError, MasaWarning, ModelRunError
from masasurgery.passes.capture import Inputs

__all__ = ["Calibration", "InputStatistics", "collect_statistics"]

logger = logging.getLogger(__name__)

#: File name ending of the output-gradient statistics that
#: :func:`masasurgery.sensitivity.collect_sensitivity` may keep in the same folder.
SENSITIVITY_SUFFIX = ".gtg.safetensors"


@dataclass
class InputStatistics:
    """What the data says about one projection's input.

    Attributes:
        xtx: ``X^T X`` over every calibration token, ``(in, in)``, float64.
        tokens: How many input rows (tokens, or pixels for a 1x1 convolution)
            were added up.
        total: The sum of the input rows, ``(in,)``, float64, or None in
            statistics saved before it was collected.
    """

    xtx: Tensor
    tokens: int
    total: Tensor | None = None

    @property
    def covariance(self) -> Tensor:
        """``X^T X / tokens``: the second moment per token (not centred)."""
        return self.xtx / max(self.tokens, 1)

    @property
    def mean(self) -> Tensor | None:
        """The mean input row, ``(in,)``, float64, or None without ``total``."""
        if self.total is None:
            return None
        return self.total / max(self.tokens, 1)

    def centered(self) -> Tensor:
        """``(X - 1 mean)^T (X - 1 mean)``: ``X^T X`` about the mean input.

        A fit in this metric leaves the mean's share of the error to the bias
        (:mod:`masasurgery.compress`), which corrects it exactly.

        Raises:
            ConfigError: The statistics hold no ``total`` (saved by an older
                version); collect them again.
        """
        if self.total is None:
            raise ConfigError(
                "these statistics hold no input sum (saved by an older "
                "masasurgery), so they cannot be centered; collect them again with "
                "collect_statistics, or pass center=False."
            )
        mean = self.mean
        return self.xtx - self.tokens * torch.outer(mean, mean)


@dataclass
class Calibration:
    """The statistics of every calibrated projection, by qualified name.

    Held in memory, or read from ``cache_dir`` one projection at a time when the
    collection was bounded by ``max_bytes``.

    Attributes:
        targets: The projections, by qualified module name, in collection
            order (sorted by name when read back with :meth:`load`).
        cache_dir: Where the statistics are kept on disk, or None.
    """

    targets: list[str]
    cache_dir: Path | None = None
    _memory: dict[str, InputStatistics] = field(default_factory=dict, repr=False)

    def __getitem__(self, target: str) -> InputStatistics:
        if target in self._memory:
            return self._memory[target]
        if self.cache_dir is None or target not in self.targets:
            raise KeyError(
                f"no calibration statistics for {target!r}; calibrated: "
                f"{self.targets[:4]}{'...' if len(self.targets) > 4 else ''}"
            )
        return _read(self.cache_dir, target)

    def __contains__(self, target: object) -> bool:
        return target in self.targets

    def save(self, directory: str | os.PathLike) -> Path:
        """Write every statistic to ``directory`` (one safetensors file each)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for target in self.targets:
            _write(directory, target, self[target])
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Calibration:
        """The statistics written by :meth:`save` (read lazily)."""
        directory = Path(directory)
        # Sensitivity files may share the folder (collect_sensitivity)
        files = sorted(
            f
            for f in directory.glob("*.safetensors")
            if not f.name.endswith(SENSITIVITY_SUFFIX)
        )
        if not files:
            raise ConfigError(
                f"{directory} holds no calibration statistics (*.safetensors); "
                "write them with Calibration.save or collect_statistics(cache_dir=)."
            )
        return cls(targets=[f.stem for f in files], cache_dir=directory)


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    targets: Sequence[str] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
) -> Calibration:
    """Add up ``X^T X`` of the input of each projection over the batches.

    Args:
        model: The original (unconverted) model; it runs in its current mode,
            under ``torch.no_grad()``.
        batches: Model inputs, each a tensor, a tuple of positional arguments or
            a dict of keyword arguments. Iterated once per pass: a list (or a
            DataLoader) when ``max_bytes`` forces several passes.
        targets: Qualified names of the projection modules (``nn.Linear``,
            transformers ``Conv1D``, 1x1 ``nn.Conv2d``, or an
            ``nn.MultiheadAttention`` for its packed input projection). Default:
            every projection :func:`masasurgery.analyze` finds on the first batch.
        cache_dir: Write each projection's statistics there and read them back
            on demand; required with ``max_bytes``.
        max_bytes: Most bytes of statistics held at once.

    Returns:
        The statistics, by target.

    Raises:
        ConfigError: A target is not a projection, ``max_bytes`` is too small for
            one target or given without ``cache_dir``, or there are no batches.
        ModelRunError: The model fails on a batch.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32,
        ...                       patch_size=8).eval()
        >>> calibration = collect_statistics(m, [torch.randn(2, 3, 32, 32)])
        >>> stats = calibration["blocks.0.attn.qkv"]
        >>> stats.xtx.shape, stats.xtx.dtype, stats.tokens
        (torch.Size([192, 192]), torch.float64, 34)
    """
    # Targets and their modules, then the passes that fit the memory bound
    batches = replayable(batches)
    targets = _default_targets(model, batches) if targets is None else list(targets)
    modules = {t: _projection_module(model, t) for t in targets}
    sizes = {t: _in_features(m) ** 2 * 8 for t, m in modules.items()}
    passes = plan_passes(sizes, max_bytes, cache_dir, batches)
    directory = None if cache_dir is None else Path(cache_dir)

    # One run over the data per pass
    calibration = Calibration(targets=list(targets), cache_dir=directory)
    unreached = []
    for chunk in passes:
        stats = _run_pass(model, batches, {t: modules[t] for t in chunk})
        unreached += [t for t, stat in stats.items() if stat.tokens == 0]
        for target, stat in stats.items():
            if directory is None:
                calibration._memory[target] = stat
            else:
                _write(directory, target, stat)
        logger.debug("calibrated %d projections in one pass", len(chunk))
    if unreached:
        _warn_unreached(unreached)
    return calibration


def _warn_unreached(targets: list[str]) -> None:
    # nn.MultiheadAttention computes out_proj with its weight, not its forward
    warnings.warn(
        f"no calibration input reached {len(targets)} projection(s), e.g. "
        f"{targets[0]!r}: the model never calls them as modules (an "
        "nn.MultiheadAttention uses out_proj's weight directly), so their "
        "statistics are zero and a calibrated fit of them falls back to their "
        "weights alone. Leave their role out (roles=) to keep them dense.",
        MasaWarning,
        stacklevel=3,
    )


class _OnePass:
    """A one-shot iterator whose first item can be read ahead."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._ahead: list[Any] = []
        self._iterator = iterator

    def peek(self) -> Any | None:
        if not self._ahead:
            self._ahead = [next(self._iterator, None)]
        return self._ahead[0]

    def __iter__(self) -> Iterator[Any]:
        ahead, self._ahead = self._ahead, []
        for item in ahead:
            if item is not None:
                yield item
        yield from self._iterator


def replayable(batches: Iterable[Any]) -> Iterable[Any]:
    """``batches``, with a one-shot iterator wrapped so its first item can be read."""
    if iter(batches) is batches:
        return _OnePass(iter(batches))
    return batches


def _default_targets(model: nn.Module, batches: Iterable[Any]) -> list[str]:
    from masasurgery.analyze import analyze

    if isinstance(batches, _OnePass):
        first = batches.peek()
    else:
        first = next(iter(batches), None)
    if first is None:
        raise ConfigError("collect_statistics needs at least one batch, got none.")
    analysis = analyze(model, first)
    return [
        p.target
        for group in analysis.groups
        for site in group.sites
        for p in site.projections
    ]


def _projection_module(model: nn.Module, target: str) -> nn.Module:
    try:
        module = model.get_submodule(target)
    except AttributeError as e:
        raise ConfigError(
            f"{type(model).__name__} has no module {target!r} to calibrate."
        ) from e
    if _in_features(module) is None:
        raise ConfigError(
            f"{target!r} is a {type(module).__name__}; calibration reads the input "
            "of nn.Linear, Conv1D, 1x1 nn.Conv2d or nn.MultiheadAttention modules."
        )
    return module


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return module.in_channels
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection
        return module.weight.shape[0]
    return None


def plan_passes(
    sizes: dict[str, int],
    max_bytes: int | None,
    cache_dir: str | os.PathLike | None,
    batches: Iterable[Any],
    what: str = "statistics",
) -> list[list[str]]:
    """Targets in passes over the data, each holding at most ``max_bytes``.

    Args:
        sizes: Bytes each target's statistic takes, in collection order.
        max_bytes: The bound; None: one pass.
        cache_dir: Where finished statistics go; required with ``max_bytes``.
        batches: The data, as :func:`replayable` returned it (a one-shot
            iterator cannot be run twice).
        what: What to call the statistics in messages.

    Raises:
        ConfigError: ``max_bytes`` without ``cache_dir``, smaller than one
            target's statistic, or needing several passes over one-shot data.
    """
    if max_bytes is None:
        return [list(sizes)]
    if cache_dir is None:
        raise ConfigError(
            f"max_bytes bounds the {what} held in memory, so finished ones must "
            "go to disk: pass cache_dir= as well."
        )

    # Greedy: fill each pass up to the bound, in module order
    passes: list[list[str]] = [[]]
    used = 0
    for target, size in sizes.items():
        if size > max_bytes:
            raise ConfigError(
                f"the {what} of {target!r} take {size} bytes, more than "
                f"max_bytes={max_bytes}; raise max_bytes to at least {size}."
            )
        if used + size > max_bytes:
            passes.append([])
            used = 0
        passes[-1].append(target)
        used += size
    if len(passes) > 1 and isinstance(batches, _OnePass):
        raise ConfigError(
            f"max_bytes={max_bytes} needs {len(passes)} passes over the data, but "
            "batches is a one-shot iterator; pass a list or a DataLoader."
        )
    return passes


def _run_pass(
    model: nn.Module, batches: Iterable[Any], modules: dict[str, nn.Module]
) -> dict[str, InputStatistics]:
    stats = {t: _empty(_in_features(m), m) for t, m in modules.items()}

    def make_hook(target: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rows = _input_rows(module, args, kwargs)  # (tokens, in)
            product = rows.T.float() @ rows.float()
            stats[target].xtx += product.double()
            stats[target].total += rows.sum(0, dtype=torch.float64)
            stats[target].tokens += rows.shape[0]

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(t), with_kwargs=True)
        for t, m in modules.items()
    ]
    try:
        count = _run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ConfigError("collect_statistics needs at least one batch, got none.")
    return stats


def _empty(size: int, module: nn.Module) -> InputStatistics:
    options = {"dtype": torch.float64, "device": next(module.parameters()).device}
    return InputStatistics(
        xtx=torch.zeros(size, size, **options),
        tokens=0,
        total=torch.zeros(size, **options),
    )


def _input_rows(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The projection's input as ``(tokens, in)`` rows."""
    x = args[0] if args else kwargs.get("query", kwargs.get("input"))
    if isinstance(module, nn.MultiheadAttention):
        key = args[1] if len(args) > 1 else kwargs.get("key")
        if key is not None and key is not x:
            raise NotImplementedError(
                "calibrating nn.MultiheadAttention with a key different from the "
                "query (cross-attention) is not supported; its q and k/v rows read "
                "different inputs."
            )
    if isinstance(module, nn.Conv2d):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _run_batches(model: nn.Module, batches: Iterable[Any]) -> int:
    count = 0
    with torch.no_grad():
        for batch in _as_inputs(batches):
            try:
                model(*batch.args, **batch.kwargs)
            except MODEL_FAILURES as e:
                raise ModelRunError(
                    f"{type(model).__name__} failed on calibration batch {count}: "
                    f"{e}. Each batch goes to the model as it is: a tensor, a "
                    "tuple of positional arguments or a dict of keyword arguments."
                ) from e
            count += 1
    return count


def _as_inputs(batches: Iterable[Any]) -> Iterator[Inputs]:
    for batch in batches:
        yield Inputs.of(batch)


def _file(directory: Path, target: str) -> Path:
    return directory / f"{target}.safetensors"


def _write(directory: Path, target: str, stat: InputStatistics) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "xtx": stat.xtx.contiguous().cpu(),
        "tokens": torch.tensor([stat.tokens], dtype=torch.int64),
    }
    if stat.total is not None:
        tensors["total"] = stat.total.contiguous().cpu()
    save_file(tensors, _file(directory, target))


def _read(directory: Path, target: str) -> InputStatistics:
    from safetensors.torch import load_file

    data = load_file(_file(directory, target))
    return InputStatistics(
        xtx=data["xtx"], tokens=int(data["tokens"].item()), total=data.get("total")
    )
