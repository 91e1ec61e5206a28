"""Capture: turn a model into an fx graph with concrete shapes.

Capture paths are tried in order (a table, first success wins); each failure is kept
with its reason so the analysis can say why a later path was used.

After capture, one forward over the example inputs records, on every node,
``node.meta["tensor_meta"]`` (shapes, as torch.fx's ShapeProp does) and, for nodes
that produce plain Python values (sizes, ints, tuples), ``node.meta["value"]``. The
attention finder replays data-movement ops with those values.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from masasurgery.errors import CaptureError

__all__ = ["CAPTURE_PATHS", "Capture", "Inputs", "capture"]

logger = logging.getLogger(__name__)


@dataclass
class Inputs:
    """Example inputs of a model: positional and keyword arguments."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs: Any) -> Inputs:
        """Normalise a tensor, a tuple of args, a dict of kwargs, or Inputs."""
        if isinstance(example_inputs, Inputs):
            return example_inputs
        if isinstance(example_inputs, dict):
            return cls(kwargs=dict(example_inputs))
        if isinstance(example_inputs, (tuple, list)):
            return cls(args=tuple(example_inputs))
        return cls(args=(example_inputs,))

    def to(self, device: torch.device | str) -> Inputs:
        """The same inputs with every tensor moved to ``device``."""

        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return Inputs(
            args=tuple(move(a) for a in self.args),
            kwargs={k: move(v) for k, v in self.kwargs.items()},
        )

    def call(self, model: nn.Module) -> Any:
        """Run ``model`` on these inputs."""
        return model(*self.args, **self.kwargs)


@dataclass
class Capture:
    """A model captured as a graph.

    Attributes:
        gm: The graph module. Its ``call_module`` and ``get_attr`` targets are the
            model's own qualified names (``blocks.0.attn.qkv.weight``).
        path: Which capture path succeeded (``"fx"`` or ``"export"``).
        model: The captured model; projections are looked up in it by name.
        failures: The paths tried before ``path``, each with why it failed.
        hidden: Modules the graph calls as leaves although they own projections
            (timm's ``GPSA``, ``nn.MultiheadAttention`` under fx): attention may
            hide inside them, where only another path can see it.
    """

    gm: fx.GraphModule
    path: str
    model: nn.Module = field(repr=False)
    failures: dict[str, str] = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)


def capture(model: nn.Module, inputs: Inputs, paths: Sequence[str] = ()) -> Capture:
    """Capture ``model`` as an fx graph and record shapes from ``inputs``.

    The paths are tried in order: torch.fx symbolic tracing (with timm's leaf and
    autowrap registries), then ``torch.export`` (non-strict; it traces through
    modules that fx keeps as leaves, and captures transformers models, which fx
    cannot since transformers 5).

    Args:
        model: The model to read. It is not changed.
        inputs: Example inputs for one forward.
        paths: Which paths to try, in order; all of :data:`CAPTURE_PATHS` if empty.

    Returns:
        The graph, the path used, and the failures of earlier paths.

    Raises:
        CaptureError: No path could capture the model; lists each path's reason.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> capture(m, Inputs.of(torch.randn(1, 3, 224, 224))).path
        'fx'
    """
    failures: dict[str, str] = {}
    for path in paths or CAPTURE_PATHS:
        try:
            gm = CAPTURE_PATHS[path](model, inputs)
        except Exception as e:  # any failure moves on to the next path
            failures[path] = f"{type(e).__name__}: {_first_line(e)}"
            logger.debug("capture path %r failed: %s", path, failures[path])
            continue
        logger.debug("captured %s with path %r", type(model).__name__, path)
        hidden = _hidden_projections(gm, model)
        if hidden:
            logger.debug("path %r calls leaves that own projections: %s", path, hidden)
        return Capture(gm, path, model, failures=failures, hidden=hidden)

    reasons = "\n".join(f"  {p}: {why}" for p, why in failures.items())
    raise CaptureError(
        f"could not capture {type(model).__name__}; every path failed:\n{reasons}\n"
        "Check that the example inputs match the model's forward, or see the "
        "recipe for custom architectures in docs/custom.md."
    )


def _trace_fx(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
    tracer = _MasaTracer()
    concrete = _concrete_args(model, inputs)
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _propagate(gm, inputs)
    return gm


def _trace_export(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
    # Non-strict export keeps parameters under their own names in the unlifted
    # module, and records a FakeTensor (shape) or int on every node
    with torch.no_grad():
        program = torch.export.export(
            model, inputs.args, inputs.kwargs or None, strict=False
        )
    gm = program.module()
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if _has_tensor(value):
            node.meta["tensor_meta"] = map_aggregate(value, _tensor_meta)
        elif isinstance(value, (int, float, bool, tuple, list)):
            node.meta["value"] = value
    return gm


#: Graph capture paths, tried in order. When both fail, the analysis reads the
#: module tree instead (:mod:`masasurgery.passes.structure`).
CAPTURE_PATHS: dict[str, Callable[[nn.Module, Inputs], fx.GraphModule]] = {
    "fx": _trace_fx,
    "export": _trace_export,
}


def _hidden_projections(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """Leaf modules the graph calls that own a Linear or a convolution inside."""
    modules = dict(model.named_modules())
    hidden = []
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is None or isinstance(module, _PROJECTION_TYPES):
            continue
        if any(isinstance(m, _PROJECTION_TYPES) for m in module.modules()):
            hidden.append(node.target)
    return list(dict.fromkeys(hidden))


_PROJECTION_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _concrete_args(model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    """Non-tensor keyword inputs, and the defaults of forward arguments not given.

    fx cannot trace ``if mask is not None or is_causal`` on Proxies; fixing the
    arguments the user left out to their plain defaults (None, flags, numbers)
    makes such branches concrete.
    """
    concrete = {k: v for k, v in inputs.kwargs.items() if not _is_tensor(v)}
    signature = inspect.signature(model.forward)
    names = list(signature.parameters)[len(inputs.args) :]
    for name in names:
        default = signature.parameters[name].default
        if name not in inputs.kwargs and isinstance(default, _PLAIN_DEFAULTS):
            concrete[name] = default
    return concrete


_PLAIN_DEFAULTS = (type(None), bool, int, float, str)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


class _MasaTracer(fx.Tracer):
    """An fx tracer that honours timm's leaf-module and autowrap registries."""

    def __init__(self) -> None:
        leaves, functions = _timm_registries()
        super().__init__(autowrap_functions=tuple(functions))
        self._leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaves and isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _timm_registries() -> tuple[list[type], list[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return [], []
    functions = [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return timm_fx.get_notrace_modules(), functions


class _ValueProp(fx.Interpreter):
    """Records shapes as torch.fx's ShapeProp does, plus plain Python values."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if _has_tensor(result):
            n.meta["tensor_meta"] = map_aggregate(result, _tensor_meta)
        else:
            n.meta["value"] = result
        return result


def _tensor_meta(x: Any) -> Any:
    return _extract_tensor_metadata(x) if isinstance(x, torch.Tensor) else x


def _propagate(gm: fx.GraphModule, inputs: Inputs) -> None:
    # Placeholders in order; keyword inputs fill the slots they name
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(inputs.args)
    for node in placeholders[len(args) :]:
        if node.target in inputs.kwargs:
            args.append(inputs.kwargs[node.target])
        elif node.args:
            args.append(node.args[0])  # the forward's default value
        else:
            args.append(None)
    with torch.no_grad():
        _ValueProp(gm).run(*args)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _has_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return any(_has_tensor(v) for v in x)
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    return False
