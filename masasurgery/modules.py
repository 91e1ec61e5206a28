"""The modules a conversion puts into a model.

* :class:`AtomDictionary` owns the ``S`` shared matrices of one (group, role).
* :class:`SharedProjection` stands in for one projection (a ``Linear``, or a fused
  ``qkv`` Linear). Its weight is composed in forward from the dictionaries' atoms and
  its own coefficients, one row block per role::

      weight[rows of role r] = sum_s coefficients[r][s] * dictionaries[r].atoms[s]

  A part may add its own low-rank residual, ``up @ down`` (``(rows, r)`` times
  ``(r, in)``), fitted to what the atoms miss in that layer.

* :class:`DictionaryStore` is the one place in the model that registers the
  dictionaries, so every atom tensor appears once in ``named_parameters()`` and once
  in ``state_dict()``.

A projection reaches its dictionaries through a plain Python reference to the owning
module (not a registered child), and reads ``dictionary.atoms`` at every use. That
keeps the sharing intact whatever replaces the Parameter object itself: ``.to()``,
``load_state_dict(assign=True)``, ``to_empty()``, ``copy.deepcopy`` of the model.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masasurgery.errors import MasaError

__all__ = [
    "AtomDictionary",
    "DictionaryStore",
    "SharedConv1D",
    "SharedConv2d",
    "SharedMultiheadAttention",
    "SharedProjection",
    "set_weight_cache",
]


class AtomDictionary(nn.Module):
    """``S`` shared matrices for one projection role of one group of blocks.

    Args:
        atoms: The atoms, shape ``(S, out_features, in_features)``.
        role: The projection role the atoms serve (``"q"``, ``"k"``, ``"v"``, ``"o"``).

    Example:
        >>> d = AtomDictionary(torch.eye(2).expand(3, 2, 2).clone(), role="q")
        >>> d.compose(torch.tensor([1.0, 2.0, 0.0])).tolist()
        [[3.0, 0.0], [0.0, 3.0]]
    """

    def __init__(self, atoms: Tensor, role: str) -> None:
        super().__init__()
        if atoms.dim() != 3:
            raise ValueError(
                f"atoms must have shape (S, out_features, in_features), got "
                f"{tuple(atoms.shape)}."
            )
        self.atoms = nn.Parameter(atoms)  # (S, out, in)
        self.role = role

    @property
    def num_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def out_features(self) -> int:
        return self.atoms.shape[1]

    @property
    def in_features(self) -> int:
        return self.atoms.shape[2]

    def compose(self, coefficients: Tensor) -> Tensor:
        """The matrix ``sum_s coefficients[s] * atoms[s]``, shape ``(out, in)``."""
        return torch.tensordot(coefficients.to(self.atoms.dtype), self.atoms, dims=1)

    def extra_repr(self) -> str:
        return (
            f"role={self.role!r}, num_atoms={self.num_atoms}, "
            f"out_features={self.out_features}, in_features={self.in_features}"
        )


class DictionaryStore(nn.ModuleDict):
    """The container, at ``model.masa``, that registers every dictionary once.

    Keys are ``"group{g}_{role}"``, so the atoms of group 0's q dictionary live at
    ``masa.group0_q.atoms`` in the model's ``state_dict()``.

    Its forward passes its input through unchanged: a root ``nn.Sequential``
    calls every child in turn, the store included, and must compute what it did.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x


