"""The first check of every public step that takes a model: is it one?"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from masasurgery.errors import ConfigError

__all__ = ["check_module"]


def check_module(model: object) -> None:
    """Raise unless ``model`` is a ``torch.nn.Module``, saying how to get one.

    Raises:
        ConfigError: ``model`` is a name, a state dict, None or anything else.
    """
    if isinstance(model, nn.Module):
        return
    got = _describe(model)
    if isinstance(model, str):
        fix = (
            f"build the model first, e.g. model = timm.create_model({model!r}), "
            "and pass the model (the command line takes names: masasurgery "
            f"analyze {model})"
        )
    elif isinstance(model, Mapping):
        fix = (
            "a state dict is not a model: build the model with its own code, "
            "call model.load_state_dict(state), and pass the model"
        )
    else:
        fix = "build the model first, e.g. model = timm.create_model(name)"
    raise ConfigError(f"expected a torch.nn.Module as the model, got {got}; {fix}.")


def _describe(value: object) -> str:
    if value is None:
        return "None"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"
