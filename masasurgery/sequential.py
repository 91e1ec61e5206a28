"""Sequential refit: correct each block for the error the blocks before it leave.

:func:`masasurgery.compress` fits every projection to the inputs the *original*
model gives it. Once the blocks before it are compressed, a projection sees other
inputs, ``X~`` instead of ``X`` (rows are tokens), and what it was fitted for is
no longer what it gets. By least squares, the weight that maps what it now gets
to what the original computed is

    W* = W (X^T X~) (X~^T X~)^{-1},

and ``||X W^T - X~ W^^T||^2 = ||X W^T - X~ W*^T||^2 + ||(W* - W^) R~||^2`` with
``X~^T X~ = R~ R~^T``. The first term does not depend on ``W^``: the best ``W^``
is the calibrated fit of ``W*`` in the metric of ``X~``
(:func:`masasurgery.fit_data.fit_layer`). Block by block, in the order the model
runs them, every shared part gets its coefficients and residual refitted so
(the atoms, which earlier blocks share, stay as they are): first the projections
that feed attention, then the output projection, whose input the refitted q, k
and v change.

Blocks run on cached inputs, as GPTQ and SVD-LLM do: the hidden states entering
the block in the original model and in the compressed one, for every
calibration batch. The model runs whole once to record how each block is called;
after that each block runs about four times per batch, and the model again only
where the chain of blocks breaks (something other than the previous block feeds
a block, e.g. a patch merging between two stages).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from masasurgery.distributed import block_of
from masasurgery.errors import MODEL_FAILURES, ConfigError, ModelRunError
from masasurgery.fit_data import fit_layer
from masasurgery.passes.capture import Inputs
from masasurgery.passes.layouts import read_rows
from masasurgery.tolerances import tolerance_for
from masasurgery.verify import _swapped
from masasurgery.whiten import whitening

__all__ = ["PartRefit", "SequentialReport", "refit_sequentially"]

logger = logging.getLogger(__name__)

#: Layouts whose replacement is called with the projection's input.
LAYOUTS = ("linear", "conv1d")


@dataclass
class PartRefit:
    """One shared part of one layer, before and after its refit.

    Attributes:
        target: The projection, by qualified name.
        role: The part's role.
        before: Relative output error of the fit from :func:`compress`, on the
            inputs the compressed model gives, against the original's outputs.
        after: The same after the refit (never above ``before``: a refit that
            would not lower it is not applied).
    """

    target: str
    role: str
    before: float
    after: float


@dataclass
class SequentialReport:
    """What :func:`refit_sequentially` did.

    Attributes:
        blocks: The blocks refitted, in the order the model runs them.
        parts: Each refitted part.
        skipped: Projections left as they were, with why.
        chains: Blocks where the inputs had to be read from a whole forward
            (the first block, and each break in the chain of blocks).
        seconds: Wall time of the whole refit.
    """

    blocks: list[str]
    parts: list[PartRefit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    chains: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        count = max(len(self.parts), 1)
        before = sum(p.before for p in self.parts) / count
        after = sum(p.after for p in self.parts) / count
        return (
            f"Sequential refit of {len(self.parts)} parts in {len(self.blocks)} "
            f"blocks ({len(self.chains)} chains, {self.seconds:.1f} s): mean output "
            f"error {before:.4f} -> {after:.4f}"
            + (f"; {len(self.skipped)} projections skipped" if self.skipped else "")
        )


@dataclass
class _Part:
    group: int
    role: str
    layer: int
    target: str
    layout: str
    rows: tuple[int, int]


@dataclass
class _Call:
    """How the model called a block on one batch, its input left out."""

    args: tuple
    kwargs: dict
    keyword: str | None  # the input's keyword, or None when positional


class _Stop(Exception):
    """Raised in a hook to end a forward once what it needs has run."""


def refit_sequentially(
    model: nn.Module, conversion: Any, batches: Sequence[Any]
) -> SequentialReport:
    """Refit every shared part of ``conversion`` for the inputs it now gets.

    Args:
        model: The converted model, whose record still keeps its originals.
        conversion: The :class:`~masasurgery.convert.Conversion` of ``model``.
        batches: The calibration batches (tensors, tuples or dicts), in memory.

    Returns:
        The blocks, parts and errors, before and after.

    Raises:
        ConfigError: No batches, or the record released its originals.
        ModelRunError: The model fails on a batch.
        NotImplementedError: A block runs more than once per forward, or takes
            no tensor input.
    """
    start = time.perf_counter()
    if not batches:
        raise ConfigError("the sequential refit needs calibration batches, got none.")
    if conversion.rewrite.originals_released:
        raise ConfigError(
            "the sequential refit needs the original projections; refit before "
            "releasing them (keep_originals=False releases them after)."
        )
    inputs = [Inputs.of(b) for b in batches]
    parts, skipped = _parts(conversion)
    by_block = _by_block(model, parts)

    # Record how the original model calls every block, and in which order
    originals = conversion.rewrite.originals
    with _swapped(model, originals):
        order, calls, first_inputs = _record(model, list(by_block), inputs)
    report = SequentialReport(blocks=order, skipped=skipped)

    # Block by block: original, refit in stages, compressed output
    chain: tuple[list[Tensor], list[Tensor]] | None = None
    for index, name in enumerate(order):
        block = model.get_submodule(name)
        if chain is None:
            chain = _chain_start(model, originals, block, inputs)
            report.chains.append(name)
        original_in, compressed_in = chain
        original_out, seen = _run_original(
            model, originals, block, original_in, calls[name], by_block[name]
        )
        for stage in _stages(by_block[name]):
            products = _cross_products(
                conversion, block, compressed_in, calls[name], stage, seen
            )
            report.parts += _refit_stage(conversion, stage, products)
        compressed_out = _run_all(block, compressed_in, calls[name])

        # The next block continues the chain if its recorded input is ours
        chain = (original_out, compressed_out)
        following = order[index + 1] if index + 1 < len(order) else None
        if following and not _continues(original_out[0], first_inputs[following]):
            chain = None
    report.seconds = time.perf_counter() - start
    logger.info("%s", report)
    return report


# ---------------------------------------------------------------------------
# Parts and blocks


def _parts(conversion: Any) -> tuple[list[_Part], dict[str, str]]:
    parts, skipped = [], {}
    for group in conversion.analysis.groups:
        for layer, site in enumerate(group.sites):
            for role in group.roles:
                if (group.index, role) not in conversion.fits:
                    continue
                projection = site.projection_of(role)
                if projection.layout not in LAYOUTS:
                    skipped[projection.target] = (
                        f"layout {projection.layout!r} is not refitted (only "
                        f"{', '.join(LAYOUTS)})"
                    )
                    continue
                parts.append(
                    _Part(
                        group.index,
                        role,
                        layer,
                        projection.target,
                        projection.layout,
                        projection.roles[role],
                    )
                )
    return parts, skipped


def _by_block(model: nn.Module, parts: list[_Part]) -> dict[str, list[_Part]]:
    modules = dict(model.named_modules())
    out: dict[str, list[_Part]] = {}
    for part in parts:
        block = block_of(modules, part.target)
        if block is None:
            raise NotImplementedError(
                f"the sequential refit runs blocks one at a time, but {part.target!r}"
                " is in no block (no ancestor held by an nn.ModuleList, "
                "nn.Sequential or nn.ModuleDict); use sequential=False."
            )
        out.setdefault(block, []).append(part)
    return out


def _stages(parts: list[_Part]) -> list[list[_Part]]:
    # Output projections read what q, k and v compute: refit them after
    targets_with_o = {p.target for p in parts if p.role == "o"}
    first = [p for p in parts if p.target not in targets_with_o]
    second = [p for p in parts if p.target in targets_with_o]
    return [s for s in (first, second) if s]


# ---------------------------------------------------------------------------
# Running blocks


def _record(
    model: nn.Module, blocks: list[str], inputs: list[Inputs]
) -> tuple[list[str], dict[str, list[_Call]], dict[str, Tensor]]:
    """One whole forward per batch: each block's calls, order and first input."""
    calls: dict[str, list[_Call]] = {name: [] for name in blocks}
    first_inputs: dict[str, Tensor] = {}
    order: list[str] = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, call = _split(name, args, kwargs)
            calls[name].append(call)
            if name not in first_inputs:
                first_inputs[name] = hidden
                order.append(name)

        return hook

    handles = [
        model.get_submodule(n).register_forward_pre_hook(make_hook(n), with_kwargs=True)
        for n in blocks
    ]
    try:
        for index, batch in enumerate(inputs):
            _forward(model, batch, index)
    finally:
        for handle in handles:
            handle.remove()
    twice = [n for n in blocks if len(calls[n]) != len(inputs)]
    if twice:
        raise NotImplementedError(
            f"block {twice[0]!r} ran {len(calls[twice[0]])} times in "
            f"{len(inputs)} forwards; the sequential refit needs each block to run "
            "once per forward. Use sequential=False."
        )
    return order, calls, first_inputs


