"""Save and restore what a check may touch on the user's model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["model_device", "preserved", "tf32_off"]


def model_device(model: nn.Module) -> torch.device | None:
    """The one device all parameters and buffers are on; None if several or none."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    return devices.pop() if len(devices) == 1 else None


@contextlib.contextmanager
def preserved(*modules: nn.Module) -> Iterator[None]:
    """Restore each module's train/eval flags and device on exit, also on errors."""
    saved = [
        (module, model_device(module), [(m, m.training) for m in module.modules()])
        for module in modules
    ]
    try:
        yield
    finally:
        for module, device, flags in saved:
            if device is not None:
                module.to(device)
            for m, training in flags:
                m.training = training


@contextlib.contextmanager
def tf32_off() -> Iterator[dict[str, bool]]:
    """Turn TF32 off for CUDA matmuls and convolutions; restore on exit."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32, cudnn.allow_tf32 = False, False
    try:
        yield {"cuda_matmul_tf32": False, "cudnn_tf32": False}
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
