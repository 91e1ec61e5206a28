"""Save and restore what a check may touch on the user's model and on torch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from masasurgery.errors import ConfigError

__all__ = [
    "SDPA_BACKENDS",
    "cast_floating",
    "fused_attn_settings",
    "model_device",
    "pinned_kernels",
    "preserved",
    "sdpa_backend_of",
    "tf32_off",
]

#: Names accepted for an SDPA backend, as in ``torch.nn.attention.SDPBackend``.
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def model_device(model: nn.Module) -> torch.device | None:
    """The one device all parameters and buffers are on; None if several or none."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    return devices.pop() if len(devices) == 1 else None


@contextlib.contextmanager
def preserved(*modules: nn.Module) -> Iterator[None]:
    """Restore each module's modes, device and ``requires_grad``, also on errors."""
    saved = [
        (
            module,
            model_device(module),
            [(m, m.training) for m in module.modules()],
            [(p, p.requires_grad) for p in module.parameters()],
        )
        for module in modules
    ]
    try:
        yield
    finally:
        for module, device, flags, grads in saved:
            if device is not None:
                module.to(device)
            for m, training in flags:
                m.training = training
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)


@contextlib.contextmanager
def tf32_off() -> Iterator[dict[str, Any]]:
    """Full float32 precision for matmuls and convolutions; restore on exit.

    Turns off TF32 on CUDA (cuBLAS and cuDNN) and the reduced-precision float32
    matmuls that ``torch.set_float32_matmul_precision("high" | "medium")`` also
    allows on the CPU (oneDNN TF32 or bf16). Torch keeps these flags in two APIs
    that refuse to be mixed: the legacy one (``set_float32_matmul_precision``,
    ``allow_tf32``) is used when the user's settings read through it, else the
    per-backend ``fp32_precision`` one; either way the same API puts the
    user's values back.

    Example:
        >>> with tf32_off() as settings:
        ...     torch.backends.cuda.matmul.allow_tf32
        False
        >>> settings["float32_matmul_precision"]
        'highest'
    """
    try:
        legacy = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # set through the per-backend API; only it reads back
        legacy = None
    nodes = _fp32_precision_nodes()
    saved = [node.fp32_precision for node in nodes]
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    else:
        for node in nodes:
            node.fp32_precision = "ieee"
    try:
        yield {
            "cuda_matmul_tf32": False,
            "cudnn_tf32": False,
            "float32_matmul_precision": "highest",
        }
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        else:
            for node, value in zip(nodes, saved, strict=True):
                node.fp32_precision = value


def _fp32_precision_nodes() -> list[Any]:
    # The per-backend precision flags of torch >= 2.9; none on older versions
    backends = torch.backends
    candidates = [
        getattr(parent, name, None)
        for parent in (backends.cuda, backends.cudnn, backends.mkldnn)
        for name in ("matmul", "conv", "rnn")
    ]
    return [n for n in candidates if hasattr(n, "fp32_precision")]


def sdpa_backend_of(backend: SDPBackend | str | None) -> SDPBackend:
    """The SDPA backend named by ``backend``; ``None`` is the math kernel.

    Raises:
        ConfigError: The name is none of :data:`SDPA_BACKENDS`.

    Example:
        >>> sdpa_backend_of("efficient").name, sdpa_backend_of(None).name
        ('EFFICIENT_ATTENTION', 'MATH')
    """
    if backend is None:
        return SDPBackend.MATH
    if isinstance(backend, SDPBackend):
        return backend
    if isinstance(backend, str) and backend.lower() in SDPA_BACKENDS:
        return SDPA_BACKENDS[backend.lower()]
    raise ConfigError(
        f"unknown SDPA backend {backend!r}; pass a "
        f"torch.nn.attention.SDPBackend or one of {sorted(SDPA_BACKENDS)}."
    )


@contextlib.contextmanager
def pinned_kernels(backend: SDPBackend = SDPBackend.MATH) -> Iterator[dict[str, Any]]:
    """Pin the kernels a run may pick, so that every run picks the same ones.

    Inside: TF32 is off, scaled-dot-product attention may use ``backend`` only,
    and ``nn.MultiheadAttention``'s fused fast path is off (it is taken only in
    eval mode without grad, and reads the projection weights directly). Every
    flag is restored on exit, also on errors.

    Args:
        backend: The one SDPA backend to allow.

    Returns:
        The settings in force, to record in a report.

    Example:
        >>> with pinned_kernels() as settings:
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> settings["sdpa_backend"], torch.backends.mha.get_fastpath_enabled()
        ('MATH', True)
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with tf32_off() as settings, sdpa_kernel(backend):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield {**settings, "sdpa_backend": backend.name, "mha_fastpath": False}
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def fused_attn_settings(model: nn.Module) -> dict[str, bool]:
    """The ``fused_attn`` flag of every module that has one (timm attention).

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
        >>> m.blocks[0].attn.fused_attn = False
        >>> fused_attn_settings(m)
        {'blocks.0.attn': False}
    """
    return {
        name: bool(module.fused_attn)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "fused_attn", None), bool)
    }


@contextlib.contextmanager
def cast_floating(
    model: nn.Module, device: torch.device | str, dtype: torch.dtype
) -> Iterator[None]:
    """Run ``model`` with its floating tensors cast to ``dtype`` on ``device``.

    Nothing is copied on the model's own device: each parameter gets a cast copy
    of its data on ``device``, each buffer is replaced by a cast copy, and the
    original tensors are kept aside. On exit the very same tensors are put back,
    so dtypes, devices and values come back exactly (no round trip through the
    new dtype), also on errors. Tied tensors stay tied.

    The implementation is just: ``param.data = param.data.to(device, dtype)``,
    keeping the old ``data`` to assign back.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with cast_floating(lin, "cpu", torch.float64):
        ...     lin.weight.dtype
        torch.float64
        >>> lin.weight.dtype
        torch.float32
    """
    params: dict[int, tuple[nn.Parameter, Tensor]] = {}
    buffers: list[tuple[nn.Module, str, Tensor]] = []
    cast: dict[int, Tensor] = {}
    try:
        with torch.no_grad():
            for module in model.modules():
                for p in module._parameters.values():
                    if p is None or not p.is_floating_point() or id(p) in params:
                        continue
                    params[id(p)] = (p, p.data)
                    p.data = p.data.to(device=device, dtype=dtype)
                for name, b in module._buffers.items():
                    if b is None or not b.is_floating_point():
                        continue
                    buffers.append((module, name, b))
                    if id(b) not in cast:
                        cast[id(b)] = b.to(device=device, dtype=dtype)
                    module._buffers[name] = cast[id(b)]
        yield
    finally:
        for p, data in params.values():
            p.data = data
        for module, name, b in buffers:
            module._buffers[name] = b
