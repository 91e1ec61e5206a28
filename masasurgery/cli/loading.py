"""The first step of every command: MODEL and options, to a model and inputs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masasurgery.cli.examples import InputSpec, example_inputs, input_spec, to_model
from masasurgery.cli.sources import Resolved, resolve
from masasurgery.config import MasaConfig
from masasurgery.errors import ConfigError

__all__ = ["Loaded", "load_model", "parse_device", "parse_roles"]


@dataclass
class Loaded:
    """A model built from the command line, with its example inputs.

    Attributes:
        resolved: What MODEL named (and a checkpoint to load, if any).
        spec: How the inputs were made.
        model: The model, in eval mode, on ``device`` when one was given.
        inputs: Example inputs for one forward, on the model's device.
        device: The ``--device``, or None for the library's default.
    """

    resolved: Resolved
    spec: InputSpec
    model: nn.Module
    inputs: Any
    device: torch.device | None

    @property
    def checkpoint(self) -> Path | None:
        return self.resolved.checkpoint

    def describe(self) -> dict[str, Any]:
        """The model's source and inputs, for the JSON report."""
        return {
            "source": self.resolved.source.to_dict(),
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "inputs": self.spec.to_dict(),
        }


def load_model(args: argparse.Namespace) -> Loaded:
    """Resolve MODEL, build the model and make its example inputs."""
    device = parse_device(args.device)
    resolved = resolve(
        args.model,
        kwargs=args.model_kwargs,
        pretrained=args.pretrained,
        weights=args.weights,
        dtype=args.dtype,
        seed=args.seed,
    )
    given = {
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "seq_len": args.seq_len,
        "images": args.images,
    }
    spec = input_spec(given, resolved.inputs, resolved.source)
    model = resolved.source.build()
    if device is not None:
        model.to(device)
    inputs = to_model(example_inputs(model, spec, resolved.source), model)
    return Loaded(resolved, spec, model, inputs, device)


def parse_device(name: str | None) -> torch.device | None:
    """``--device``, checked: a torch device that exists here."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"--device must be e.g. cpu, cuda or cuda:1, got {name!r}."
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} was asked for, but CUDA is not available here; use "
            "--device cpu, or leave it out (CUDA when there is one)."
        )
    return device


def parse_roles(text: str) -> tuple[str, ...]:
    """``--roles q,k``: the roles to share, checked."""
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    return MasaConfig(atoms=1, roles=roles).roles