def _split(name: str, args: tuple, kwargs: dict) -> tuple[Tensor, _Call]:
    if args and isinstance(args[0], Tensor):
        return args[0], _Call(args[1:], dict(kwargs), None)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], _Call(args, rest, "hidden_states")
    raise NotImplementedError(
        f"block {name!r} takes no tensor as its first argument (nor "
        "hidden_states=); the sequential refit cannot feed it. Use sequential=False."
    )


def _forward(model: nn.Module, batch: Inputs, index: int) -> None:
    with torch.no_grad():
        try:
            batch.call(model)
        except _Stop:
            pass
        except MODEL_FAILURES as e:
            raise ModelRunError(
                f"{type(model).__name__} failed on calibration batch {index} during "
                f"the sequential refit: {e}"
            ) from e


def _run(block: nn.Module, hidden: Tensor, call: _Call) -> Tensor | None:
    """The block's output on ``hidden`` (None when a hook stopped it)."""
    with torch.no_grad():
        try:
            if call.keyword is None:
                out = block(hidden, *call.args, **call.kwargs)
            else:
                out = block(*call.args, **{call.keyword: hidden}, **call.kwargs)
        except _Stop:
            return None
    if isinstance(out, Tensor):
        return out
    return out[0]  # tuples and transformers' ModelOutput: the hidden state first


