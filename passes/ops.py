"""Op tables and small predicates on fx nodes, shared by the attention finder.

Ops are compared by packet, so every overload of an aten op matches. The tables
name what the finder may walk through: data movement (replayed exactly on row
indices), shape-preserving ops that keep each element in place, ops that keep
channels apart while changing the tokens (pooling, depthwise convolutions,
reductions over tokens), and the matmuls, softmaxes and projections that mark
an attention core. The predicates read one node, never a path.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "CONV2D_FUNCTIONS",
    "LINEAR_FUNCTIONS",
    "MATMUL_WEIGHT_ARG",
    "SDPA",
    "SHAPE_OF_OTHER",
    "data_input",
    "is_arithmetic",
    "is_concat",
    "is_conv1x1",
    "is_matmul",
    "is_pad",
    "is_softmax",
    "keeps_channels",
    "moves_data",
    "operands",
    "packet",
    "passes_through",
    "reduces_tokens",
    "reduction_dims",
]

aten = torch.ops.aten

# Ops are compared by packet, so every overload of an aten op matches.
SDPA = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    aten.scaled_dot_product_attention,
}
_SOFTMAX_FUNCTIONS = {
    F.softmax, torch.softmax, torch.Tensor.softmax,
    aten.softmax, aten._softmax, aten._safe_softmax,
}  # fmt: skip
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, aten.matmul, aten.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_EINSUM_FUNCTIONS = {torch.einsum, aten.einsum}
LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear}
CONV2D_FUNCTIONS = {F.conv2d, aten.conv2d}
# Ops that mix the elements of their input even where the shape is kept.
_MIXING_FUNCTIONS = {
    *LINEAR_FUNCTIONS, *CONV2D_FUNCTIONS, F.conv1d, aten.conv1d,
    aten.convolution, aten.mm, aten.addmm, torch.mm, torch.addmm, aten.baddbmm,
}  # fmt: skip
# Ops that multiply by a weight at this argument position: x @ W (+ bias)
MATMUL_WEIGHT_ARG = {aten.addmm: 2, aten.mm: 1, aten.matmul: 1, torch.addmm: 2}
# Ops whose data input is not their first node argument
_DATA_ARG = {aten.addmm: 1, torch.addmm: 1}

# Ops that only move data: replaying them on row indices is exact.
_MOVE_METHODS = {
    "reshape", "view", "permute", "transpose", "unbind", "chunk", "split",
    "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
    "movedim", "narrow", "select", "repeat_interleave", "swapaxes", "tensor_split",
    "__getitem__", "reshape_as", "view_as", "expand_as", "unfold",
}  # fmt: skip
# Methods that read only the shape of their second tensor argument.
SHAPE_OF_OTHER = {"reshape_as", "view_as", "expand_as"}
# Concatenations: data movement with several tensor inputs.
_CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.stack, aten.cat, aten.stack}
# Padding: data movement that adds positions holding no row.
_PAD_FUNCTIONS = {F.pad, torch._C._nn.pad, aten.pad, aten.constant_pad_nd}
# Elementwise arithmetic, by name (operator.add, torch.add, aten.add, x.add).
_ARITHMETIC = {"add", "sub", "rsub", "mul", "div", "truediv", "iadd", "imul"}
# Reductions that keep channels when taken over token dims (hiera's q pooling).
_REDUCTIONS = {"amax", "amin", "mean", "sum"}
# Pooling, per channel over the trailing (spatial) dims.
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch._C._nn.avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
    aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d,
    aten.adaptive_max_pool2d, aten.avg_pool1d, aten.max_pool1d,
}  # fmt: skip
# Elementwise activation modules: they keep each element in place.
_ACTIVATION_MODULES = (
    nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.Mish,
)  # fmt: skip
_MOVE_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.unbind,
    torch.chunk, torch.split, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.movedim, torch.narrow, torch.select, torch.repeat_interleave,
    torch.swapaxes, torch.tensor_split,
    aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose,
    aten.t, aten.unbind, aten.chunk, aten.split, aten.split_with_sizes,
    aten.unflatten, aten.flatten, aten.squeeze, aten.unsqueeze, aten.expand,
    aten.movedim, aten.narrow, aten.select, aten.slice, aten.repeat_interleave,
    aten.clone, aten.contiguous, aten.alias, aten.tensor_split, aten.unfold,
    *_CONCAT_FUNCTIONS, *_PAD_FUNCTIONS,
}  # fmt: skip
# Modules a walk may pass: they keep a tensor's layout (norms, dropout, identity).
_LAYOUT_MODULES = (
    nn.Identity, nn.Dropout, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)  # fmt: skip


def packet(target: Any) -> Any:
    """An aten overload's packet (``aten.view``), anything else as it is."""
    return getattr(target, "overloadpacket", target)


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs[name]


