"""The batches a heal reads, and running a model on one of them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from masasurgery._state import model_device
from masasurgery.errors import ConfigError, MasaError, ModelRunError, sentence
from masasurgery.inputs import resolve_inputs
from masasurgery.passes.capture import Inputs

__all__ = ["Batches", "call", "held_out", "mask_of"]


class Batches:
    """Training batches, cycled: a list or a DataLoader is iterated again when it
    runs out; a one-shot iterator (a generator) ends the heal instead.

    Each item becomes :class:`Inputs` on the model's device. The first item is
    read at once, so empty data fails before anything changes.

    Raises:
        ConfigError: ``data`` is a single batch rather than an iterable of
            batches, or holds no batch.
    """

    def __init__(self, model: nn.Module, data: Iterable) -> None:
        _check_iterable(data, "data")
        self.model, self.data = model, data
        self.iterator = iter(data)
        first = next(self.iterator, _END)
        if first is _END:
            raise ConfigError(
                "data holds no batch; pass a non-empty list or DataLoader of "
                "batches (tensors, tuples of positional arguments, or dicts of "
                "keyword arguments)."
            )
        self.pending = first

    def next(self) -> Inputs | None:
        """The next batch, or None when a one-shot iterator is spent."""
        item, self.pending = self.pending, _END
        if item is _END:
            item = next(self.iterator, _END)
        if item is _END and iter(self.data) is not self.data:
            self.iterator = iter(self.data)
            item = next(self.iterator, _END)
        if item is _END:
            return None
        return _to_model(self.model, item)


_END = object()


def held_out(model: nn.Module, eval_data: Iterable) -> list[Inputs]:
    """Every held-out batch, in memory, on the model's device.

    Raises:
        ConfigError: ``eval_data`` is a single batch or holds none.
    """
    _check_iterable(eval_data, "eval_data")
    batches = [_to_model(model, item) for item in eval_data]
    if not batches:
        raise ConfigError("eval_data holds no batch; pass held-out batches or None.")
    return batches


def _check_iterable(data: Any, name: str) -> None:
    if isinstance(data, (Tensor, dict, Inputs)) or not isinstance(data, Iterable):
        raise ConfigError(
            f"{name} must be an iterable of batches (a list, a DataLoader, a "
            f"generator), got {type(data).__name__}; wrap a single batch in a "
            f"list: {name}=[batch]."
        )


def _to_model(model: nn.Module, item: Any) -> Inputs:
    if item is None:
        raise ConfigError("a batch is None; expected a tensor, a tuple or a dict.")
    inputs = resolve_inputs(model, item)
    device = model_device(model)
    return inputs.to(device) if device is not None else inputs


def mask_of(inputs: Inputs) -> Tensor | None:
    """The ``attention_mask`` keyword of a batch, if any."""
    mask = inputs.kwargs.get("attention_mask")
    return mask if isinstance(mask, Tensor) else None


def call(model: nn.Module, inputs: Inputs, who: str) -> Any:
    """Run ``model`` on a batch; a failure becomes a :class:`ModelRunError`."""
    try:
        return inputs.call(model)
    except MasaError:
        raise
    except Exception as e:
        raise ModelRunError(
            f"the {who} ({type(model).__name__}) failed on a batch: "
            f"{type(e).__name__}: {sentence(e)} Check that the batches match "
            "model.forward (a tensor, a tuple of positional arguments or a dict "
            "of keyword arguments); the trained parameters were put back."
        ) from e