def _run_all(block: nn.Module, hidden: list[Tensor], calls: list[_Call]) -> list:
    return [_run(block, h, c) for h, c in zip(hidden, calls, strict=True)]


def _chain_start(
    model: nn.Module, originals: dict, block: nn.Module, inputs: list[Inputs]
) -> tuple[list[Tensor], list[Tensor]]:
    """The block's inputs in both models, from forwards stopped at the block."""

    def read() -> list[Tensor]:
        seen: list[Tensor] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append(_split("block", args, kwargs)[0])
            raise _Stop

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for index, batch in enumerate(inputs):
                _forward(model, batch, index)
        finally:
            handle.remove()
        return seen

    with _swapped(model, originals):
        original = read()
    return original, read()


def _continues(output: Tensor, recorded: Tensor) -> bool:
    if output.shape != recorded.shape:
        return False
    tol = tolerance_for(recorded.dtype, recorded.device)
    return torch.allclose(output, recorded, atol=tol.atol, rtol=tol.rtol)


@contextmanager
def _inputs_of(modules: dict[str, nn.Module], stop: bool) -> Iterator[dict]:
    """Each module's input rows ``(tokens, in)`` of the current batch."""
    seen: dict[str, Tensor] = {}

    def make_hook(target: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen[target] = args[0].reshape(-1, args[0].shape[-1])
            if stop and len(seen) == len(modules):
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make_hook(t)) for t, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _run_original(
    model: nn.Module,
    originals: dict[str, nn.Module],
    block: nn.Module,
    hidden: list[Tensor],
    calls: list[_Call],
    parts: list[_Part],
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The original block's outputs and its projections' inputs, per batch."""
    targets = {p.target: originals[p.target] for p in parts}
    outputs, seen = [], []
    with _swapped(model, originals):
        for h, call in zip(hidden, calls, strict=True):
            with _inputs_of(targets, stop=False) as rows:
                outputs.append(_run(block, h, call))
            seen.append(dict(rows))
    return outputs, seen


@dataclass
class _Products:
    """``X~^T X~`` and ``X~^T X`` of one projection, float64."""

    gram: Tensor
    cross: Tensor


def _cross_products(
    conversion: Any,
    block: nn.Module,
    hidden: list[Tensor],
    calls: list[_Call],
    stage: list[_Part],
    original_rows: list[dict[str, Tensor]],
) -> dict[str, _Products]:
    modules = {p.target: conversion.rewrite.replacements[p.target] for p in stage}
    products: dict[str, _Products] = {}
    for h, call, rows_o in zip(hidden, calls, original_rows, strict=True):
        with _inputs_of(modules, stop=True) as rows_c:
            _run(block, h, call)
        for target, xc in rows_c.items():
            xc, xo = xc.double(), rows_o[target].double()
            if target not in products:
                size = xc.shape[1]
                zeros = xc.new_zeros(size, size)
                products[target] = _Products(zeros, zeros.clone())
            products[target].gram += xc.T @ xc
            products[target].cross += xc.T @ xo
    return products


# ---------------------------------------------------------------------------
# The refit


def _refit_stage(
    conversion: Any, stage: list[_Part], products: dict[str, _Products]
) -> list[PartRefit]:
    done = []
    with torch.no_grad():
        for part in stage:
            done.append(_refit_part(conversion, part, products[part.target]))
    return done


def _refit_part(conversion: Any, part: _Part, products: _Products) -> PartRefit:
    fit = conversion.fits[part.group, part.role]
    original = conversion.rewrite.originals[part.target]
    weight = read_rows(original, part.layout, *part.rows).double()

    # W* = W (X^T X~)(X~^T X~)^{-1}, through the factor of X~^T X~ (with jitter)
    layer = whitening(products.gram, name=f"{part.target} ({part.role})")
    scale = products.gram.diagonal().mean().clamp_min(1e-300)
    solved = torch.cholesky_solve(products.cross @ weight.T, layer.factor)
    target = (solved / scale).T

    # Refit coefficients and residual; keep the old fit unless this one is better
    rank = fit.layer_rank(part.layer)
    current = fit.reconstruct(part.layer).double()
    norm = layer.apply(target).norm().clamp_min(1e-300)
    before = (layer.apply(target - current).norm() / norm).item()
    new = fit_layer(target, layer, fit.atoms.double(), rank)
    after = new.error.item()
    if after < before:
        _write(conversion, part, new.coefficients, new.up, new.down)
    return PartRefit(part.target, part.role, before, min(before, after))


def _write(
    conversion: Any, part: _Part, coefficients: Tensor, up: Tensor, down: Tensor
) -> None:
    """Into the record's fit (what verify checks against) and the model."""
    fit = conversion.fits[part.group, part.role]
    proj = conversion.rewrite.replacements[part.target]
    fit.coefficients[part.layer] = coefficients.to(fit.coefficients.dtype)
    proj.coefficients[part.role].copy_(coefficients.to(fit.coefficients.dtype))
    rank = fit.layer_rank(part.layer)
    if rank:
        fit.residual_up[part.layer, :, :rank] = up.to(fit.residual_up.dtype)
        fit.residual_down[part.layer, :rank] = down.to(fit.residual_down.dtype)
        proj.residual_up[part.role].copy_(up.to(fit.residual_up.dtype))
        proj.residual_down[part.role].copy_(down.to(fit.residual_down.dtype))
