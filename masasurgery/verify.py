"""Verify a conversion: prove the rewrite exact, measure the approximation.

The two halves are kept apart:

1. **The rewrite is exact.** The converted model must equal the original model with
   each shared weight replaced by its fitted reconstruction. Checked per projection
   (weight rows per role, bias, and the output on the very input the projection saw
   in the converted run; :mod:`masasurgery.verify_layers`) and end to end.
2. **The approximation error** of the chosen atoms: per layer and role (relative
   Frobenius error of the weight) and end to end on the user's inputs (max abs,
   relative L2, cosine; for classifiers top-1 agreement, for LMs top-1 agreement
   and KL of the next-token distributions). With as many atoms as blocks it must
   pass too. An optional float64 CPU run of the original model shows the noise
   floor of the kernels next to the approximation error.

Every run uses the same kernels and precision: TF32 off, one SDPA backend,
``nn.MultiheadAttention``'s fused fast path off, the model's own ``fused_attn``
flags (recorded), and the same random seed. Everything is restored afterwards.

Only one copy of the model is ever on the device: the original projections and their
reconstructions are swapped into the model in turn, and swapped back.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from masasurgery._checks import check_module
from masasurgery._state import (
    cast_floating,
    fused_attn_settings,
    model_device,
    pinned_kernels,
    preserved,
    sdpa_backend_of,
)
from masasurgery.errors import (
    ConfigError,
    ConversionMismatchError,
    MasaWarning,
    ModelRunError,
    sentence,
)
from masasurgery.passes.capture import Inputs
from masasurgery.passes.rewrite import _set_submodule
from masasurgery.tolerances import Tolerance, tolerance_for
from masasurgery.verify_compare import RunOutput, check_task, compare, resolve_task
from masasurgery.verify_layers import (
    FittedProjection,
    check_weights,
    fitted_projections,
    layer_errors,
    output_checks,
    reference_modules,
)
from masasurgery.verify_report import (
    Comparison,
    LayerCheck,
    LayerError,
    ReferenceCheck,
    VerificationReport,
)

if TYPE_CHECKING:
    from masasurgery.convert import Conversion

__all__ = [
    "Comparison",
    "LayerCheck",
    "LayerError",
    "ReferenceCheck",
    "VerificationReport",
    "verify",
]

#: The seed every run starts from, so that dropout draws the same masks.
SEED = 0


def verify(
    model: nn.Module,
    conversion: Conversion,
    example_inputs: Any,
    *,
    device: torch.device | str | None = None,
    tolerance: Tolerance | None = None,
    task: str = "auto",
    sdpa_backend: SDPBackend | str | None = None,
    reference_float64: bool = False,
) -> VerificationReport:
    """Check a converted model against its reference and its original.

    The model, the kept original projections and the reference projections are
    moved to ``device`` one model at a time (originals and references are small:
    the attention projections alone), and back afterwards. Train/eval modes,
    devices, ``requires_grad``, TF32, SDPA and fast-path settings are restored,
    also when a run raises. In train mode every run starts from the same random
    seed, so dropout masks agree.

    Args:
        model: The converted model.
        conversion: The record :func:`masasurgery.convert` returned for it.
        example_inputs: A tensor, a tuple of positional arguments, or a dict of
            keyword arguments for ``model.forward``.
        device: Where to run; CUDA when available, else CPU. A model spread over
            several devices runs where it is.
        tolerance: Overrides the table entry for the model's dtype and device.
        task: Which prediction figures to add to part 2: ``"classification"``
            (top-1 agreement of ``(batch, classes)`` logits), ``"lm"`` (top-1
            agreement and mean KL of the ``(batch, seq, vocab)`` next-token
            logits), ``"none"``, or ``"auto"``: told from the output (``logits``
            of rank 2 or 3, or a plain 2-D tensor from a model with classes).
        sdpa_backend: The one scaled-dot-product-attention kernel every run may
            use: an ``SDPBackend`` or ``"math"``, ``"flash"``, ``"efficient"``,
            ``"cudnn"``. Default: the math kernel, on every device and dtype.
        reference_float64: Also run the original model in float64 on the CPU
            and report both models against it: the original's error there is the
            noise floor of the kernels and dtype. Casts the model's tensors to
            CPU copies for that run (no second copy on ``device``) and puts the
            very same tensors back.

    Returns:
        Both halves of the verification, in figures.

    Raises:
        ConfigError: ``model`` is not a ``torch.nn.Module``, ``task`` or
            ``sdpa_backend`` is unknown, or ``task`` names logits the output does
            not have.
        VerificationError: The runs returned outputs of different structure.
        ConversionMismatchError: The conversion belongs to another model, or
            released its originals.
        ModelRunError: The model failed on the example inputs.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3)
        >>> x = torch.randn(2, 3, 224, 224)
        >>> conversion = masasurgery.convert(m, atoms=1, example_inputs=x, verify=False)
        >>> report = masasurgery.verify(
        ...     m, conversion, x, device="cpu", reference_float64=True
        ... )
        >>> report.rewrite_exact, report.lossless, report.task
        (True, False, 'classification')
        >>> noise, error = report.reference.original, report.reference.converted
        >>> noise.max_abs < 1e-3 < error.max_abs
        True
    """
    # Options first, so that a bad one fails before anything moves
    check_module(model)
    _check_belongs(model, conversion)
    if conversion.rewrite.originals_released:
        raise ConversionMismatchError(
            "this conversion released its original projections "
            "(convert(..., keep_originals=False)), so there is nothing to verify "
            "against; convert with keep_originals=True to verify later."
        )
    check_task(task)
    backend = sdpa_backend_of(sdpa_backend)
    device = _run_device(model, device)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tolerance = tolerance or tolerance_for(dtype, device or "cpu")
    training = model.training
    if reference_float64 and training and (device is None or device.type != "cpu"):
        warnings.warn(
            "the float64 reference runs on the CPU, where dropout draws other masks "
            f"than on {device}; in train mode its figures include that difference. "
            "Call model.eval() first, or verify on device='cpu'.",
            MasaWarning,
            stacklevel=2,
        )

    # Runs with pinned kernels, everything restored afterwards
    fitted = fitted_projections(conversion)
    runs = _runs(
        model,
        conversion,
        fitted,
        example_inputs,
        device,
        tolerance,
        backend,
        reference_float64,
    )

    # Figures
    task = resolve_task(task, runs.converted.output, model)
    mask = _attention_mask(example_inputs)
    figures = dict(tolerance=tolerance, task=task, mask=mask)
    reference = None
    if runs.float64 is not None:
        reference = ReferenceCheck(
            original=compare(runs.original, runs.float64, **figures),
            converted=compare(runs.converted, runs.float64, **figures),
        )
    return VerificationReport(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tolerance,
        settings={**runs.settings, "seed": SEED, "training": training},
        rewrite=compare(runs.converted, runs.reconstructed, **figures),
        approximation=compare(runs.converted, runs.original, **figures),
        layer_checks=list(runs.checks.values()),
        layer_errors=layer_errors(conversion, fitted),
        lossless=conversion.lossless,
        task=task,
        reference=reference,
    )


@dataclass
class _Runs:
    """The outputs of every run, the part-1 checks and the settings in force."""

    converted: RunOutput
    reconstructed: RunOutput
    original: RunOutput
    float64: RunOutput | None
    checks: dict[tuple[str, str, str], LayerCheck]
    settings: dict[str, Any]


def _runs(
    model: nn.Module,
    conversion: Conversion,
    fitted: dict[str, FittedProjection],
    example_inputs: Any,
    device: torch.device | None,
    tolerance: Tolerance,
    backend: SDPBackend,
    reference_float64: bool,
) -> _Runs:
    done = conversion.rewrite
    references = reference_modules(conversion, fitted)
    modules = [model, *done.originals.values(), *references.values()]
    with (
        preserved(*modules),
        pinned_kernels(backend) as settings,
        torch.no_grad(),
    ):
        # Move everything to the device, one model's worth
        if device is not None and model_device(model) is not None:
            for module in modules:
                module.to(device)
            inputs = Inputs.of(example_inputs).to(device)
        else:
            inputs = Inputs.of(example_inputs)

        # Converted (checking each projection), reference, original
        checks: dict[tuple[str, str, str], LayerCheck] = {}
        check_weights(done.replacements, references, fitted, tolerance, checks)
        with output_checks(done.replacements, references, fitted, tolerance, checks):
            converted = _run(model, inputs)
        with _swapped(model, references):
            reconstructed = _run(model, inputs)
        with _swapped(model, done.originals):
            original = _run(model, inputs)

        # The original once more, in float64 on the CPU
        float64 = None
        if reference_float64:
            float64 = _float64_run(model, done.originals, Inputs.of(example_inputs))

    settings = {**settings, "fused_attn": fused_attn_settings(model)}
    return _Runs(converted, reconstructed, original, float64, checks, settings)


def _check_belongs(model: nn.Module, conversion: Conversion) -> None:
    """Refuse a model the conversion record does not describe."""
    from masasurgery.convert import submodule_or_none

    target = conversion.foreign_target(model)
    if target is None:
        return
    found = submodule_or_none(model, target)
    if found is not None and found is conversion.rewrite.originals.get(target):
        raise ConversionMismatchError(
            f"this conversion of {type(model).__name__} was undone already: "
            f"{target!r} holds its original projection again. Convert the "
            "model anew to get a fresh record."
        )
    raise ConversionMismatchError(
        f"this conversion does not belong to {type(model).__name__}: its "
        f"replacement for {target!r} is not in the model (found "
        f"{type(found).__name__}). Pass the model that convert() changed, "
        "with the record convert() returned for it."
    )


def _run_device(
    model: nn.Module, device: torch.device | str | None
) -> torch.device | None:
    # A model spread over several devices runs where it is
    if model_device(model) is None:
        return None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"device must be a torch device such as 'cpu' or 'cuda:0', got "
            f"{device!r} ({e})."
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r} was asked for, but CUDA is not available here; "
            "pass device='cpu', or leave device=None to use CUDA when there is one."
        )
    return device


def _attention_mask(example_inputs: Any) -> Tensor | None:
    inputs = Inputs.of(example_inputs)
    mask = inputs.kwargs.get("attention_mask")
    return mask if isinstance(mask, Tensor) else None


# ---------------------------------------------------------------------------
# Runs


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


def _run(model: nn.Module, inputs: Inputs) -> RunOutput:
    # Same seed for every run, so dropout in train mode draws the same masks
    devices = (
        list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        try:
            output = inputs.call(model)
        except Exception as e:
            raise ModelRunError(
                f"{type(model).__name__} failed on the example inputs while "
                f"verifying: {type(e).__name__}: {sentence(e)} Check that "
                "example_inputs match model.forward (shapes, dtypes, token ids "
                "within the vocabulary); the model was restored as it was."
            ) from e
        return RunOutput.of(output)


def _float64_run(
    model: nn.Module, originals: Mapping[str, nn.Module], inputs: Inputs
) -> RunOutput:
    """The original model in float64 on the CPU, with the math SDPA kernel."""
    with (
        _swapped(model, originals),
        cast_floating(model, "cpu", torch.float64),
        sdpa_kernel(SDPBackend.MATH),
    ):
        return _run(model, _float64_inputs(inputs))


def _float64_inputs(inputs: Inputs) -> Inputs:
    def cast(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        return x.to("cpu", torch.float64) if x.is_floating_point() else x.cpu()

    args, kwargs = pytree.tree_map(cast, (inputs.args, inputs.kwargs))
    return Inputs(args=tuple(args), kwargs=dict(kwargs))
