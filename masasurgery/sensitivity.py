"""Sensitivity: how much each projection's output matters to the model's readout.

The input statistics ``X^T X`` (:mod:`masasurgery.calibrate`) say which input
directions a projection sees; they do not say which of its *outputs* the rest of
the model cares about. A query projection whose error the softmax mostly
ignores and a value projection whose error goes straight to the features cost
the same under ``||(W - W^) X||``. The readout's gradient tells them apart.

For a readout ``y`` (features, or logits) and a probe vector ``u``, the gradient
``g_t`` of ``u . y`` at a projection's output token ``t`` gives the first-order
change of the readout a weight error ``E`` causes: ``sum_t g_t^T E x_t``.
Averaged over probes whose second moment is the readout's metric (Gaussian
``u`` for squared error; ``u = onehot(c) - p`` with ``c ~ p`` for the KL of
logits, the Fisher information), its square is estimated, as in K-FAC, by
``tr(G E C E^T)`` with ``G = sum g_t g_t^T`` and ``C = X^T X``. So one more
statistic per projection, ``G`` (``out x out``, float64), turns every fit into a
fit of the model's readout (:func:`masasurgery.whiten.sensitivity_whitening`),
and makes errors comparable across roles and layers: the budget goes where the
readout moves most.

:func:`collect_sensitivity` runs the model on the calibration batches with
autograd on (no parameter gradients are made), backpropagates ``probes`` probe
vectors per batch, and adds up ``G`` of every projection.

Memory: ``G`` takes ``8 * out^2`` bytes per projection: 57 MB for the 48
projections of DINOv2 ViT-S/14, about 9 GB for a Llama-8B-shaped stack. With
``max_bytes`` and ``cache_dir``, as in
:func:`masasurgery.calibrate.collect_statistics`, the projections are split into
passes over the data that each hold at most ``max_bytes`` of ``G``, and
finished ones wait on disk. Every pass draws the same probes.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from masasurgery.calibrate import (
    SENSITIVITY_SUFFIX,
    _projection_module,
    plan_passes,
    replayable,
)
from masasurgery.errors import MODEL_FAILURES, ConfigError, MasaWarning, ModelRunError
from masasurgery.passes.capture import Inputs

__all__ = ["LOSSES", "Sensitivity", "collect_sensitivity", "default_readout"]

logger = logging.getLogger(__name__)

#: The readout metrics a probe can stand for.
LOSSES = ("mse", "kl")

Readout = Callable[[Any, Any], Tensor]


@dataclass
class Sensitivity:
    """The output-gradient statistics ``G`` of every projection, by name.

    Held in memory, or read from ``cache_dir`` one projection at a time when the
    collection was bounded by ``max_bytes``.

    Attributes:
        gtg: ``G = sum_t g_t g_t^T`` of each projection's output, ``(out, out)``,
            float64, for the projections held in memory.
        probes: Probe vectors backpropagated (per batch, times batches).
        loss: ``"mse"`` or ``"kl"``: the readout metric the probes stand for.
        cache_dir: Where the others are kept on disk, or None.
        stored: The projections kept in ``cache_dir``.
    """

    gtg: dict[str, Tensor] = field(repr=False)
    probes: int
    loss: str
    cache_dir: Path | None = None
    stored: list[str] = field(default_factory=list, repr=False)

    @property
    def targets(self) -> list[str]:
        return [*self.gtg, *self.stored]

    def __contains__(self, target: object) -> bool:
        return target in self.gtg or target in self.stored

    def __getitem__(self, target: str) -> Tensor:
        if target in self.gtg:
            return self.gtg[target]
        if self.cache_dir is not None and target in self.stored:
            return _read(self.cache_dir, target)
        raise KeyError(
            f"no sensitivity for {target!r}; collected for {len(self.targets)} "
            f"projections, e.g. {self.targets[:3]}."
        )


def default_readout(output: Any, batch: Any) -> Tensor:
    """The model's own output: ``logits``, else ``last_hidden_state``, else the
    first tensor (a timm model's logits or features)."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ConfigError(
        f"cannot find the readout in a {type(output).__name__} output; pass "
        "readout=lambda output, batch: <the tensor to keep close>."
    )


