"""Grouping from data: which consecutive blocks share a dictionary.

The analysis groups blocks by structure: every block of the same shape can
share. With calibration data masasurgery can cut such a group into runs of
consecutive blocks that share better. Two criteria:

* ``"error"`` (:func:`segment_by_error`): the cut that keeps the most output
  energy for a given total of atoms. For a run ``[a, b)`` with ``k`` atoms the
  energy kept is the sum of the top ``k`` eigenvalues of the block
  ``G[a:b, a:b]`` of the whitened Gram matrix
  (:func:`masasurgery.fit_data.whitened_gram`); a dynamic program over (end of
  run, atoms used) finds the best cut and the atoms of each run exactly.
  Cost: ``O(L^2)`` small eigendecompositions, ``O(L^2 K^2)`` for the program.
  For the same total of atoms a whole stack never keeps less than any cut of
  it (the atoms of the runs are one dictionary the whole stack could pick), so
  in this measure the best cut is no cut, up to ties; the program says so
  with a number, and scores the cuts other criteria propose.
* ``"divergence"`` (:func:`segment_by_divergence`): the paper's criterion. Cut
  where consecutive blocks disagree most, measured by the KL divergence between
  their logit-lens distributions (the final norm and LM head applied to each
  block's output) for language models, and by one minus the cosine of their
  outputs for other models (:func:`block_divergences`).

Each run keeps at least two blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masasurgery.errors import ConfigError
from masasurgery.passes.capture import Inputs
from masasurgery.passes.group import Group

__all__ = [
    "Segmentation",
    "block_divergences",
    "regroup",
    "segment_by_divergence",
    "segment_by_error",
]

_MIN_RUN = 2


@dataclass
class Segmentation:
    """Where one stack of blocks is cut.

    Attributes:
        bounds: ``(start, stop)`` of each run, in order, covering the stack.
        atoms: Atoms of each run, when the criterion chose them, else empty.
        score: What the criterion minimised (lower is better).
    """

    bounds: list[tuple[int, int]]
    atoms: list[int]
    score: float


def segment_by_error(grams: Sequence[Tensor], atoms: int) -> Segmentation:
    """Cut ``L`` blocks into runs that keep the most energy with ``atoms`` atoms.

    Args:
        grams: One ``(L, L)`` whitened Gram matrix per role (unit diagonal); the
            runs are common to all roles and their errors add up.
        atoms: Total atoms over all runs (per role).

    Returns:
        The runs, each run's atoms, and the energy lost (summed over roles).

    Example:
        >>> rows = torch.eye(2).double().repeat_interleave(3, dim=0)  # a,a,a,b,b,b
        >>> whole = segment_by_error([rows @ rows.T], atoms=2)
        >>> whole.bounds, round(whole.score, 2)
        ([(0, 6)], 0.0)
        >>> lost = segment_by_error([rows @ rows.T], atoms=1).score
        >>> round(lost, 6)  # one atom holds one of the two directions
        3.0
    """
    num_blocks = grams[0].shape[0]
    if not 1 <= atoms <= num_blocks:
        raise ConfigError(f"atoms must be in 1..{num_blocks}, got {atoms}.")

    # Energy lost by each run [a, b) with k atoms, summed over roles
    lost = _run_losses(grams, atoms)

    # best[j][n] = least loss of blocks [0, j) using n atoms
    inf = float("inf")
    best = [[inf] * (atoms + 1) for _ in range(num_blocks + 1)]
    back: dict[tuple[int, int], tuple[int, int, int]] = {}
    best[0][0] = 0.0
    for stop in range(_MIN_RUN, num_blocks + 1):
        for start in range(0, stop - _MIN_RUN + 1):
            for used in range(atoms + 1):
                if best[start][used] == inf:
                    continue
                for k in range(1, min(stop - start, atoms - used) + 1):
                    total = best[start][used] + lost[start, stop, k].item()
                    if total < best[stop][used + k] - 1e-12:
                        best[stop][used + k] = total
                        back[stop, used + k] = (start, used, k)
    if best[num_blocks][atoms] == inf:
        raise ConfigError(
            f"cannot cut {num_blocks} blocks into runs of {_MIN_RUN} or more with "
            f"{atoms} atoms."
        )
    return _trace(back, num_blocks, atoms, best[num_blocks][atoms])


def segment_by_divergence(distances: Sequence[float], runs: int) -> Segmentation:
    """Cut where consecutive blocks differ most, into ``runs`` runs.

    Args:
        distances: ``L - 1`` divergences, between block ``i`` and ``i + 1``.
        runs: How many runs.

    Returns:
        The runs (``atoms`` empty); the score is the divergence left inside runs.

    Example:
        >>> segment_by_divergence([0.1, 0.1, 5.0, 0.1, 0.1], runs=2).bounds
        [(0, 3), (3, 6)]
    """
    num_blocks = len(distances) + 1
    if not 1 <= runs <= num_blocks // _MIN_RUN:
        raise ConfigError(
            f"runs must be in 1..{num_blocks // _MIN_RUN} for {num_blocks} blocks, "
            f"got {runs}."
        )

    # Largest cuts first, skipping those that would leave a run too short
    cuts: list[int] = []
    for i in sorted(range(len(distances)), key=lambda i: -distances[i]):
        if len(cuts) == runs - 1:
            break
        bounds = sorted([*cuts, i + 1])
        edges = [0, *bounds, num_blocks]
        if all(b - a >= _MIN_RUN for a, b in zip(edges, edges[1:], strict=False)):
            cuts = bounds
    edges = [0, *cuts, num_blocks]
    inside = sum(d for i, d in enumerate(distances) if i + 1 not in cuts)
    return Segmentation(
        bounds=list(zip(edges, edges[1:], strict=False)), atoms=[], score=inside
    )


def block_divergences(
    model: nn.Module, blocks: Sequence[str], batches: Iterable[Any]
) -> list[float]:
    """How much each block's output differs from the next block's.

    For a language model (it has an LM head and a final norm) the logit lens:
    ``KL(p_{i+1} || p_i)`` of the next-token distributions read off each block's
    output, averaged over tokens. Otherwise ``1 - cosine`` of consecutive
    blocks' outputs, averaged over tokens.

    Args:
        model: The original model.
        blocks: Qualified names of consecutive blocks (their outputs are read).
        batches: Model inputs.

    Returns:
        ``len(blocks) - 1`` divergences.
    """
    lens = _logit_lens(model)
    totals = torch.zeros(len(blocks) - 1, dtype=torch.float64)
    count = 0
    for batch in batches:
        outputs = _block_outputs(model, blocks, Inputs.of(batch))
        for i in range(len(blocks) - 1):
            totals[i] += _divergence(outputs[i], outputs[i + 1], lens)
        count += 1
    if count == 0:
        raise ConfigError("block_divergences needs at least one batch, got none.")
    return (totals / count).tolist()


def regroup(
    groups: Sequence[Group], segmentations: Mapping[int, Segmentation]
) -> list[Group]:
    """The groups cut into runs, numbered anew in order.

    Args:
        groups: The structural groups.
        segmentations: The cut of some groups, by group index; others stay whole.

    Returns:
        One group per run.
    """
    out: list[Group] = []
    for group in groups:
        cut = segmentations.get(group.index)
        bounds = cut.bounds if cut is not None else [(0, group.num_blocks)]
        for start, stop in bounds:
            out.append(Group(index=len(out), sites=group.sites[start:stop]))
    return out


def _run_losses(grams: Sequence[Tensor], atoms: int) -> Tensor:
    num_blocks = grams[0].shape[0]
    lost = torch.full((num_blocks + 1, num_blocks + 1, atoms + 1), float("inf"))
    for start in range(num_blocks):
        for stop in range(start + _MIN_RUN, num_blocks + 1):
            total = torch.zeros(atoms + 1, dtype=torch.float64)
            for gram in grams:
                block = gram[start:stop, start:stop]
                values = torch.linalg.eigvalsh(block).flip(0).clamp_min(0.0)
                kept = torch.cat([values.new_zeros(1), values.cumsum(0)])
                kept = torch.cat([kept, kept[-1:].expand(atoms + 1)])[: atoms + 1]
                total += block.trace() - kept
            lost[start, stop] = total.float()
    return lost


def _trace(
    back: dict[tuple[int, int], tuple[int, int, int]],
    stop: int,
    used: int,
    score: float,
) -> Segmentation:
    bounds, atoms = [], []
    while stop > 0:
        start, before, k = back[stop, used]
        bounds.append((start, stop))
        atoms.append(k)
        stop, used = start, before
    return Segmentation(bounds=bounds[::-1], atoms=atoms[::-1], score=score)


@dataclass
class _Lens:
    norm: nn.Module
    head: nn.Module


def _logit_lens(model: nn.Module) -> _Lens | None:
    # A transformers causal LM: its LM head, and the final norm of its base model
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    norm = None
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        norm = norm or getattr(base, name, None)
    if isinstance(head, nn.Module) and isinstance(norm, nn.Module):
        return _Lens(norm=norm, head=head)
    return None


def _block_outputs(
    model: nn.Module, blocks: Sequence[str], batch: Inputs
) -> list[Tensor]:
    outputs: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    handles = [
        model.get_submodule(b).register_forward_hook(make_hook(b)) for b in blocks
    ]
    try:
        with torch.no_grad():
            model(*batch.args, **batch.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[b] for b in blocks]


def _divergence(a: Tensor, b: Tensor, lens: _Lens | None) -> float:
    if lens is None:
        flat_a, flat_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return (1.0 - F.cosine_similarity(flat_a, flat_b, dim=-1)).mean().item()
    with torch.no_grad():
        log_p = F.log_softmax(lens.head(lens.norm(a)).float(), dim=-1)
        log_q = F.log_softmax(lens.head(lens.norm(b)).float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.mean().item()