class SharedProjection(nn.Module):
    """A Linear projection whose weight is a mixture of shared atoms.

    The rows of the weight are split into parts, in order. A shared part (one role)
    holds only its coefficients; a dense part (a role left out of sharing) holds its
    rows as an ordinary weight. Reading ``.weight`` composes the full matrix, so code
    that calls ``F.linear(x, module.weight, bias)`` keeps working.

    Args:
        in_features: Width of the input.
        bias: The original bias (kept as is, fused across roles), or None.

    Example:
        >>> d = AtomDictionary(torch.randn(2, 4, 8), role="q")
        >>> proj = SharedProjection(8, bias=None)
        >>> proj.add_shared("q", d, torch.tensor([0.5, -1.0]))
        >>> proj(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, in_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts: list[str] = []
        self.coefficients = nn.ParameterDict()
        self.dense = nn.ParameterDict()
        # Per-layer low-rank residuals of shared parts: weight += up @ down
        self.residual_up = nn.ParameterDict()
        self.residual_down = nn.ParameterDict()
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        self.bias = bias
        # Plain references, not children: the DictionaryStore registers them.
        object.__setattr__(self, "_dictionaries", {})

    @property
    def dictionaries(self) -> dict[str, AtomDictionary]:
        """The dictionary of each shared part, by role."""
        return dict(self._dictionaries)

    def add_shared(
        self,
        role: str,
        dictionary: AtomDictionary,
        coefficients: Tensor,
        residual: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Append the rows of ``role``, composed from ``dictionary``.

        Args:
            role: The role the rows serve.
            dictionary: The shared atoms.
            coefficients: This layer's mixing weights, shape ``(S,)``.
            residual: Optional low-rank correction ``(up, down)`` of this layer,
                shapes ``(rows, r)`` and ``(r, in_features)``.
        """
        if dictionary.in_features != self.in_features:
            raise ValueError(
                f"dictionary for role {role!r} has in_features "
                f"{dictionary.in_features}, projection has {self.in_features}."
            )
        if coefficients.shape != (dictionary.num_atoms,):
            raise ValueError(
                f"coefficients for role {role!r} must have shape "
                f"({dictionary.num_atoms},), got {tuple(coefficients.shape)}."
            )
        if residual is not None:
            self._check_residual(role, dictionary, *residual)
        self._check_new_part(role)
        self.coefficients[role] = nn.Parameter(coefficients)
        if residual is not None:
            self.residual_up[role] = nn.Parameter(residual[0])
            self.residual_down[role] = nn.Parameter(residual[1])
        self._dictionaries[role] = dictionary
        self.parts.append(role)

    def _check_residual(
        self, role: str, dictionary: AtomDictionary, up: Tensor, down: Tensor
    ) -> None:
        rank = down.shape[0] if down.dim() == 2 else -1
        expected = ((dictionary.out_features, rank), (rank, self.in_features))
        if up.dim() != 2 or (tuple(up.shape), tuple(down.shape)) != expected:
            raise ValueError(
                f"residual for role {role!r} must be (up, down) of shapes "
                f"({dictionary.out_features}, r) and (r, {self.in_features}), got "
                f"{tuple(up.shape)} and {tuple(down.shape)}."
            )

    def residual_rank(self, role: str) -> int:
        """Rank of the low-rank residual of a shared part (0 without one)."""
        if role not in self.residual_down:
            return 0
        return self.residual_down[role].shape[0]

    def add_dense(self, name: str, weight: Tensor) -> None:
        """Append rows that stay an ordinary weight, shape ``(rows, in_features)``."""
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ValueError(
                f"dense part {name!r} must have shape (rows, {self.in_features}), "
                f"got {tuple(weight.shape)}."
            )
        self._check_new_part(name)
        self.dense[name] = nn.Parameter(weight)
        self.parts.append(name)

    def _check_new_part(self, name: str) -> None:
        if name in self.parts:
            raise ValueError(f"part {name!r} is already in {self.parts}.")

    @property
    def out_features(self) -> int:
        return sum(self.part_rows(name) for name in self.parts)

    def part_rows(self, name: str) -> int:
        """How many rows of the weight one part holds."""
        if name in self.dense:
            return self.dense[name].shape[0]
        return self._dictionaries[name].out_features

    def part_weight(self, name: str) -> Tensor:
        """The rows of one part, composed if shared, shape ``(rows, in)``."""
        if name in self.dense:
            return self.dense[name]
        rows = self._dictionaries[name].compose(self.coefficients[name])
        if name in self.residual_down:
            up, down = self.residual_up[name], self.residual_down[name]
            rows = torch.addmm(rows, up.to(rows.dtype), down.to(rows.dtype))
        return rows

    #: Keep the composed weight between reads while no gradient is recorded
    #: (eval, ``torch.no_grad``). Off by default: the cache holds one dense weight
    #: per projection, the memory the conversion saved. See
    #: :func:`set_weight_cache`.
    cache_weight: bool = False

    @property
    def weight(self) -> Tensor:
        """The full weight ``(out_features, in_features)``.

        Composed on each read, or served from the cache when :attr:`cache_weight`
        is on and no gradient is recorded. The cache is keyed on the identity and
        version counter of every atom, coefficient and dense tensor, so any
        in-place update (an optimizer step, ``load_state_dict``) or replacement
        invalidates it: it cannot go stale.
        """
        if not (self.cache_weight and _cache_allowed()):
            return self._compose()
        key, cached = _cache_key(self._sources()), self.__dict__.get("_cache")
        if cached is not None and _same_key(cached[0], key):
            return cached[1]
        weight = self._compose()
        self.__dict__["_cache"] = (key, weight)
        return weight

    def _compose(self) -> Tensor:
        rows = [self.part_weight(name) for name in self.parts]
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)

    def _sources(self) -> list[Tensor]:
        """Every tensor the weight is computed from."""
        tensors = []
        for name in self.parts:
            if name in self.dense:
                tensors.append(self.dense[name])
            else:
                tensors += [self._dictionaries[name].atoms, self.coefficients[name]]
            if name in self.residual_down:
                tensors += [self.residual_up[name], self.residual_down[name]]
        return tensors

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise MasaError(
            "a SharedProjection's weight is composed from shared atoms and cannot be "
            "assigned; set its coefficients (or the dictionary's atoms) instead, or "
            "call masasurgery.materialize(model) to get dense weights back."
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        parts = []
        for name in self.parts:
            if name in self.dense:
                parts.append(f"{name}:dense")
            else:
                atoms = self._dictionaries[name].num_atoms
                rank = self.residual_rank(name)
                extra = f" + rank {rank}" if rank else ""
                parts.append(f"{name}:{atoms} atoms{extra}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"parts=[{', '.join(parts)}], bias={self.bias is not None}"
        )


def set_weight_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the composed-weight cache of every shared projection on or off.

    With the cache on, a model in ``torch.no_grad()`` composes each weight once
    and reuses it until an atom or coefficient changes: inference then costs what
    the original model costs, and holds a dense weight per projection again.

    Args:
        model: A converted model.
        enabled: On or off; off also frees the cached weights.

    Returns:
        How many projections were set.

    Example:
        >>> d = AtomDictionary(torch.randn(2, 4, 8), role="q")
        >>> proj = SharedProjection(8, bias=None)
        >>> proj.add_shared("q", d, torch.tensor([0.5, -1.0]))
        >>> set_weight_cache(proj)
        1
        >>> with torch.no_grad():
        ...     proj.weight is proj.weight
        True
    """
    count = 0
    for module in model.modules():
        if isinstance(module, SharedProjection):
            module.cache_weight = enabled
            if not enabled:
                module.__dict__.pop("_cache", None)
            count += 1
    return count


def _cache_allowed() -> bool:
    # Never under autograd (the graph needs the composition) or compilation
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _cache_key(tensors: list[Tensor]) -> list[tuple]:
    return [(weakref.ref(t), t._version, t.dtype, t.device) for t in tensors]


def _same_key(old: list[tuple], new: list[tuple]) -> bool:
    if len(old) != len(new):
        return False
    for (ref_a, *rest_a), (ref_b, *rest_b) in zip(old, new, strict=True):
        if ref_a() is None or ref_a() is not ref_b() or rest_a != rest_b:
            return False
    return True


class SharedConv1D(SharedProjection):
    """A :class:`SharedProjection` in the layout of GPT-2's ``Conv1D``.

    ``Conv1D`` stores its weight as ``(in, out)`` and computes ``x @ W + b``. The
    parts and coefficients are the same as for a Linear (rows of the ``(out, in)``
    matrix); only ``weight`` (read as ``(in, out)``) and ``forward`` differ, so
    code written for ``Conv1D`` keeps working.

    Example:
        >>> d = AtomDictionary(torch.randn(2, 6, 4), role="v")
        >>> proj = SharedConv1D(4, bias=torch.zeros(6))
        >>> proj.add_shared("v", d, torch.tensor([1.0, 0.5]))
        >>> proj.weight.shape, proj.nf, proj.nx
        (torch.Size([4, 6]), 6, 4)
    """

    @property
    def weight(self) -> Tensor:
        """The full weight as ``Conv1D`` stores it, ``(in_features, out_features)``."""
        return SharedProjection.weight.fget(self).T

    @weight.setter
    def weight(self, value: Tensor) -> None:
        SharedProjection.weight.fset(self, value)

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.bias is None:
            out = rows @ self.weight
        else:
            out = torch.addmm(self.bias, rows, self.weight)
        return out.view(*x.shape[:-1], self.out_features)


class SharedConv2d(SharedProjection):
    """A :class:`SharedProjection` in the layout of a 1x1 ``nn.Conv2d``.

    A 1x1 convolution with one group is a Linear over channels: its weight
    ``(out, in, 1, 1)`` holds the ``(out, in)`` matrix of that Linear. The parts
    and coefficients are rows of that matrix; only ``weight`` (read as
    ``(out, in, 1, 1)``) and ``forward`` (a convolution with the original's
    stride, padding and dilation) differ.

    Args:
        in_features: Input channels.
        bias: The original bias, or None.
        stride: The original's stride.
        padding: The original's padding.
        dilation: The original's dilation.

    Example:
        >>> d = AtomDictionary(torch.randn(2, 6, 4), role="q")
        >>> proj = SharedConv2d(4, bias=None)
        >>> proj.add_shared("q", d, torch.tensor([1.0, 0.5]))
        >>> proj.weight.shape, proj(torch.randn(1, 4, 5, 5)).shape
        (torch.Size([6, 4, 1, 1]), torch.Size([1, 6, 5, 5]))
    """

    def __init__(
        self,
        in_features: int,
        bias: Tensor | None,
        stride: int | tuple[int, int] = 1,
        padding: int | str | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        super().__init__(in_features, bias)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    @property
    def weight(self) -> Tensor:
        """The full weight as ``nn.Conv2d`` stores it, ``(out, in, 1, 1)``."""
        return SharedProjection.weight.fget(self)[:, :, None, None]

    @weight.setter
    def weight(self, value: Tensor) -> None:
        SharedProjection.weight.fset(self, value)

    @property
    def in_channels(self) -> int:
        return self.in_features

    @property
    def out_channels(self) -> int:
        return self.out_features

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation
        )


def shallow_copy_as(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` module sharing ``module``'s settings, tensors and children.

    The registries (parameters, buffers, children) are new dicts, so adding or
    removing an entry on the copy leaves ``module`` as it was.
    """
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = dict(module.__dict__[name])
    return new


class SharedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed ``in_proj_weight`` is composed.

    The packed ``(3 * embed_dim, embed_dim)`` input projection lives in the child
    ``in_proj``, a :class:`SharedProjection` with parts q, k and v;
    ``in_proj_weight`` reads its composed weight, so ``nn.MultiheadAttention``'s
    own forward (and ``F.multi_head_attention_forward``) run unchanged. The output
    projection ``out_proj`` is replaced on its own, like any Linear.

    Built by :meth:`from_module` from an existing module, whose parameters and
    settings it takes over (the original module is left as it was).
    """

    in_proj: SharedProjection

    @classmethod
    def from_module(
        cls, module: nn.MultiheadAttention, in_proj: SharedProjection
    ) -> SharedMultiheadAttention:
        """A copy of ``module`` whose packed input weight comes from ``in_proj``."""
        if not module._qkv_same_embed_dim:
            raise NotImplementedError(
                "nn.MultiheadAttention with kdim/vdim different from embed_dim keeps "
                "separate q/k/v weights; sharing them is not supported yet."
            )
        new = shallow_copy_as(module, cls)
        del new._parameters["in_proj_weight"]
        new.in_proj = in_proj
        return new

    @property
    def in_proj_weight(self) -> Tensor:
        """The packed ``(3 * embed_dim, embed_dim)`` weight, composed on each read."""
        return self.in_proj.weight
