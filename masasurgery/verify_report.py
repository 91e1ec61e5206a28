"""The verifier's records: what it compared, and how it printed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from masasurgery.errors import VerificationError
from masasurgery.report import format_table
from masasurgery.tolerances import Tolerance

__all__ = [
    "Comparison",
    "LayerCheck",
    "LayerError",
    "ReferenceCheck",
    "VerificationReport",
]


@dataclass
class Comparison:
    """Outputs of two runs, compared over all their floating-point tensors.

    Attributes:
        max_abs: Largest absolute difference.
        rel_l2: ``||actual - expected|| / ||expected||``.
        cosine: Cosine similarity of the flattened outputs.
        excess: How far the worst element is beyond the tolerance; <= 0 passes.
        top1_agreement: Classifiers and LMs: the share of predictions (rows, or
            next tokens at every position) whose argmax agree; None otherwise.
        kl: LMs: mean ``KL(expected || actual)`` of the next-token distributions,
            in nats, computed in float64; None otherwise.
    """

    max_abs: float
    rel_l2: float
    cosine: float
    excess: float
    top1_agreement: float | None = None
    kl: float | None = None

    @property
    def passed(self) -> bool:
        return self.excess <= 0.0

    def summary(self) -> str:
        """One line of figures."""
        line = (
            f"max abs {self.max_abs:.4g}, relative L2 {self.rel_l2:.4g}, "
            f"cosine {self.cosine:.6f}"
        )
        if self.top1_agreement is not None:
            line += f", top-1 agreement {self.top1_agreement:.2%}"
        if self.kl is not None:
            line += f", KL {self.kl:.4g}"
        return line


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
class ReferenceCheck:
    """Both models against the original run in float64 on the CPU.

    ``original`` is the noise floor of the kernels and the dtype: what the
    original model itself loses against exact-ish arithmetic. ``converted`` adds
    the approximation error on top of it.

    Attributes:
        original: The original model's run vs its float64 run.
        converted: The converted model's run vs the original's float64 run.
    """

    original: Comparison
    converted: Comparison


@dataclass
class VerificationReport:
    """The verifier's findings; print it for a table, ``to_dict`` for JSON.

    Attributes:
        device: Where the runs took place.
        dtype: The model's parameter dtype.
        tolerance: The tolerance applied (from the one table).
        settings: Kernel settings pinned during the runs: TF32, the SDPA backend,
            the MHA fast path, each module's ``fused_attn``, the seed, the mode.
        rewrite: Converted vs original-with-reconstructed-weights (part 1).
        approximation: Converted vs original (part 2).
        layer_checks: Per projection and role checks of part 1.
        layer_errors: Per block and role weight errors of part 2.
        lossless: Every dictionary has as many atoms as blocks, so part 2 must pass.
        task: ``"classification"``, ``"lm"`` or ``"none"``: which task figures
            the comparisons carry.
        reference: Both models against a float64 CPU run, when asked for.
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
    task: str = "none"
    reference: ReferenceCheck | None = None

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
            "task": self.task,
            "rewrite_exact": self.rewrite_exact,
            "passed": self.passed,
            "lossless": self.lossless,
            "rewrite": asdict(self.rewrite),
            "approximation": asdict(self.approximation),
            "reference": None if self.reference is None else asdict(self.reference),
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
            f"rtol={t.rtol:g})",
            f"  kernels: {_settings_line(self.settings)}",
            f"  part 1, rewrite exact: {verdict}  (max abs {r.max_abs:.3g} against "
            f"the original with fitted weights; {len(self.layer_checks)} layer checks)",
            f"  part 2, approximation{_task_label(self.task)}: {a.summary()}  "
            f"[{lossless}]",
        ]
        if self.reference is not None:
            lines += [
                "  float64 CPU reference of the original model:",
                f"    original  (kernel noise): {self.reference.original.summary()}",
                f"    converted (approximation): {self.reference.converted.summary()}",
            ]
        lines += ["", _layer_table(self.layer_errors)]
        lines += [f"  FAILED: {line}" for line in self.failures]
        return "\n".join(lines)


def _task_label(task: str) -> str:
    return "" if task == "none" else f" ({task} outputs)"


def _settings_line(settings: dict[str, Any]) -> str:
    fused = settings.get("fused_attn", {})
    parts = [
        f"SDPA {settings.get('sdpa_backend', '?')}",
        "MHA fast path " + ("on" if settings.get("mha_fastpath") else "off"),
        "TF32 " + ("on" if settings.get("cuda_matmul_tf32") else "off"),
    ]
    if fused:  # timm attention modules only
        parts.append(f"fused_attn on in {sum(fused.values())} of {len(fused)} modules")
    parts += [
        f"seed {settings.get('seed')}",
        "train mode" if settings.get("training") else "eval mode",
    ]
    return ", ".join(parts)


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