def _shape(node: Any) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def data_input(node: fx.Node) -> fx.Node | None:
    """The tensor a unary-like op transforms: its first node argument, except
    for ops like ``addmm(bias, x, W)`` whose data comes later."""
    index = _DATA_ARG.get(packet(node.target)) if node.op == "call_function" else None
    if index is not None:
        arg = node.args[index] if len(node.args) > index else None
        return arg if isinstance(arg, fx.Node) else None
    for arg in node.args:
        if isinstance(arg, fx.Node):
            return arg
    return None


def operands(matmul: fx.Node) -> tuple[Any, Any]:
    """The two tensors a matmul (or a two-operand einsum) multiplies."""
    if packet(matmul.target) in _EINSUM_FUNCTIONS:
        tensors = matmul.args[1:]
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tensors[0]  # aten.einsum(equation, [a, b])
        return (tensors[0], tensors[1]) if len(tensors) == 2 else (None, None)
    return matmul.args[0], matmul.args[1]


def is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function":
        return packet(node.target) in _SOFTMAX_FUNCTIONS
    return node.op == "call_method" and node.target == "softmax"


def is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function" and packet(node.target) in _EINSUM_FUNCTIONS:
        return operands(node)[1] is not None
    if node.op == "call_function":
        return packet(node.target) in _MATMUL_FUNCTIONS
    return node.op == "call_method" and node.target in _MATMUL_METHODS


def moves_data(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _MOVE_METHODS
    if node.op == "call_function":
        if node.target is getattr and node.args[1] in ("T", "mT"):
            return True
        return packet(node.target) in _MOVE_FUNCTIONS
    return False


def is_concat(node: fx.Node) -> bool:
    return node.op == "call_function" and packet(node.target) in _CONCAT_FUNCTIONS


def is_pad(node: fx.Node) -> bool:
    return node.op == "call_function" and packet(node.target) in _PAD_FUNCTIONS


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target.strip("_")
    if node.op == "call_function":
        return getattr(packet(node.target), "__name__", "").strip("_")
    return ""


def is_arithmetic(node: fx.Node) -> bool:
    return _op_name(node) in _ARITHMETIC and _shape(node) is not None


def reduces_tokens(node: fx.Node) -> bool:
    """A reduction over given dims (``q.amax(dim=3)``); replay checks which."""
    if _op_name(node) not in _REDUCTIONS or _shape(node) is None:
        return False
    dims, _ = reduction_dims(node)
    return bool(dims)


def reduction_dims(node: fx.Node) -> tuple[tuple[int, ...], bool]:
    # (input, dim, keepdim) for methods, torch and aten functions alike
    args, kwargs = node.args, node.kwargs
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not all(isinstance(d, int) for d in dim):
        return (), False
    return tuple(dim), bool(keepdim)


def keeps_channels(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Pooling or a depthwise convolution: per channel, over the spatial dims."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, _POOL_MODULES) or _is_depthwise(module)
    if node.op != "call_function":
        return False
    if packet(node.target) in _POOL_FUNCTIONS:
        return True
    if packet(node.target) not in CONV2D_FUNCTIONS:
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    shape, out = _shape(data_input(node)), _shape(node)
    return shape is not None and out is not None and groups == shape[1] == out[1]


def passes_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Shape-preserving ops that keep each element in place (norms, scaling)."""
    data = data_input(node)
    if data is None or _shape(node) is None or _shape(node) != _shape(data):
        return False
    if node.op == "call_module":
        module = modules.get(node.target)
        layout = isinstance(module, (*_LAYOUT_MODULES, *_ACTIVATION_MODULES))
        return layout or _is_small_norm(module) or _is_depthwise(module)
    if node.op == "call_function" and packet(node.target) in _MIXING_FUNCTIONS:
        return False  # a Linear or convolution of width ``in == out`` mixes rows
    return node.op in ("call_function", "call_method") and not is_matmul(node)


def _is_depthwise(module: nn.Module | None) -> bool:
    # One filter per channel: each output channel reads its own input channel
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    return module.groups == module.in_channels == module.out_channels


def _is_small_norm(module: nn.Module | None) -> bool:
    # Norm-like leaf modules of other libraries: only vector parameters
    if module is None or "norm" not in type(module).__name__.lower():
        return False
    return all(p.dim() <= 1 for p in module.parameters())


def is_conv1x1(module: nn.Module | None) -> bool:
    """A plain ``nn.Conv2d`` that is a Linear over channels: 1x1, one group.

    Subclasses are left out: timm's ``StdConv2d`` standardises its weight in
    forward, so the stored weight is not the one applied.
    """
    if type(module) is not nn.Conv2d:
        return False
    plain = module.groups == 1 and module.padding_mode == "zeros"
    return plain and tuple(module.kernel_size) == (1, 1)
