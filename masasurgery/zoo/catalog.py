"""Which timm model families have attention, and the small variant standing for each.

A *family* is one of timm's model modules (``vision_transformer``,
``swin_transformer``, ...), as timm's registry lists them. The coverage benchmark
(``benchmarks/coverage.py --refresh``) picks one small variant per family with
attention and writes the list to ``timm_families.json`` next to this file; the
coverage tests and the benchmark both read it back with :func:`timm_families`, so
the supported share written in docs/ is the share the tests check.

Whether a model has attention is read off its module tree (see
:func:`is_attention_module`), so it works on models built on the meta device.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from torch import nn

from masasurgery.errors import NoAttentionError

__all__ = [
    "FAMILIES_FILE",
    "FamilyModel",
    "UNSUPPORTED",
    "Unsupported",
    "attention_modules",
    "has_attention",
    "is_attention_module",
    "rank_variants",
    "smallest_variant",
    "timm_families",
]

#: The generated list of families, in this package.
FAMILIES_FILE = "timm_families.json"

# Size words in timm model names, smallest first; unnamed sizes sort last. A word
# counts with a trailing number too ("s12", "t8", "b0").
_SIZES = (
    "atto", "femto", "pico", "nano", "xxxs", "xxs", "xxsmall", "tiny", "xs",
    "xsmall", "small", "s", "t", "b0", "0", "base", "b",
)  # fmt: skip

# Class names of token-mixing attention modules, the child names under which
# models keep them (convit's GPSA sits at ``attn``), and the names of the
# projections an attention module owns (shvit's SHSA owns a ``qkv``).
_ATTENTION_CLASS = re.compile(r"Attention|Attn|MHSA|MultiHead|SelfAttn")
_ATTENTION_CHILD = {"attn", "attention", "mha", "self_attn"}
_PROJECTION_SETS = ({"qkv"}, {"to_qkv"}, {"q", "k"}, {"q", "kv"}, {"query", "key"})


@dataclass(frozen=True)
class FamilyModel:
    """One timm family and the variant that stands for it.

    Attributes:
        family: timm's model module (``vision_transformer``).
        model: The variant's registered name.
        params: Its parameter count, with ``kwargs``.
        kwargs: Extra ``timm.create_model`` arguments that keep it small
            (``img_size``), empty when the family needs its defaults.
        input_size: ``(channels, height, width)`` of an example input.
    """

    family: str
    model: str
    params: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    input_size: tuple[int, int, int] = (3, 224, 224)

    def create(self) -> nn.Module:
        """Build the variant with random weights, in eval mode."""
        import timm

        model = timm.create_model(self.model, pretrained=False, **self.kwargs)
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "family": self.family,
            "model": self.model,
            "params": self.params,
            "kwargs": dict(self.kwargs),
            "input_size": list(self.input_size),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilyModel:
        """The inverse of :meth:`to_dict`."""
        return cls(
            family=data["family"],
            model=data["model"],
            params=int(data.get("params", 0)),
            kwargs=dict(data.get("kwargs", {})),
            input_size=tuple(data.get("input_size", (3, 224, 224))),
        )


@dataclass(frozen=True)
class Unsupported:
    """Why a family does not convert, and how its error says so.

    Attributes:
        reason: The reason, for people (docs/coverage.md).
        error: The exception ``masasurgery.convert`` raises.
        match: A regular expression its message matches.
    """

    reason: str
    error: type[Exception]
    match: str


# Why a family's attention cannot be converted, shared by several families.
_INTERLEAVED = (
    "q, k and v rows of the fused projection are interleaved per head "
    "(q_h, k_h, v_h for each head h), so no role owns a contiguous block of rows; "
    "sharing them needs a row permutation in SharedProjection (not yet)"
)
_NOT_CONTIGUOUS = "that are not contiguous"
_NO_CORE = r"found 0 attention blocks \(0 that repeat nowhere, 0 cores skipped\)"

#: The timm families that do not convert, family -> why. ``tests/test_coverage.py``
#: checks that each still fails as written here, so the list stays honest, and
#: ``benchmarks/coverage.py`` writes it to docs/coverage.md.
UNSUPPORTED: dict[str, Unsupported] = {
    "cpubone": Unsupported(_INTERLEAVED, NoAttentionError, _NOT_CONTIGUOUS),
    "edgenext": Unsupported(
        "one XCA (cross-covariance) attention block per stage, each of its own "
        "width: no two blocks repeat. XCA itself is attention in our sense (a "
        "softmax between two matmuls over q/k/v rows of qkv) and converts in xcit",
        NoAttentionError,
        r"found 3 attention blocks \(3 that repeat nowhere",
    ),
    "efficientformer": Unsupported(_INTERLEAVED, NoAttentionError, _NOT_CONTIGUOUS),
    "efficientvit_mit": Unsupported(
        "LiteMLA is ReLU linear attention: no softmax, so no attention core to "
        "anchor the q/k/v projections on",
        NoAttentionError,
        _NO_CORE,
    ),
    "levit": Unsupported(_INTERLEAVED, NoAttentionError, _NOT_CONTIGUOUS),
    "lowformer": Unsupported(_INTERLEAVED, NoAttentionError, _NOT_CONTIGUOUS),
    "swiftformer": Unsupported(
        "efficient additive attention: a learned vector weighs the queries; there "
        "is no softmax and no q.k score matrix, so no attention core",
        NoAttentionError,
        _NO_CORE,
    ),
    "tiny_vit": Unsupported(_INTERLEAVED, NoAttentionError, _NOT_CONTIGUOUS),
}


def rank_variants(names: list[str]) -> list[str]:
    """Model names, smallest-looking first: by size word, then length, then name.

    Example:
        >>> rank_variants(["vit_base_patch16_224", "vit_tiny_patch16_224"])
        ['vit_tiny_patch16_224', 'vit_base_patch16_224']
        >>> rank_variants(["fastvit_sa12", "fastvit_t8"])
        ['fastvit_t8', 'fastvit_sa12']
    """

    def key(name: str) -> tuple[int, int, str]:
        # "x_small" and "xx_small" are one size word each
        words = re.split(r"[_.]", re.sub(r"(?<![a-z])(x+)_", r"\1", name))
        ranks = [_size_rank(word) for word in words]
        return (min(ranks, default=len(_SIZES)), len(name), name)

    return sorted(names, key=key)


def smallest_variant(names: list[str]) -> str:
    """The name that looks smallest (the first of :func:`rank_variants`).

    Example:
        >>> smallest_variant(["vit_base_patch16_224", "vit_tiny_patch16_224"])
        'vit_tiny_patch16_224'
    """
    return rank_variants(names)[0]


def _size_rank(word: str) -> int:
    if word in _SIZES:
        return _SIZES.index(word)
    stem = word.rstrip("0123456789")
    return _SIZES.index(stem) if stem and stem in _SIZES else len(_SIZES)


def is_attention_module(module: nn.Module, child_name: str = "") -> bool:
    """Whether ``module`` looks like a token-mixing attention block.

    The rule, read off the module tree only (so meta-device models work):

    1. An ``nn.MultiheadAttention`` is attention.
    2. So is a module whose class name contains ``Attention``, ``Attn``, ``MHSA``,
       ``MultiHead`` or ``SelfAttn``; or that its parent keeps as ``attn``,
       ``attention``, ``mha`` or ``self_attn`` (convit's ``GPSA`` sits at
       ``attn``); or that owns projections named ``qkv``, ``to_qkv``, ``q`` and
       ``k``, ``q`` and ``kv``, or ``query`` and ``key`` (shvit's ``SHSA``).
    3. Except timm's channel and gating "attention" (squeeze-excite, ECA, CBAM,
       gather-excite, global context, coordinate attention, selective kernel,
       split attention: what ``timm.layers.create_attn`` builds for those kinds),
       and ``nn.Identity`` placeholders: they weigh channels, they mix no tokens.

    A module that passes is a candidate only: the graph decides (see
    ``masasurgery.passes.find_attention``).

    Args:
        module: The module to judge.
        child_name: The name its parent keeps it under.

    Returns:
        True when the module passes the rule.

    Example:
        >>> is_attention_module(nn.MultiheadAttention(8, 2))
        True
        >>> from timm.layers import SEModule
        >>> is_attention_module(SEModule(8), child_name="attn")
        False
    """
    if isinstance(module, nn.MultiheadAttention):
        return True
    if isinstance(module, (nn.Identity, *_channel_gates())):
        return False
    named = _ATTENTION_CLASS.search(type(module).__name__) is not None
    children = {name for name, _ in module.named_children()}
    owns = any(names <= children for names in _PROJECTION_SETS)
    return named or owns or child_name in _ATTENTION_CHILD


def attention_modules(model: nn.Module) -> list[str]:
    """Qualified names of the outermost modules that pass
    :func:`is_attention_module` (``""`` for the model itself).

    Modules inside a channel gate are left out with it.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=2)
        >>> attention_modules(m)
        ['blocks.0.attn', 'blocks.1.attn']
    """
    found: list[str] = []
    gates = (nn.Identity, *_channel_gates())

    def visit(module: nn.Module, name: str, child_name: str) -> None:
        if isinstance(module, gates):
            return
        if is_attention_module(module, child_name):
            found.append(name)
            return  # its parts go with it
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name, child_name)

    visit(model, "", "")
    return found


def has_attention(model: nn.Module) -> bool:
    """True when any submodule passes :func:`is_attention_module`.

    Example:
        >>> has_attention(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        False
    """
    return bool(attention_modules(model))


@functools.cache
def _channel_gates() -> tuple[type, ...]:
    """timm's channel and gating attention classes; empty without timm."""
    try:
        create_attn = importlib.import_module("timm.layers.create_attn")
    except ImportError:
        return ()
    kinds = ("se", "ese", "eca", "ceca", "ge", "gc", "cbam", "lcbam", "coord")
    kinds += ("scoord", "ela", "strip", "sk", "splat")
    classes = {getattr(cls, "func", cls) for cls in map(create_attn.get_attn, kinds)}
    # A gate's inner parts (SelectiveKernelAttn, the radix softmax) go with it
    classes |= {create_attn.SelectiveKernel, create_attn.SplitAttn}
    return tuple(c for c in classes if isinstance(c, type))


def timm_families() -> list[FamilyModel]:
    """The timm families with attention and their variants, from the generated list.

    ``benchmarks/coverage.py --refresh`` writes the list from timm's own registry.

    Example:
        >>> families = timm_families()
        >>> "vision_transformer" in {f.family for f in families}
        True
    """
    text = resources.files(__package__).joinpath(FAMILIES_FILE).read_text()
    return [FamilyModel.from_dict(d) for d in json.loads(text)["families"]]
