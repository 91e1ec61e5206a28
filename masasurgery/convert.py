"""Convert: find, fit and rewrite, on the user's own model object."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from masasurgery._checks import check_module
from masasurgery._state import preserved
from masasurgery.analyze import Analysis, analyze, mha_fastpath_off
from masasurgery.config import ROLES, MasaConfig
from masasurgery.errors import (
    ConfigError,
    ConversionMismatchError,
    ModelRunError,
    NoAttentionError,
    VerificationError,
    sentence,
)
from masasurgery.fit import MatrixPCA, matrix_pca
from masasurgery.inputs import resolve_inputs
from masasurgery.passes.capture import Inputs
from masasurgery.passes.group import Group
from masasurgery.passes.layouts import read_rows
from masasurgery.passes.rewrite import Rewrite, check_free, restore, rewrite
from masasurgery.report import format_count, format_table

if TYPE_CHECKING:
    from masasurgery.compress import Compression
    from masasurgery.verify import VerificationReport

__all__ = ["Conversion", "ParameterCount", "RoleFit", "convert"]

logger = logging.getLogger(__name__)


@dataclass
class RoleFit:
    """The dictionary of one role of one group, in figures.

    Attributes:
        group: Index of the group.
        role: ``"q"``, ``"k"``, ``"v"`` or ``"o"``.
        blocks: Number of blocks sharing the dictionary (``L``).
        shape: ``(rows, in_features)`` of each block's weight.
        atoms: Atoms fitted (``S``).
        requested_atoms: Atoms asked for; more than ``L`` is capped to ``L``.
        energy_kept: Share of the stacked weights' energy the atoms reproduce.
        layer_errors: Relative Frobenius error of each block's weight.
        residual_rank: Rank of each block's own low-rank residual (0: none; the
            largest, when the blocks' ranks differ).
        residual_ranks: Each block's residual rank, when they differ.
    """

    group: int
    role: str
    blocks: int
    shape: tuple[int, int]
    atoms: int
    requested_atoms: int
    energy_kept: float
    layer_errors: list[float]
    residual_rank: int = 0
    residual_ranks: tuple[int, ...] | None = None

    @property
    def capped(self) -> bool:
        return self.requested_atoms > self.atoms


@dataclass
class ParameterCount:
    """Parameters before and after a conversion.

    Attributes:
        shared_weights_before: Weights of the shared roles, before.
        shared_weights_after: Their atoms and coefficients, after.
        attention_before: All parameters of the replaced projections (with biases
            and any rows left dense), before.
        attention_after: The same projections after, atoms included.
        model_before: Unique parameters of the whole model, before.
        model_after: Unique parameters of the whole model, after.
    """

    shared_weights_before: int
    shared_weights_after: int
    attention_before: int
    attention_after: int
    model_before: int
    model_after: int

    @property
    def shared_weights_reduction(self) -> float:
        return 1.0 - self.shared_weights_after / max(self.shared_weights_before, 1)

    @property
    def attention_reduction(self) -> float:
        return 1.0 - self.attention_after / max(self.attention_before, 1)

    @property
    def model_reduction(self) -> float:
        return 1.0 - self.model_after / max(self.model_before, 1)


@dataclass
class Conversion:
    """What :func:`convert` changed, in records and figures.

    It also keeps the replaced modules (``rewrite.originals``), so the conversion
    can be verified and undone; drop the record to free them.

    Attributes:
        config: The options used.
        analysis: Where the attention is and how blocks were grouped.
        roles: The figures of each fitted dictionary.
        params: Parameter counts before and after.
        fits: The raw fits, by ``(group, role)``.
        rewrite: The store, the original modules and their replacements.
        verification: The verifier's report, when ``convert`` verified.
        compression: What :func:`masasurgery.compress` chose (groups, atoms and
            ranks under the budget); None for :func:`convert`.
    """

    config: MasaConfig
    analysis: Analysis
    roles: list[RoleFit]
    params: ParameterCount
    fits: dict[tuple[int, str], MatrixPCA] = field(repr=False)
    rewrite: Rewrite = field(repr=False)
    verification: VerificationReport | None = None
    compression: Compression | None = None

    @property
    def capped(self) -> list[RoleFit]:
        """The dictionaries that got fewer atoms than asked for."""
        return [r for r in self.roles if r.capped]

    @property
    def lossless(self) -> bool:
        """True when every dictionary has as many atoms as blocks."""
        return all(fit.num_atoms == fit.num_layers for fit in self.fits.values())

    def undo(self, model: nn.Module) -> None:
        """Put the original projections back and remove the dictionaries.

        Raises:
            ConfigError: ``model`` is not a ``torch.nn.Module``.
            ConversionMismatchError: The record belongs to another model (or was
                undone already), or the originals were released
                (``keep_originals=False``); the model is left as it is.
        """
        from masasurgery.verify import _check_belongs

        check_module(model)
        _check_belongs(model, self)
        if self.rewrite.originals_released:
            raise ConversionMismatchError(
                "this conversion released its original projections "
                "(keep_originals=False), so it cannot be undone or verified again; "
                "reload the original model instead."
            )
        restore(model, self.rewrite)

    def foreign_target(self, model: nn.Module) -> str | None:
        """The first replaced projection whose replacement is not in ``model``.

        None when the record describes ``model``: every module it put in is
        still there, at the same name.
        """
        for target, module in self.rewrite.replacements.items():
            if submodule_or_none(model, target) is not module:
                return target
        return None

    def release_originals(self) -> None:
        """Drop the replaced projections, freeing their memory; no undo after."""
        self.rewrite.originals.clear()
        self.rewrite.originals_released = True

    def __str__(self) -> str:
        p = self.params
        lines = [
            f"Converted {self.analysis.model}: "
            + (
                f"atoms={self.config.atoms}, "
                if self.compression is None
                else f"{self.compression.target} (atoms and ranks per dictionary "
                "below), "
            )
            + f"roles={','.join(self.config.roles)}, "
            f"{len(self.analysis.groups)} groups, "
            f"{len(self.rewrite.replacements)} projections replaced",
            "",
            format_table(
                [
                    "group",
                    "role",
                    "blocks",
                    "shape",
                    "atoms",
                    "energy kept",
                    "worst layer error",
                ],
                [_role_row(r) for r in self.roles],
            ),
            "",
            _count_line(
                "shared weights", p.shared_weights_before, p.shared_weights_after
            ),
            _count_line("attention params", p.attention_before, p.attention_after),
            _count_line("model params", p.model_before, p.model_after),
        ]
        for r in self.capped:
            lines.append(
                f"note: group {r.group} role {r.role} has {r.blocks} blocks, so atoms "
                f"{r.requested_atoms} was capped to {r.atoms} (lossless there)"
            )
        if self.compression is not None:
            lines += ["", str(self.compression)]
        if self.verification is not None:
            lines += ["", str(self.verification)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        p = self.params
        return {
            "config": self.config.to_dict(),
            "analysis": self.analysis.to_dict(),
            "roles": [vars(r) | {"shape": list(r.shape)} for r in self.roles],
            "params": vars(p)
            | {
                "shared_weights_reduction": p.shared_weights_reduction,
                "attention_reduction": p.attention_reduction,
                "model_reduction": p.model_reduction,
            },
            "replaced": sorted(self.rewrite.replacements),
            "verification": None
            if self.verification is None
            else self.verification.to_dict(),
            "compression": None
            if self.compression is None
            else self.compression.to_dict(),
        }


def convert(
    model: nn.Module,
    atoms: int,
    *,
    example_inputs: Any | None = None,
    roles: Sequence[str] = ROLES,
    verify: bool = True,
    device: torch.device | str | None = None,
    keep_originals: bool = True,
) -> Conversion:
    """Share the attention projections of ``model`` as MASA atom dictionaries.

    Each group of repeated blocks gets one dictionary of ``atoms`` matrices per
    role; each block keeps ``atoms`` coefficients per role and its own biases. The
    atoms start as the top Matrix-PCA directions of the stacked weights. The model
    object is edited in place and keeps its class, methods and config.

    The fit runs in float64 whatever the model's dtype; the atoms and coefficients
    are stored in the dtype of the weights they replace (a bfloat16 model stays
    bfloat16, and is verified with the bfloat16 tolerance).

    Args:
        model: The model to convert, in place.
        atoms: Atoms per dictionary. ``atoms`` equal to a group's block count is
            lossless; a third of it removes two thirds of the shared weights.
        example_inputs: Inputs for one forward (a tensor, a tuple of positional
            arguments, or a dict of keyword arguments). Optional for timm models.
        roles: The roles to share; the others stay dense.
        verify: Check the rewrite on ``example_inputs`` before returning; if the
            rewrite is not exact (or a lossless conversion is not equal to the
            original) the model is restored and VerificationError raised.
        device: Where to verify; CUDA when available, else CPU.
        keep_originals: Keep the replaced projections in the returned record, so
            the conversion can be verified again and undone. False frees them
            once ``convert`` has verified (the attention weights' memory).

    Returns:
        What changed: groups, roles, shapes, parameter counts, the verification.

    Raises:
        AlreadyConvertedError: The model is already converted.
        ConfigError: ``atoms`` or ``roles`` is invalid, or the model's weights are
            on the meta device.
        NoAttentionError: No group of two or more attention blocks was found.
        VerificationError: The rewrite failed verification; the model is unchanged.

    Example:
        >>> import timm, masasurgery
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=6)
        >>> conversion = masasurgery.convert(m, atoms=2)
        >>> f"{conversion.params.shared_weights_reduction:.1%}"
        '66.7%'
        >>> type(m).__name__, conversion.verification.rewrite_exact
        ('VisionTransformer', True)
    """
    # Steps: options, analysis, fit, rewrite, verify
    config = MasaConfig(atoms=atoms, roles=tuple(roles))
    _check_model(model)
    inputs = resolve_inputs(model, example_inputs)
    analysis = analyze(model, inputs)
    _check_convertible(analysis, config)
    _check_runs(model, analysis, inputs)
    fits = _fit_groups(model, analysis.groups, config)
    conversion = apply_fits(model, analysis, fits, config)
    _warn_capped(conversion)
    finish(model, conversion, inputs, verify, device, keep_originals)
    return conversion


def apply_fits(
    model: nn.Module,
    analysis: Analysis,
    fits: dict[tuple[int, str], MatrixPCA],
    config: MasaConfig,
) -> Conversion:
    """Rewrite ``model`` with ``fits`` for ``analysis.groups``, and count."""
    model_before = _count_unique(model)
    done = rewrite(model, analysis.groups, fits)
    return Conversion(
        config=config,
        analysis=analysis,
        roles=_role_fits(analysis.groups, fits),
        params=_count(model, done, fits, model_before),
        fits=fits,
        rewrite=done,
    )


def finish(
    model: nn.Module,
    conversion: Conversion,
    inputs: Any,
    verify: bool,
    device: torch.device | str | None,
    keep_originals: bool,
) -> None:
    """Verify (undoing on failure) and release the originals, as asked."""
    if verify:
        _verify_or_undo(model, conversion, inputs, device)
    if not keep_originals:
        conversion.release_originals()


def _check_model(model: nn.Module) -> None:
    """Refuse a non-model, a converted model, or one without weights, before
    anything runs."""
    check_module(model)
    check_free(model)
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    on_meta = [name for name, t in tensors if t.is_meta]
    if on_meta:
        raise ConfigError(
            f"{type(model).__name__} has {len(on_meta)} tensors on the meta device "
            f"(first: {on_meta[0]!r}); convert fits atoms to real weights, so "
            "load them first (model.to_empty(device=...) then load_state_dict). "
            "To restore a saved conversion onto a meta-device model, use "
            "masasurgery.load(model, path). Nothing was changed."
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = sorted(str(d) for d in dtypes & {torch.float16, torch.bfloat16})
    if low:
        logger.info(
            "%s has %s weights: atoms are fitted in float64 and stored in the "
            "dtype of the weights they replace",
            type(model).__name__,
            ", ".join(low),
        )


def _check_convertible(analysis: Analysis, config: MasaConfig) -> None:
    shared = [r for g in analysis.groups for r in g.roles if r in config.roles]
    if shared:
        return
    found = (
        f"{len(analysis.sites)} attention blocks "
        f"({len(analysis.singletons)} that repeat nowhere, "
        f"{len(analysis.skipped)} cores skipped)"
    )
    raise NoAttentionError(
        f"{analysis.model} has no group of two or more repeated attention blocks "
        f"with roles {list(config.roles)} to share; found {found}. masasurgery needs "
        "at least two blocks of the same shape. Nothing was changed.\n" + str(analysis)
    )


def _check_runs(model: nn.Module, analysis: Analysis, inputs: Inputs) -> None:
    """Run the original once when no capture path could: a model that fails on
    the example inputs is reported now, before the rewrite, not while verifying."""
    if analysis.capture_path != "structure":
        return
    with preserved(model), mha_fastpath_off(), torch.no_grad():
        model.eval()
        try:
            inputs.call(model)
        except Exception as e:
            raise ModelRunError(
                f"{type(model).__name__} fails on the example inputs as it is, "
                f"before any rewriting: {type(e).__name__}: {sentence(e)} Check "
                "that example_inputs match model.forward (shapes, dtypes, token "
                "ids within the vocabulary). Nothing was changed."
            ) from e


def _fit_groups(
    model: nn.Module, groups: list[Group], config: MasaConfig
) -> dict[tuple[int, str], MatrixPCA]:
    fits = {}
    for group in groups:
        for role in group.roles:
            if role not in config.roles:
                continue
            weights = role_weights(model, group, role)
            with torch.no_grad():
                fits[group.index, role] = matrix_pca(weights, config.atoms)
            logger.debug(
                "group %d role %s: %d blocks, %d atoms, energy kept %.4f",
                group.index,
                role,
                len(weights),
                fits[group.index, role].num_atoms,
                fits[group.index, role].energy_kept,
            )
    return fits


def submodule_or_none(model: nn.Module, target: str) -> nn.Module | None:
    """``model.get_submodule(target)``, or None when there is no such module."""
    try:
        return model.get_submodule(target)
    except AttributeError:
        return None


def role_weights(model: nn.Module, group: Group, role: str) -> list[torch.Tensor]:
    """The ``(rows, in)`` weight of ``role`` in each block of ``group``, as views."""
    weights = []
    for site in group.sites:
        projection = site.projection_of(role)
        module = model.get_submodule(projection.target)
        start, stop = projection.roles[role]
        weights.append(read_rows(module, projection.layout, start, stop))
    return weights


def _role_fits(
    groups: list[Group], fits: dict[tuple[int, str], MatrixPCA]
) -> list[RoleFit]:
    return [
        RoleFit(
            group=g,
            role=role,
            blocks=fit.num_layers,
            shape=groups[g].role_shape(role),
            atoms=fit.num_atoms,
            requested_atoms=fit.requested_atoms,
            energy_kept=fit.energy_kept,
            layer_errors=fit.layer_errors.tolist(),
            residual_rank=fit.residual_rank,
            residual_ranks=fit.residual_ranks,
        )
        for (g, role), fit in fits.items()
    ]


def _count(
    model: nn.Module,
    done: Rewrite,
    fits: dict[tuple[int, str], MatrixPCA],
    model_before: int,
) -> ParameterCount:
    shared_before = sum(
        f.num_layers * f.atoms.shape[1] * f.atoms.shape[2] for f in fits.values()
    )
    shared_after = sum(f.num_parameters for f in fits.values())
    attention_before = _count_modules(done.originals.values())
    attention_after = _count_modules([done.store, *done.replacements.values()])
    return ParameterCount(
        shared_weights_before=shared_before,
        shared_weights_after=shared_after,
        attention_before=attention_before,
        attention_after=attention_after,
        model_before=model_before,
        model_after=_count_unique(model),
    )


def _count_modules(modules: Iterable[nn.Module]) -> int:
    # A replaced module may hold another replaced one (MHA and its out_proj)
    unique = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


def _count_unique(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _warn_capped(conversion: Conversion) -> None:
    for r in conversion.capped:
        logger.info(
            "group %d role %s: atoms %d capped to its %d blocks",
            r.group,
            r.role,
            r.requested_atoms,
            r.atoms,
        )


def _verify_or_undo(
    model: nn.Module,
    conversion: Conversion,
    inputs: Any,
    device: torch.device | str | None,
) -> None:
    from masasurgery.verify import verify

    try:
        report = verify(model, conversion, inputs, device=device)
    except BaseException:
        conversion.undo(model)
        raise
    conversion.verification = report
    if report.passed:
        return
    conversion.undo(model)
    raise VerificationError(
        "the converted model failed verification, so the conversion was undone "
        "and the model is as it was:\n" + "\n".join(report.failures)
    )


def _role_row(r: RoleFit) -> list[object]:
    atoms = f"{r.atoms}" if not r.capped else f"{r.atoms} (of {r.requested_atoms})"
    if r.residual_rank:
        atoms += f" + rank {_rank_range(r)}"
    worst = max(r.layer_errors) if r.layer_errors else 0.0
    # No atoms keep no energy; the residual's share is in the layer errors
    energy = f"{r.energy_kept:.2%}" if r.atoms else "-"
    shape = f"{r.shape[0]}x{r.shape[1]}"
    return [
        r.group,
        r.role,
        r.blocks,
        shape,
        atoms,
        energy,
        f"{worst:.3f}",
    ]


def _rank_range(r: RoleFit) -> str:
    ranks = r.residual_ranks
    if ranks is None or len(set(ranks)) == 1:
        return str(r.residual_rank)
    return f"{min(ranks)}..{max(ranks)}"


def _count_line(label: str, before: int, after: int) -> str:
    change = 1.0 - after / max(before, 1)
    verdict = f"{change:.1%} removed" if change >= 0 else f"{-change:.1%} added"
    return (
        f"{label:17s} {format_count(before):>12s} -> {format_count(after):>12s} "
        f"({verdict})"
    )
