"""One table of tolerances, per dtype and device type.

A comparison passes when every element satisfies
``|actual - expected| <= atol + rtol * |expected|`` (the rule of
``torch.testing.assert_close``). The verifier and the tests read this table; no
tolerance is written anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TOLERANCES", "Tolerance", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    """Absolute and relative tolerance of an elementwise comparison."""

    atol: float
    rtol: float

    def excess(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        """How far the worst element is beyond the tolerance (<= 0 passes)."""
        if actual.numel() == 0:
            return 0.0
        diff = (actual.double() - expected.double()).abs()
        bound = self.atol + self.rtol * expected.double().abs()
        return (diff - bound).max().item()


#: (dtype, device type) -> tolerance of a model's outputs after a rewrite that only
#: reorders arithmetic. fp32 leaves room for rounding through a dozen blocks;
#: bf16/fp16 for their 8/11-bit mantissas. CUDA runs with TF32 off.
#: The bf16 row sits near bf16's own noise on real 12-block models: the real
#: DINOv2 in bf16 differs from its float64 run by 0.063 max abs (CLS features),
#: so comparing two bf16 models whose weights round differently can exceed it
#: (docs/verification.md). ``verify(reference_float64=True)`` shows that floor.
TOLERANCES: dict[tuple[torch.dtype, str], Tolerance] = {
    (torch.float64, "cpu"): Tolerance(atol=1e-10, rtol=1e-10),
    (torch.float64, "cuda"): Tolerance(atol=1e-10, rtol=1e-10),
    (torch.float32, "cpu"): Tolerance(atol=1e-4, rtol=1e-4),
    (torch.float32, "cuda"): Tolerance(atol=1e-4, rtol=1e-4),
    (torch.bfloat16, "cpu"): Tolerance(atol=5e-2, rtol=5e-2),
    (torch.bfloat16, "cuda"): Tolerance(atol=5e-2, rtol=5e-2),
    (torch.float16, "cpu"): Tolerance(atol=1e-2, rtol=1e-2),
    (torch.float16, "cuda"): Tolerance(atol=1e-2, rtol=1e-2),
}


def tolerance_for(dtype: torch.dtype, device: torch.device | str) -> Tolerance:
    """The tolerance for outputs of ``dtype`` computed on ``device``.

    Example:
        >>> tolerance_for(torch.float32, "cpu")
        Tolerance(atol=0.0001, rtol=0.0001)
    """
    device_type = torch.device(device).type
    key = (dtype, "cuda" if device_type == "cuda" else "cpu")
    if key not in TOLERANCES:
        known = sorted({str(d) for d, _ in TOLERANCES})
        raise ValueError(f"no tolerance for dtype {dtype}; known dtypes: {known}.")
    return TOLERANCES[key]