def collect_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    targets: Sequence[str],
    *,
    readout: Readout | None = None,
    loss: str | None = None,
    probes: int = 4,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
) -> Sensitivity:
    """Add up ``G`` of each projection's output over the batches.

    Args:
        model: The original model; it runs in its current mode (use ``eval()``).
            Its parameters get no gradients and are not changed.
        batches: Model inputs, each a tensor, a tuple of positional arguments or
            a dict of keyword arguments.
        targets: Qualified names of the projections (``nn.Linear``, GPT-2's
            ``Conv1D`` or a 1x1 ``nn.Conv2d``).
        readout: What to keep close, from the model's output and the batch;
            default :func:`default_readout`. E.g. DINOv2's normalised CLS
            features: ``lambda out, b: F.normalize(out.pooler_output, dim=-1)``.
        loss: ``"mse"`` (squared error of the readout) or ``"kl"`` (KL of the
            softmax over the readout's last axis, for logits). Default ``"kl"``
            when the readout is ``logits``, else ``"mse"``.
        probes: Probe vectors backpropagated per batch.
        seed: Seed of the probes.
        cache_dir: Write each projection's ``G`` there (as
            ``<target>.gtg.safetensors``) and read it back on demand; required
            with ``max_bytes``.
        max_bytes: Most bytes of ``G`` held at once; each pass over the data
            (one forward and ``probes`` backward passes per batch) collects
            the projections that fit.

    Returns:
        The statistics, by target.

    Raises:
        ConfigError: A bad option, no batches, a target that is not a
            projection, or ``max_bytes`` too small for one target, without
            ``cache_dir``, or needing several passes over a one-shot iterator.
        ModelRunError: The model fails on a batch.
        NotImplementedError: ``nn.MultiheadAttention`` (its packed input
            projection runs inside the module, out of reach of a hook).

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32,
        ...                       patch_size=8).eval()
        >>> s = collect_sensitivity(m, [torch.randn(2, 3, 32, 32)],
        ...                         ["blocks.0.attn.qkv", "blocks.1.attn.proj"])
        >>> s["blocks.0.attn.qkv"].shape, s.loss, s.probes
        (torch.Size([576, 576]), 'mse', 4)
    """
    # Options and modules, then the passes that fit the memory bound
    if loss is not None and loss not in LOSSES:
        raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}.")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes must be a positive integer, got {probes!r}.")
    modules = {t: _module(model, t) for t in targets}
    readout = default_readout if readout is None else readout
    if model.training:
        warnings.warn(
            f"{type(model).__name__} is in train mode: dropout makes the "
            "sensitivity noisy and unlike inference; call model.eval() first.",
            MasaWarning,
            stacklevel=2,
        )
    batches = replayable(batches)
    sizes = {t: _out_features(m) ** 2 * 8 for t, m in modules.items()}
    passes = plan_passes(sizes, max_bytes, cache_dir, batches, what="G")
    directory = None if cache_dir is None else Path(cache_dir)

    # One run over the data per pass, each with the same probes
    result = Sensitivity(gtg={}, probes=0, loss="", cache_dir=directory)
    used: dict[str, Any] = {"loss": loss}
    for chunk in passes:
        used["batches"] = 0
        gtg = _run_pass(
            model, batches, {t: modules[t] for t in chunk}, readout, used, probes, seed
        )
        _keep(result, gtg, directory)
    result.probes, result.loss = probes * used["batches"], used["loss"]
    return result


def _run_pass(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module],
    readout: Readout,
    used: dict[str, Any],
    probes: int,
    seed: int,
) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gtg: dict[str, Tensor] = {}
    with _OutputTaps(modules) as taps:
        for batch in batches:
            _one_batch(model, batch, readout, used, probes, generator, taps, gtg)
    if not used["batches"]:
        raise ConfigError("collect_sensitivity needs at least one batch, got none.")
    missing = [t for t in modules if t not in gtg]
    if missing:
        raise ConfigError(
            f"{len(missing)} projections never ran on the calibration batches "
            f"(first: {missing[0]!r}); check the targets."
        )
    return gtg


def _keep(result: Sensitivity, gtg: dict[str, Tensor], directory: Path | None) -> None:
    for target, g in gtg.items():
        if directory is None:
            result.gtg[target] = g
        else:
            _write(directory, target, g)
            result.stored.append(target)
    logger.debug("sensitivity of %d projections in one pass", len(gtg))


