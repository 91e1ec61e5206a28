"""Analyze: capture, find and group, without changing anything."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from masasurgery._checks import check_module
from masasurgery._state import preserved
from masasurgery.errors import AlreadyConvertedError, CaptureError
from masasurgery.inputs import resolve_inputs
from masasurgery.modules import SharedProjection
from masasurgery.passes.capture import CAPTURE_PATHS, Capture, Inputs, capture
from masasurgery.passes.find_attention import (
    AttentionSite,
    Findings,
    SkippedSite,
    find_attention,
)
from masasurgery.passes.group import Group, group_sites
from masasurgery.passes.structure import find_by_structure
from masasurgery.report import format_table

__all__ = ["Analysis", "analyze"]

logger = logging.getLogger(__name__)


@dataclass
class Analysis:
    """Where a model's attention is and which blocks can share dictionaries.

    Attributes:
        model: Class name of the model.
        capture_path: The capture path that read the model (``"fx"``).
        capture_failures: Paths tried before it, each with why it failed.
        sites: Every attention block found, in graph order.
        groups: Blocks that repeat (two or more), each sharing one dictionary per role.
        singletons: Blocks that repeat nowhere; they are left alone.
        skipped: Attention cores whose projections could not be read, with reasons.
    """

    model: str
    capture_path: str
    capture_failures: dict[str, str] = field(default_factory=dict)
    sites: list[AttentionSite] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    singletons: list[AttentionSite] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"{self.model}: {_plural(len(self.sites), 'attention block')} in "
            f"{_plural(len(self.groups), 'group')} (captured with {self.capture_path})",
        ]
        rows = [_group_row(g) for g in self.groups]
        if rows:
            headers = ["group", "blocks", "first .. last", "heads", "q", "k", "v", "o"]
            lines += ["", format_table(headers, rows)]
        for site in self.singletons:
            lines.append(f"left alone (repeats nowhere): {site.block}")
        for skip in self.skipped:
            lines.append(f"skipped core {skip.core}: {skip.reason}")
        for path, why in self.capture_failures.items():
            lines.append(f"capture path {path} failed: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "model": self.model,
            "capture_path": self.capture_path,
            "capture_failures": dict(self.capture_failures),
            "groups": [
                {
                    "index": g.index,
                    "blocks": g.blocks,
                    "roles": {r: list(g.role_shape(r)) for r in g.roles},
                }
                for g in self.groups
            ],
            "singletons": [s.block for s in self.singletons],
            "skipped": [{"core": s.core, "reason": s.reason} for s in self.skipped],
        }


def analyze(model: nn.Module, example_inputs: Any | None = None) -> Analysis:
    """Find the attention blocks of ``model`` and group the repeated ones.

    Nothing in the model changes: modes and devices are restored, and the model
    runs once, in eval mode and without gradients, to record shapes.

    Args:
        model: Any PyTorch model.
        example_inputs: A tensor, a tuple of positional arguments or a dict of
            keyword arguments for ``model.forward``. Optional for timm models,
            whose config gives the input size.

    Returns:
        The capture path, the sites, the groups and what was left out.

    Raises:
        ConfigError: ``model`` is not a ``torch.nn.Module``, or it declares no
            input size and none was given.
        AlreadyConvertedError: The model is already converted: its attention
            reads shared dictionaries now, so there is nothing left to group.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4)
        >>> analysis = analyze(m)
        >>> [g.num_blocks for g in analysis.groups]
        [4]
    """
    check_module(model)
    _check_not_converted(model)
    inputs = resolve_inputs(model, example_inputs)
    try:
        captured, found = _capture_and_find(model, inputs)
    except CaptureError as error:
        return _analyze_structure(model, error)
    grouping = group_sites(captured, found.sites)
    return Analysis(
        model=type(model).__name__,
        capture_path=captured.path,
        capture_failures=captured.failures,
        sites=found.sites,
        groups=grouping.groups,
        singletons=grouping.singletons,
        skipped=found.skipped,
    )


def _check_not_converted(model: nn.Module) -> None:
    shared = [n for n, m in model.named_modules() if isinstance(m, SharedProjection)]
    if shared:
        raise AlreadyConvertedError(
            f"{type(model).__name__} is already converted: {len(shared)} of its "
            f"projections are shared (first: {shared[0]!r}), so there are no dense "
            "attention blocks left to find and group. Analyze the original model, "
            "or call masasurgery.materialize(model) first to analyze its dense "
            "weights."
        )


def _capture_and_find(model: nn.Module, inputs: Inputs) -> tuple[Capture, Findings]:
    """The first capture path that shows all the attention; else the one that
    shows the most.

    fx can capture a model and still miss attention, when it hides inside a leaf
    module (``capture.hidden``) or a wrapped function; export then traces through
    it. When no path finds a site, the path that skipped the most cores is kept,
    so the analysis says why they were skipped.
    """
    failures: dict[str, str] = {}
    tried: list[tuple[Capture, Findings]] = []
    for path in CAPTURE_PATHS:
        with preserved(model), mha_fastpath_off():
            model.eval()
            try:
                captured = capture(model, inputs, paths=[path])
            except CaptureError as e:
                failures[path] = str(e).splitlines()[1].split(": ", 1)[1]
                continue
        found = find_attention(captured)
        captured.failures = dict(failures)
        if found.sites and not captured.hidden:
            return captured, found
        tried.append((captured, found))
        if not found.sites:
            failures[path] = "captured the model, but no attention core in its graph"
            logger.debug("capture path %r found no attention core", path)
    if not tried:
        reasons = "\n".join(f"  {p}: {why}" for p, why in failures.items())
        error = CaptureError(
            f"could not capture {type(model).__name__}; every path failed:\n"
            f"{reasons}\nCheck that the example inputs match the model's forward, "
            "or see the recipe for custom architectures in docs/custom.md."
        )
        error.failures = dict(failures)
        raise error

    # The most sites, then the most skipped cores; the earlier path on a tie
    best = max(tried, key=lambda t: (len(t[1].sites), len(t[1].skipped)))
    best[0].failures = {p: why for p, why in failures.items() if p != best[0].path}
    return best


def _analyze_structure(model: nn.Module, error: CaptureError) -> Analysis:
    """The last path: attention read off the module tree by conventional names."""
    found = find_by_structure(model)
    if not found.sites:
        raise error
    logger.debug("no graph captured %s; read its attention by structure", model)
    grouping = group_sites(None, found.sites)
    return Analysis(
        model=type(model).__name__,
        capture_path="structure",
        capture_failures=dict(getattr(error, "failures", {})),
        sites=found.sites,
        groups=grouping.groups,
        singletons=grouping.singletons,
        skipped=[],
    )


@contextlib.contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """nn.MultiheadAttention's fused eval path hides its projections; avoid it."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _group_row(group: Group) -> list[object]:
    site = group.sites[0]
    heads = f"{site.num_heads}x{site.head_dim}" if site.num_heads else "-"
    shapes = []
    for role in ("q", "k", "v", "o"):
        projection = site.projection_of(role)
        if projection is None:
            shapes.append("-")
            continue
        rows, cols = group.role_shape(role)
        name = projection.target.rsplit(".", 1)[-1]
        shapes.append(f"{rows}x{cols} {name}")
    span = f"{group.blocks[0]} .. {group.blocks[-1]}"
    return [group.index, group.num_blocks, span, heads, *shapes]
