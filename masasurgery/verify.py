"""Verify a conversion: prove the rewrite exact, measure the approximation.

The two halves are kept apart:

1. **The rewrite is exact.** The converted model must equal the original model with
   each shared weight replaced by its fitted reconstruction. Checked per projection
   (weight rows per role, bias, and the output on the very input the projection saw
   in the converted run) and end to end.
2. **The approximation error** of the chosen atoms: per layer and role (relative
   Frobenius error of the weight) and end to end on the user's inputs (max abs,
   relative L2, cosine). With as many atoms as blocks it must pass too.

Only one copy of the model is ever on the device: the original projections and their
reconstructions are swapped into the model in turn, and swapped back.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from masasurgery._state import model_device, preserved, tf32_off
from masasurgery.errors import VerificationError
from masasurgery.passes.capture import Inputs
from masasurgery.passes.layouts import LAYOUTS
from masasurgery.passes.rewrite import _set_submodule
from masasurgery.report import format_table
from masasurgery.tolerances import Tolerance, tolerance_for

if TYPE_CHECKING:
    from masasurgery.convert import Conversion

__all__ = [
    "Comparison",
    "LayerCheck",
    "LayerError",
    "VerificationReport",
    "verify",
]


@dataclass
class Comparison:
    """Outputs of two runs, compared over all their floating-point tensors.

    Attributes:
        max_abs: Largest absolute difference.
        rel_l2: ``||actual - expected|| / ||expected||``.
        cosine: Cosine similarity of the flattened outputs.
        excess: How far the worst element is beyond the tolerance; <= 0 passes.
    """

    max_abs: float
    rel_l2: float
    cosine: float
    excess: float

    @property
    def passed(self) -> bool:
        return self.excess <= 0.0


@dataclass
class LayerCheck:
    """One part-1 check of one projection and role.

    Attributes:
        target: Qualified name of the projection.
        role: The role whose rows were compared (``"bias"`` for the bias).
        check: ``"weight"``, ``"bias"`` or ``"output"``.
        max_abs: Largest absolute difference to the reference.
        passed: Within tolerance.
    """

    target: str
    role: str
    check: str
    max_abs: float
    passed: bool


@dataclass
class LayerError:
    """The approximation error of one block's weight for one role."""

    group: int
    block: str
    role: str
    relative_error: float


@dataclass
class VerificationReport:
    """The verifier's findings; print it for a table, ``to_dict`` for JSON.

    Attributes:
        device: Where the runs took place.
        dtype: The model's parameter dtype.
        tolerance: The tolerance applied (from the one table).
        settings: Kernel settings pinned during the runs.
        rewrite: Converted vs original-with-reconstructed-weights (part 1).
        approximation: Converted vs original (part 2).
        layer_checks: Per projection and role checks of part 1.
        layer_errors: Per block and role weight errors of part 2.
        lossless: Every dictionary has as many atoms as blocks, so part 2 must pass.
    """

    device: str
    dtype: str
    tolerance: Tolerance
    settings: dict[str, Any]
    rewrite: Comparison
    approximation: Comparison
    layer_checks: list[LayerCheck] = field(repr=False)
    layer_errors: list[LayerError] = field(repr=False)
    lossless: bool = False

    @property
    def rewrite_exact(self) -> bool:
        """Part 1: every projection and the whole model match the reference."""
        return self.rewrite.passed and all(c.passed for c in self.layer_checks)

    @property
    def passed(self) -> bool:
        """Part 1 holds, and part 2 too when the conversion is lossless."""
        return self.rewrite_exact and (self.approximation.passed or not self.lossless)

    @property
    def failures(self) -> list[str]:
        """One line per failed check, naming the layer and role."""
        lines = [
            f"rewrite not exact at {c.target} role {c.role} ({c.check}): "
            f"max abs {c.max_abs:.3g}"
            for c in self.layer_checks
            if not c.passed
        ]
        if not self.rewrite.passed:
            lines.append(
                "rewrite not exact end to end: max abs "
                f"{self.rewrite.max_abs:.3g} vs the original with fitted weights"
            )
        if self.lossless and not self.approximation.passed:
            lines.append(
                "lossless conversion differs from the original: max abs "
                f"{self.approximation.max_abs:.3g}"
            )
        return lines

    def raise_if_failed(self) -> None:
        """Raise VerificationError listing the failures, if any."""
        if not self.passed:
            raise VerificationError("\n".join(self.failures))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "tolerance": asdict(self.tolerance),
            "settings": dict(self.settings),
            "rewrite_exact": self.rewrite_exact,
            "passed": self.passed,
            "lossless": self.lossless,
            "rewrite": asdict(self.rewrite),
            "approximation": asdict(self.approximation),
            "layer_checks": [asdict(c) for c in self.layer_checks],
            "layer_errors": [asdict(e) for e in self.layer_errors],
            "failures": self.failures,
        }

    def __str__(self) -> str:
        t, r, a = self.tolerance, self.rewrite, self.approximation
        verdict = "PASS" if self.rewrite_exact else "FAIL"
        lossless = ("PASS" if a.passed else "FAIL") if self.lossless else "not lossless"
        lines = [
            f"Verification on {self.device} ({self.dtype}, atol={t.atol:g}, "
            f"rtol={t.rtol:g}, TF32 off)",
            f"  part 1, rewrite exact: {verdict}  (max abs {r.max_abs:.3g} against "
            f"the original with fitted weights; {len(self.layer_checks)} layer checks)",
            f"  part 2, approximation: max abs {a.max_abs:.4g}, relative L2 "
            f"{a.rel_l2:.4g}, cosine {a.cosine:.6f}  [{lossless}]",
        ]
        lines += ["", _layer_table(self.layer_errors)]
        lines += [f"  FAILED: {line}" for line in self.failures]
        return "\n".join(lines)