def _one_batch(
    model: nn.Module,
    batch: Any,
    readout: Readout,
    used: dict[str, Any],
    probes: int,
    generator: torch.Generator,
    taps: _OutputTaps,
    gtg: dict[str, Tensor],
) -> None:
    inputs = Inputs.of(batch)
    taps.outputs.clear()
    with torch.enable_grad():
        try:
            output = model(*inputs.args, **inputs.kwargs)
        except MODEL_FAILURES as e:
            raise ModelRunError(
                f"{type(model).__name__} failed on calibration batch "
                f"{used['batches']}: {e}"
            ) from e
        y = readout(output, batch)
        if used["loss"] is None:
            used["loss"] = "kl" if getattr(output, "logits", None) is y else "mse"
        _check_readout(y, used["loss"])
        names = [name for name, _ in taps.outputs]
        tensors = [tensor for _, tensor in taps.outputs]
        for index in range(probes):
            probe = _probe(y.detach(), used["loss"], generator)
            grads = torch.autograd.grad(
                (y * probe).sum(),
                tensors,
                retain_graph=index < probes - 1,
                allow_unused=True,
            )
            _add(gtg, names, tensors, grads)
    used["batches"] += 1


def _check_readout(y: Any, loss: str) -> None:
    if not isinstance(y, Tensor) or not y.is_floating_point():
        got = type(y).__name__ if not isinstance(y, Tensor) else f"a {y.dtype} tensor"
        raise ConfigError(
            f"the readout must return a floating-point tensor computed from the "
            f"model's output, got {got}; e.g. readout=lambda output, batch: "
            "output.last_hidden_state."
        )
    if not y.requires_grad:
        raise ConfigError(
            "the readout's tensor does not depend on the model's output (no "
            "gradient reaches it: detached, or made anew); return a tensor "
            "computed from the output, without .detach() or torch.no_grad()."
        )
    if loss == "kl" and y.dim() < 1:
        raise ConfigError(
            "loss='kl' reads the readout as logits with classes on the last axis, "
            f"got a tensor of shape {tuple(y.shape)}; return the logits, or use "
            "loss='mse'."
        )


def _probe(y: Tensor, loss: str, generator: torch.Generator) -> Tensor:
    """A random ``u`` with ``E[u u^T]`` the readout metric's Hessian."""
    if loss == "mse":
        noise = torch.randn(y.shape, generator=generator, dtype=torch.float32)
        return noise.to(y.dtype).to(y.device)
    p = y.float().softmax(-1).cpu()
    flat = p.reshape(-1, p.shape[-1])
    picked = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    onehot = torch.zeros_like(flat).scatter_(1, picked[:, None], 1.0)
    return (onehot - flat).reshape(p.shape).to(y.dtype).to(y.device)


def _add(
    gtg: dict[str, Tensor],
    names: list[str],
    tensors: list[Tensor],
    grads: Sequence[Tensor | None],
) -> None:
    for name, tensor, grad in zip(names, tensors, grads, strict=True):
        if grad is None:
            grad = torch.zeros_like(tensor)
        rows = _rows(grad.detach()).float()
        product = (rows.T @ rows).double()
        gtg[name] = gtg[name] + product if name in gtg else product


def _rows(output: Tensor) -> Tensor:
    # (batch, channels, H, W) of a 1x1 conv: channels last
    if output.dim() == 4:
        return output.movedim(1, -1).reshape(-1, output.shape[1])
    return output.reshape(-1, output.shape[-1])


def _module(model: nn.Module, target: str) -> nn.Module:
    module = _projection_module(model, target)
    if isinstance(module, nn.MultiheadAttention):
        raise NotImplementedError(
            f"sensitivity of {target!r}: nn.MultiheadAttention runs its packed "
            "input projection inside the module, where no hook reaches its "
            "output; compress it with metric='output'."
        )
    return module


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.weight.shape[1]  # transformers' Conv1D: (in, out)


def _write(directory: Path, target: str, gtg: Tensor) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {"gtg": gtg.contiguous().cpu()}, directory / f"{target}{SENSITIVITY_SUFFIX}"
    )


def _read(directory: Path, target: str) -> Tensor:
    from safetensors.torch import load_file

    return load_file(directory / f"{target}{SENSITIVITY_SUFFIX}")["gtg"]


class _OutputTaps:
    """Forward hooks that keep every target's output, made to need a gradient."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.outputs: list[tuple[str, Tensor]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _OutputTaps:
        for target, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(target)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()

    def _hook(self, target: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            # Frozen weights and integer inputs make no graph: start one here
            if not output.requires_grad:
                output = output.detach().requires_grad_()
            self.outputs.append((target, output))
            return output

        return hook
