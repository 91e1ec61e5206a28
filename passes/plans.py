"""Plans: read a converted model's structure off its module tree, rebuild it elsewhere.

A converted model describes itself: :func:`plan_of` reads a :class:`RewritePlan`
(which dictionaries exist, and which parts each projection is made of) off its
module tree, and :func:`rebuild` gives a freshly built original model the same
structure, with zero weights, ready for ``load_state_dict``. Each replacement
carries the name of its layout in ``module.layout``, so the plan needs no
analysis. The swap itself is :mod:`masasurgery.passes.rewrite`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from masasurgery.passes.layouts import LAYOUTS, Layout
from masasurgery.passes.rewrite import STORE_NAME, Rewrite, check_free, swap
from torch import nn

from masasurgery.errors import CheckpointError, LayoutError
from masasurgery.modules import AtomDictionary, DictionaryStore, SharedProjection

__all__ = [
    "DictionaryPlan",
    "PartPlan",
    "ProjectionPlan",
    "RewritePlan",
    "layout_of",
    "plan_of",
    "rebuild",
    "replaced_target",
    "skeleton",
    "swap_in",
]

# A layout whose install differs from this one wraps its shared projection.
_PLAIN_INSTALL = next(f.default for f in fields(Layout) if f.name == "install")


@dataclass(frozen=True)
class PartPlan:
    """One row block of a replaced projection, in row order.

    Attributes:
        name: The role of a shared part, or the name of a dense part.
        rows: Rows of the ``(out, in)`` weight the part holds.
        dictionary: Store key of the dictionary a shared part reads; None if dense.
        rank: Rank of a shared part's own low-rank residual (0: none).
    """

    name: str
    rows: int
    dictionary: str | None = None
    rank: int = 0


@dataclass(frozen=True)
class ProjectionPlan:
    """One replaced projection: where it is, its layout and its parts.

    Attributes:
        target: Qualified name of the projection in the model.
        layout: Name of its layout in :data:`LAYOUTS` (``"linear"``: ``(out, in)``).
        in_features: Columns of the ``(out, in)`` weight.
        bias: Whether the projection has a bias.
        parts: The row blocks, in order.
    """

    target: str
    layout: str
    in_features: int
    bias: bool
    parts: tuple[PartPlan, ...]

    @property
    def out_features(self) -> int:
        return sum(part.rows for part in self.parts)


@dataclass(frozen=True)
class DictionaryPlan:
    """One dictionary of the store.

    Attributes:
        key: Its key in the store (``group0_q``).
        role: The role it serves.
        atoms: Number of atoms (``S``).
        out_features: Rows of each atom.
        in_features: Columns of each atom.
    """

    key: str
    role: str
    atoms: int
    out_features: int
    in_features: int


@dataclass(frozen=True)
class RewritePlan:
    """The structure a conversion gives a model, without its weights.

    Attributes:
        dictionaries: The dictionaries of the store, in store order.
        projections: The replaced projections, in module order.
    """

    dictionaries: tuple[DictionaryPlan, ...]
    projections: tuple[ProjectionPlan, ...]


def layout_of(module: SharedProjection) -> str:
    """The layout a replacement stands in for: ``module.layout``.

    Replacements made by :func:`rewrite` or :func:`rebuild` carry it. A plain
    :class:`SharedProjection` built by hand is ``"linear"``.

    Raises:
        LayoutError: A subclass of SharedProjection that does not name its layout.
    """
    layout = getattr(module, "layout", None)
    if layout is None and type(module) is SharedProjection:
        return "linear"
    if layout is None:
        raise LayoutError(
            f"{type(module).__name__} does not say which layout it stands in for; "
            f"set its `layout` attribute to one of {sorted(LAYOUTS)}."
        )
    return layout


def replaced_target(model: nn.Module, name: str) -> str:
    """Qualified name of the module that the shared projection at ``name`` replaced.

    That is ``name`` itself, unless the projection's layout installs a wrapper in
    the original's place (the packed ``in_proj`` of a shared
    ``nn.MultiheadAttention``): then it is the wrapper, the projection's parent.
    """
    layout = LAYOUTS.get(layout_of(model.get_submodule(name)))
    parent_name, _, _ = name.rpartition(".")
    if layout is not None and layout.install is not _PLAIN_INSTALL:
        return parent_name
    return name


def plan_of(model: nn.Module) -> RewritePlan:
    """Read the structure of a converted model off its module tree.

    A model that was never converted has an empty plan.

    Args:
        model: A model converted by :func:`rewrite` (or rebuilt by :func:`rebuild`).

    Returns:
        Its dictionaries and replaced projections, enough to rebuild it.

    Raises:
        CheckpointError: A replacement reads a dictionary that ``model.masa`` does
            not register, or the model holds replacements but no store.
        LayoutError: A replacement does not say which layout it stands in for.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> _ = masasurgery.convert(m, atoms=1, verify=False)
        >>> plan = plan_of(m)
        >>> [d.key for d in plan.dictionaries]
        ['group0_q', 'group0_k', 'group0_v', 'group0_o']
        >>> [(p.name, p.rows, p.dictionary) for p in plan.projections[0].parts]
        [('q', 192, 'group0_q'), ('k', 192, 'group0_k'), ('v', 192, 'group0_v')]
    """
    # The store, then every replacement in module order
    store = getattr(model, STORE_NAME, None)
    replaced = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, SharedProjection)
    ]
    if store is None and not replaced:
        return RewritePlan(dictionaries=(), projections=())
    if not isinstance(store, DictionaryStore):
        raise CheckpointError(
            f"{type(model).__name__} holds {len(replaced)} SharedProjection modules "
            f"but no DictionaryStore at model.{STORE_NAME} (got "
            f"{type(store).__name__}); convert it with masasurgery.convert."
        )

    # One entry per projection, under the name of the module it replaced
    keys = {id(d): key for key, d in store.items()}
    dictionaries = tuple(
        DictionaryPlan(key, d.role, d.num_atoms, d.out_features, d.in_features)
        for key, d in store.items()
    )
    projections = tuple(
        _projection_plan(replaced_target(model, name), m, keys) for name, m in replaced
    )
    return RewritePlan(dictionaries=dictionaries, projections=projections)


def skeleton(model: nn.Module, plan: RewritePlan) -> Rewrite:
    """Build the store and replacements of ``plan`` for ``model``; swap nothing.

    Atoms, coefficients and dense rows are zeros (biases are copies of the
    originals'), in the dtype and on the device of the weights they replace, so a
    model on the meta device gets a meta skeleton. ``originals`` names the modules
    the replacements will take the place of, outer modules before the modules
    inside them (the order the swap must follow).

    Raises:
        AlreadyConvertedError: The model is already converted.
        CheckpointError: The plan does not fit the model (a missing module, a
            shape, a bias, a layout); nothing was changed.
    """
    # Check every target before building anything; outer targets first
    check_free(model)
    _check_plan(plan)
    projections = sorted(plan.projections, key=lambda p: p.target.count("."))
    originals = {p.target: _plan_target(model, p) for p in projections}

    # Zero atoms, typed like the first weight that reads them
    readers: dict[str, torch.Tensor] = {}
    for p in projections:
        for part in p.parts:
            if part.dictionary is not None:
                weight = _weight(originals[p.target], p)
                readers.setdefault(part.dictionary, weight)
    store = DictionaryStore(
        {
            d.key: _empty_dictionary(d, readers.get(d.key), model)
            for d in plan.dictionaries
        }
    )

    # Replacements, and atoms that train when the weights they replace did
    replacements = {
        p.target: _empty_projection(p, originals[p.target], store) for p in projections
    }
    trainable = any(
        t.requires_grad for m in replacements.values() for t in m.parameters()
    )
    store.requires_grad_(trainable)
    return Rewrite(store=store, originals=originals, replacements=replacements)


def swap_in(model: nn.Module, done: Rewrite) -> None:
    """Put a :func:`skeleton` into ``model``; all or nothing."""
    swap(model, done.store, done.replacements)


def rebuild(model: nn.Module, plan: RewritePlan) -> Rewrite:
    """Give a freshly built original model the structure of a converted one.

    The rebuilt model has the converted model's ``state_dict()`` keys, shapes and
    dtypes, with zero atoms and coefficients, so ``load_state_dict`` (or
    ``masasurgery.load``) fills it. No analysis runs: the plan says everything.

    Args:
        model: The original model, as built by its own code (any device, meta too).
        plan: The structure, from :func:`plan_of` or a saved checkpoint.

    Returns:
        The store, the modules replaced and their replacements; ``restore`` undoes.

    Raises:
        AlreadyConvertedError: The model is already converted.
        CheckpointError: The plan does not fit the model; nothing was changed.

    Example:
        >>> import timm, masasurgery
        >>> make = lambda: timm.create_model("vit_tiny_patch16_224", depth=2)
        >>> converted, fresh = make(), make()
        >>> _ = masasurgery.convert(converted, atoms=1, verify=False)
        >>> type(fresh.blocks[0].attn.qkv).__name__
        'Linear'
        >>> _ = rebuild(fresh, plan_of(converted))
        >>> fresh.load_state_dict(converted.state_dict())
        <All keys matched successfully>
        >>> type(fresh.blocks[0].attn.qkv).__name__
        'SharedProjection'
    """
    done = skeleton(model, plan)
    swap_in(model, done)
    return done


def _projection_plan(
    target: str, module: SharedProjection, keys: dict[int, str]
) -> ProjectionPlan:
    parts = []
    for name in module.parts:
        if name in module.dense:
            parts.append(PartPlan(name, module.dense[name].shape[0]))
            continue
        dictionary = module.dictionaries[name]
        if id(dictionary) not in keys:
            raise CheckpointError(
                f"{target} part {name!r} reads a dictionary that model.{STORE_NAME} "
                f"does not register (registered: {sorted(keys.values())}); every "
                "dictionary must live in the store."
            )
        parts.append(
            PartPlan(
                name,
                dictionary.out_features,
                keys[id(dictionary)],
                module.residual_rank(name),
            )
        )
    return ProjectionPlan(
        target=target,
        layout=layout_of(module),
        in_features=module.in_features,
        bias=module.bias is not None,
        parts=tuple(parts),
    )


def _check_plan(plan: RewritePlan) -> None:
    """Every shared part reads a dictionary of the plan, of its shape."""
    dictionaries = {d.key: d for d in plan.dictionaries}
    for p in plan.projections:
        for part in p.parts:
            if part.dictionary is None:
                continue
            d = dictionaries.get(part.dictionary)
            if d is None:
                raise CheckpointError(
                    f"the plan's {p.target} part {part.name!r} reads dictionary "
                    f"{part.dictionary!r}, which the plan does not list (it lists "
                    f"{sorted(dictionaries)})."
                )
            if (part.rows, p.in_features) != (d.out_features, d.in_features):
                raise CheckpointError(
                    f"the plan's {p.target} part {part.name!r} is "
                    f"{part.rows}x{p.in_features}, but its dictionary "
                    f"{d.key!r} holds {d.out_features}x{d.in_features} atoms."
                )


def _plan_target(model: nn.Module, p: ProjectionPlan) -> nn.Module:
    """The module ``p`` replaces, checked against the plan."""
    # The module exists and its layout is known
    try:
        module = model.get_submodule(p.target)
    except AttributeError as e:
        raise CheckpointError(
            f"the plan replaces {p.target!r}, but {type(model).__name__} has no "
            "such module; build the model with the architecture and options it "
            "was saved from."
        ) from e
    if p.layout not in LAYOUTS:
        raise CheckpointError(
            f"the plan gives {p.target!r} layout {p.layout!r}, which this version "
            f"of masasurgery does not know (known: {sorted(LAYOUTS)})."
        )

    # Its weight has the plan's shape
    try:
        shape = tuple(_weight(module, p).shape)
    except AttributeError as e:
        raise CheckpointError(
            f"the plan reads {p.target!r} as a {p.layout!r} projection, but it is "
            f"a {type(module).__name__} without such a weight."
        ) from e
    if shape != (p.out_features, p.in_features):
        raise CheckpointError(
            f"'{p.target}.weight' is {p.out_features}x{p.in_features} (out x in) "
            f"in the plan, {shape[0]}x{shape[1]} in the model."
        )
    return module


def _weight(module: nn.Module, p: ProjectionPlan) -> torch.Tensor:
    return LAYOUTS[p.layout].weight(module)


def _empty_dictionary(
    d: DictionaryPlan, like: torch.Tensor | None, model: nn.Module
) -> AtomDictionary:
    # Typed like a weight that reads it, else like the model's first parameter
    if like is None:
        like = next((t for t in model.parameters() if t.is_floating_point()), None)
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    atoms = torch.zeros(
        d.atoms, d.out_features, d.in_features, dtype=dtype, device=device
    )
    return AtomDictionary(atoms, d.role)


def _empty_projection(
    p: ProjectionPlan, module: nn.Module, store: DictionaryStore
) -> nn.Module:
    # The layout's own replacement, checked against the plan
    layout, weight = LAYOUTS[p.layout], _weight(module, p)
    new = layout.replacement(module)
    new.layout = p.layout
    if (new.bias is not None) != p.bias:
        where = ("the plan", "the model") if p.bias else ("the model", "the plan")
        raise CheckpointError(
            f"'{p.target}.bias' is in {where[0]} but not in {where[1]}."
        )

    # Its parts, zero, typed and trainable like the weight they replace
    zeros = {"dtype": weight.dtype, "device": weight.device}
    for part in p.parts:
        if part.dictionary is None:
            new.add_dense(part.name, torch.zeros(part.rows, p.in_features, **zeros))
            new.dense[part.name].requires_grad_(weight.requires_grad)
            continue
        dictionary = store[part.dictionary]
        coefficients = torch.zeros(dictionary.num_atoms, **zeros)
        residual = None
        if part.rank:
            residual = (
                torch.zeros(part.rows, part.rank, **zeros),
                torch.zeros(part.rank, p.in_features, **zeros),
            )
        new.add_shared(part.name, dictionary, coefficients, residual)
        new.coefficients[part.name].requires_grad_(weight.requires_grad)
        if part.rank:
            new.residual_up[part.name].requires_grad_(weight.requires_grad)
            new.residual_down[part.name].requires_grad_(weight.requires_grad)
    return layout.install(module, new)