def verify(
    model: nn.Module,
    conversion: Conversion,
    example_inputs: Any,
    *,
    device: torch.device | str | None = None,
    tolerance: Tolerance | None = None,
) -> VerificationReport:
    """Check a converted model against its reference and its original.

    The model, the kept original projections and the reference projections are
    moved to ``device`` one model at a time (originals and references are small:
    the attention projections alone), and back afterwards. Train/eval modes,
    devices and TF32 settings are restored, also when a run raises. In train
    mode every run starts from the same random seed, so dropout masks agree.

    Args:
        model: The converted model.
        conversion: The record :func:`masasurgery.convert` returned for it.
        example_inputs: A tensor, a tuple of positional arguments, or a dict of
            keyword arguments for ``model.forward``.
        device: Where to run; CUDA when available, else CPU. A model spread over
            several devices runs where it is.
        tolerance: Overrides the table entry for the model's dtype and device.

    Returns:
        Both halves of the verification, in figures.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3)
        >>> x = torch.randn(2, 3, 224, 224)
        >>> conversion = masasurgery.convert(m, atoms=1, example_inputs=x, verify=False)
        >>> report = masasurgery.verify(m, conversion, x, device="cpu")
        >>> report.rewrite_exact, report.lossless
        (True, False)
    """
    # Where and at which precision
    done = conversion.rewrite
    references = _references(conversion)
    movable = model_device(model) is not None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device) if movable else model_device(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tolerance = tolerance or tolerance_for(dtype, device or "cpu")

    modules = [model, *done.originals.values(), *references.values()]
    with preserved(*modules), tf32_off() as settings, torch.no_grad():
        # Move everything to the device, one model's worth
        if movable:
            for module in modules:
                module.to(device)
        inputs = Inputs.of(example_inputs).to(device) if movable else example_inputs
        inputs = Inputs.of(inputs)

        # Three runs: converted (checking each projection), reference, original
        checks: dict[tuple[str, str, str], LayerCheck] = {}
        _check_weights(done.replacements, references, conversion, tolerance, checks)
        with _output_checks(
            done.replacements, references, conversion, tolerance, checks
        ):
            converted = _run(model, inputs)
        with _swapped(model, references):
            reconstructed = _run(model, inputs)
        with _swapped(model, done.originals):
            original = _run(model, inputs)

    return VerificationReport(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tolerance,
        settings={**settings, "seed": 0, "training": model.training},
        rewrite=_compare(converted, reconstructed, tolerance),
        approximation=_compare(converted, original, tolerance),
        layer_checks=list(checks.values()),
        layer_errors=_layer_errors(conversion),
        lossless=conversion.lossless,
    )


# ---------------------------------------------------------------------------
# References: the original projections with fitted weights


def _roles_by_target(
    conversion: Conversion,
) -> dict[str, list[tuple[str, int, int, Tensor]]]:
    """For each replaced projection: (role, start, stop, fitted rows)."""
    out: dict[str, list[tuple[str, int, int, Tensor]]] = {}
    for group in conversion.analysis.groups:
        for layer, site in enumerate(group.sites):
            for projection in site.projections:
                for role, (start, stop) in projection.roles.items():
                    fit = conversion.fits.get((group.index, role))
                    if (
                        fit is None
                        or projection.target not in conversion.rewrite.originals
                    ):
                        continue
                    rows = fit.reconstruct(layer)
                    out.setdefault(projection.target, []).append(
                        (role, start, stop, rows)
                    )
    return out


def _references(conversion: Conversion) -> dict[str, nn.Module]:
    layouts = {
        p.target: p.layout
        for g in conversion.analysis.groups
        for s in g.sites
        for p in s.projections
    }
    references = {}
    for target, parts in _roles_by_target(conversion).items():
        reference = copy.deepcopy(conversion.rewrite.originals[target])
        weight = LAYOUTS[layouts[target]].weight(reference)
        with torch.no_grad():
            for _, start, stop, rows in parts:
                weight[start:stop].copy_(rows)
        references[target] = reference
    return references


# ---------------------------------------------------------------------------
# Part 1, per projection


def _check_weights(
    replacements: Mapping[str, nn.Module],
    references: Mapping[str, nn.Module],
    conversion: Conversion,
    tolerance: Tolerance,
    checks: dict[tuple[str, str, str], LayerCheck],
) -> None:
    for target, parts in _roles_by_target(conversion).items():
        actual, expected = replacements[target].weight, references[target].weight
        for role, start, stop, _ in parts:
            _record(
                checks,
                target,
                role,
                "weight",
                actual[start:stop],
                expected[start:stop],
                tolerance,
            )
        bias, ref_bias = replacements[target].bias, references[target].bias
        if (bias is None) != (ref_bias is None):
            checks[target, "bias", "bias"] = LayerCheck(
                target, "bias", "bias", float("inf"), False
            )
        elif bias is not None:
            _record(checks, target, "bias", "bias", bias, ref_bias, tolerance)


@contextlib.contextmanager
def _output_checks(
    replacements: Mapping[str, nn.Module],
    references: Mapping[str, nn.Module],
    conversion: Conversion,
    tolerance: Tolerance,
    checks: dict[tuple[str, str, str], LayerCheck],
) -> Iterator[None]:
    """Compare each projection's output with its reference on the same input."""
    parts = _roles_by_target(conversion)
    handles = []

    def make_hook(target: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            expected = references[target](*args)
            for role, start, stop, _ in parts[target]:
                _record(
                    checks,
                    target,
                    role,
                    "output",
                    output[..., start:stop],
                    expected[..., start:stop],
                    tolerance,
                )

        return hook

    for target in parts:
        handles.append(replacements[target].register_forward_hook(make_hook(target)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record(
    checks: dict[tuple[str, str, str], LayerCheck],
    target: str,
    role: str,
    check: str,
    actual: Tensor,
    expected: Tensor,
    tolerance: Tolerance,
) -> None:
    # Keep the worst figure when a projection runs several times
    max_abs = (actual.double() - expected.double()).abs().max().item()
    passed = tolerance.excess(actual, expected) <= 0.0
    old = checks.get((target, role, check))
    if old is not None:
        max_abs, passed = max(max_abs, old.max_abs), passed and old.passed
    checks[target, role, check] = LayerCheck(target, role, check, max_abs, passed)


# ---------------------------------------------------------------------------
# Runs and comparisons


@contextlib.contextmanager
def _swapped(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put ``modules`` into ``model`` by qualified name; put the old ones back."""
    previous = {target: model.get_submodule(target) for target in modules}
    try:
        for target, module in modules.items():
            _set_submodule(model, target, module)
        yield
    finally:
        for target, module in previous.items():
            _set_submodule(model, target, module)


def _run(model: nn.Module, inputs: Inputs) -> list[Tensor]:
    # Same seed for every run, so dropout in train mode draws the same masks
    devices = (
        list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        output = inputs.call(model)
    leaves = pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]


def _compare(
    actual: list[Tensor], expected: list[Tensor], tolerance: Tolerance
) -> Comparison:
    shapes = [tuple(t.shape) for t in actual], [tuple(t.shape) for t in expected]
    if shapes[0] != shapes[1]:
        raise VerificationError(
            f"the runs' outputs differ in structure: {shapes[0]} vs {shapes[1]}"
        )
    if not actual:
        raise VerificationError(
            "the model returned no floating-point tensor to compare."
        )
    a = torch.cat([t.detach().double().flatten().cpu() for t in actual])
    e = torch.cat([t.detach().double().flatten().cpu() for t in expected])
    diff = a - e
    denominator = (a.norm() * e.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    return Comparison(
        max_abs=diff.abs().max().item(),
        rel_l2=(
            diff.norm() / e.norm().clamp_min(torch.finfo(torch.float64).tiny)
        ).item(),
        cosine=(a @ e / denominator).item(),
        excess=max(
            tolerance.excess(x, y) for x, y in zip(actual, expected, strict=True)
        ),
    )


def _layer_errors(conversion: Conversion) -> list[LayerError]:
    errors = []
    for group in conversion.analysis.groups:
        for role in group.roles:
            fit = conversion.fits.get((group.index, role))
            if fit is None:
                continue
            for site, error in zip(group.sites, fit.layer_errors.tolist(), strict=True):
                errors.append(LayerError(group.index, site.block, role, error))
    return errors


def _layer_table(errors: list[LayerError]) -> str:
    roles = [r for r in ("q", "k", "v", "o") if any(e.role == r for e in errors)]
    blocks: dict[tuple[int, str], dict[str, float]] = {}
    for e in errors:
        blocks.setdefault((e.group, e.block), {})[e.role] = e.relative_error
    rows = [
        [g, block, *(f"{by_role[r]:.3f}" if r in by_role else "-" for r in roles)]
        for (g, block), by_role in blocks.items()
    ]
    return "relative weight error per layer\n" + format_table(
        ["group", "block", *roles], rows
    )
