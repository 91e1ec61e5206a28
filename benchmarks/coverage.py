"""Coverage: which timm families (and a few torchvision / transformers models) convert.

Two commands::

    python benchmarks/coverage.py --refresh   # pick one variant per timm family
    python benchmarks/coverage.py             # convert each one, write docs/

``--refresh`` reads the families from timm's own registry (its model modules),
leaves out deprecated names, ranks each family's variants by the size words in
their names, builds candidates on the meta device in that order until three have
attention (the rule of ``masasurgery.zoo.catalog.is_attention_module``), keeps the
one with the fewest parameters, then makes it small: ``depth=3`` for a variant
over 30M parameters that takes an int depth, and the smallest ``img_size`` (or
input size) it runs at.
The list goes to ``masasurgery/zoo/timm_families.json``.

Without ``--refresh`` every listed model is converted with
``masasurgery.convert(model, atoms=10**6)`` (each group lossless at atoms = its
block count) and verified on the CPU. The table, the supported share and the
reason for each unsupported family are printed and written to docs/coverage.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from masasurgery.passes import AttentionSite
from torch import nn

import masasurgery
from masasurgery.report import format_table
from masasurgery.zoo import catalog
from masasurgery.zoo.catalog import UNSUPPORTED, FamilyModel
from masasurgery.zoo.extra_models import EXTRA_MODELS

ROOT = Path(__file__).resolve().parents[1]
FAMILIES_JSON = ROOT / "masasurgery" / "zoo" / catalog.FAMILIES_FILE
DOCS = ROOT / "docs" / "coverage.md"

# Refresh: candidates built per family at most, and how many variants with
# attention are compared by parameter count.
MAX_CANDIDATES = 16
COMPARE_FIRST = 3
# Image sizes tried, smallest first, before the family's default.
IMG_SIZES = (64, 96, 128, 160)
# Variants over BIG parameters are built with SMALL_DEPTH blocks where they can.
BIG = 30_000_000
SMALL_DEPTH = 3


# ---------------------------------------------------------------------------
# Refresh: the family list, from timm's registry


def refresh(only: set[str] | None = None) -> list[FamilyModel]:
    """One small variant with attention per timm family, written to the JSON."""
    from timm.models import _registry

    chosen = []
    for family, names in sorted(_registry._module_to_models.items()):
        if only and family not in only:
            continue
        started = time.perf_counter()
        current = sorted(set(names) - set(_registry._deprecated_models))
        picked = _pick_variant(family, current)
        seconds = time.perf_counter() - started
        if picked is None:
            print(f"{family:28s} no attention ({seconds:.1f}s)")
            continue
        chosen.append(picked)
        print(
            f"{family:28s} {picked.model:40s} {picked.params / 1e6:7.2f}M "
            f"{picked.kwargs} ({seconds:.1f}s)"
        )

    # Keep the families not refreshed this time
    if only and FAMILIES_JSON.exists():
        kept = [f for f in catalog.timm_families() if f.family not in only]
        chosen = sorted([*kept, *chosen], key=lambda f: f.family)
    _write_families(chosen)
    return chosen


def _pick_variant(family: str, names: list[str]) -> FamilyModel | None:
    # Build candidates on the meta device, smallest-looking first
    with_attention: list[tuple[int, str]] = []
    for name in catalog.rank_variants(names)[:MAX_CANDIDATES]:
        model = _build_meta(name)
        if model is not None and catalog.has_attention(model):
            with_attention.append((_count(model), name))
        if len(with_attention) == COMPARE_FIRST:
            break
    if not with_attention:
        return None

    # The fewest parameters, made smaller where the family allows it
    params, name = min(with_attention)
    kwargs, input_size = _small_settings(name, params)
    if kwargs:
        params = _count(_build_meta(name, **kwargs))
    return FamilyModel(family, name, params, kwargs, input_size)


def _build_meta(name: str, quiet: bool = False, **kwargs: Any) -> nn.Module | None:
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # a variant that cannot be built is not a candidate
        if not quiet:
            print(f"  {name}: cannot build ({type(e).__name__}: {_first_line(e)})")
        return None


def _small_settings(
    name: str, params: int
) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """Create kwargs and an input size that keep the variant small.

    A variant over :data:`BIG` parameters gets ``depth=SMALL_DEPTH`` when it
    takes an int depth and keeps attention. Then the smallest of :data:`IMG_SIZES`
    it runs at (and the ``min_input_size`` of its config), given as ``img_size``
    when the family takes one, else only as the input; else its default size.
    """
    # Fewer blocks for a large variant
    kwargs: dict[str, Any] = {}
    if params > BIG:
        shallow = _build_meta(name, quiet=True, depth=SMALL_DEPTH)
        if shallow is not None and catalog.has_attention(shallow):
            kwargs["depth"] = SMALL_DEPTH

    # The smallest input it runs at, with img_size where the family takes it
    cfg = _build_meta(name, **kwargs).pretrained_cfg
    smallest = cfg.get("min_input_size", (3, 0, 0))[-1]
    candidates = sorted({*IMG_SIZES, smallest} - {0})
    sized = _build_meta(name, True, **kwargs, img_size=candidates[0]) is not None
    tries = [{**kwargs, "img_size": s} for s in candidates] if sized else []
    tries += [dict(kwargs)] * len(candidates)
    sizes = [*candidates, *candidates] if sized else candidates
    built: dict[str, nn.Module | None] = {}
    for size, create in zip(sizes, tries, strict=True):
        if repr(create) not in built:
            built[repr(create)] = _build_cpu(name, **create)
        model = built[repr(create)]
        if model is not None and _runs(model, size):
            return create, (3, size, size)

    # The family's default size
    return kwargs, tuple(cfg.get("input_size", (3, 224, 224)))


def _build_cpu(name: str, **kwargs: Any) -> nn.Module | None:
    import timm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # the family does not take these kwargs
        return None
    return model.eval() if catalog.has_attention(model) else None


def _runs(model: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.randn(1, 3, size, size))
    except Exception:  # too small for its windows or strides
        return False
    return True


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _write_families(families: list[FamilyModel]) -> None:
    import timm

    data = {
        "generated_by": "benchmarks/coverage.py --refresh",
        "timm": timm.__version__,
        "rule": "masasurgery.zoo.catalog.is_attention_module",
        "families": [f.to_dict() for f in families],
    }
    FAMILIES_JSON.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(families)} families to {FAMILIES_JSON.relative_to(ROOT)}")


# ---------------------------------------------------------------------------
# Coverage: convert each model


@dataclass
class Case:
    """One model to convert: where it comes from and how to build it."""

    source: str  # "timm", "torchvision" or "transformers"
    family: str
    model: str
    build: Callable[[], tuple[nn.Module, Any]] = field(repr=False)


@dataclass
class Outcome:
    """What converting one model gave."""

    case: Case
    supported: bool
    reason: str = ""
    seconds: float = 0.0
    capture_path: str = ""
    groups: list[int] = field(default_factory=list)
    singletons: int = 0
    skipped: int = 0
    partial: int = 0
    note: str = ""
    documented: bool = True

    def row(self) -> list[object]:
        status = "yes" if self.supported else "no"
        if not self.documented:
            status += " (undocumented)"
        groups = " ".join(map(str, self.groups)) or "-"
        return [
            self.case.source,
            self.case.family,
            self.case.model,
            status,
            self.capture_path or "-",
            groups,
            self.skipped,
            self.partial,
            f"{self.seconds:.1f}",
            self.reason or self.note,
        ]


HEADERS = [
    "source", "family", "model", "converts", "capture", "group sizes",
    "skipped cores", "partial sites", "seconds", "reason or note",
]  # fmt: skip


def cases(only: set[str] | None = None, extra: bool = True) -> Iterator[Case]:
    """The timm families from the JSON, then the torchvision / transformers models."""
    for fm in catalog.timm_families():
        if not only or fm.family in only:
            yield Case("timm", fm.family, fm.model, _timm_builder(fm))
    if not extra:
        return
    for e in EXTRA_MODELS:
        if not only or e.name in only:
            yield Case(e.source, e.name, e.model, e.build)


def _timm_builder(fm: FamilyModel) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        return fm.create(), torch.randn(1, *fm.input_size)

    return build


def run_case(case: Case) -> Outcome:
    """Convert one model at atoms = 10**6 (lossless per group) and verify it."""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, inputs = case.build()
            conversion = masasurgery.convert(model, atoms=10**6, example_inputs=inputs)
    except Exception as e:  # every failure is a row of the table
        seconds = time.perf_counter() - started
        reason = f"{type(e).__name__}: {_reason(e)}"
        return Outcome(case, False, reason, seconds, documented=_documented(case))
    seconds = time.perf_counter() - started

    analysis = conversion.analysis
    passed = conversion.verification.passed and conversion.lossless
    partial = [s for s in analysis.sites if not {"q", "k", "v"} <= set(s.roles)]
    return Outcome(
        case,
        supported=passed,
        reason="" if passed else "verification failed",
        seconds=seconds,
        capture_path=analysis.capture_path,
        groups=[g.num_blocks for g in analysis.groups],
        singletons=len(analysis.singletons),
        skipped=len(analysis.skipped),
        partial=len(partial),
        note=_note(analysis, partial),
        documented=passed != _documented(case),
    )


def _note(analysis: masasurgery.Analysis, partial: list[AttentionSite]) -> str:
    # What a supported model leaves out: skipped cores, roles without projection
    notes = []
    if analysis.skipped:
        notes.append(f"skipped, e.g.: {analysis.skipped[0].reason}")
    if partial:
        missing = sorted({r for s in partial for r in "qkv" if r not in s.roles})
        notes.append(f"{', '.join(missing)} left out of {len(partial)} sites")
    return "; ".join(notes)


def _reason(error: Exception) -> str:
    """A one-line reason: the first line, or what the analysis found and skipped."""
    lines = str(error).strip().splitlines() or [""]
    counts = re.search(
        r"found (\d+) attention blocks \((\d+) that repeat nowhere, (\d+) cores "
        r"skipped\)",
        lines[0],
    )
    if counts is None:
        return re.sub(r"\s+", " ", lines[0])
    sites, alone, skipped = counts.groups()
    reason = f"{sites} blocks found, {alone} repeat nowhere, {skipped} cores skipped"
    why = [line.split(": ", 1)[1] for line in lines if line.startswith("skipped core")]
    return f"{reason} (first: {why[0]})" if why else reason


def _documented(case: Case) -> bool:
    return case.family in UNSUPPORTED


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------
# Report


def write_docs(outcomes: list[Outcome], seconds: float) -> None:
    """docs/coverage.md: the share, the table and the documented reasons."""
    timm_rows = [o for o in outcomes if o.case.source == "timm"]
    supported = sum(o.supported for o in timm_rows)
    lines = [
        "# Coverage: which models convert",
        "",
        "Generated by `python benchmarks/coverage.py` (do not edit by hand); the "
        "same list is checked by `tests/test_coverage.py`.",
        "",
        _share_line(outcomes),
        "",
        "Each model is built with random weights (`pretrained=False`), in eval "
        "mode, batch 1, and converted with `masasurgery.convert(model, "
        "atoms=10**6)`: every group gets as many atoms as it has blocks, so the "
        "conversion is lossless and must verify within the fp32 tolerance. "
        "'Converts' means it did, and verified.",
        "",
        "## How the timm families are chosen",
        "",
        "A family is one of timm's model modules (`timm.models._registry."
        "_module_to_models`, deprecated names left out). Its variants are ranked by "
        "the size words in their names (atto, femto, pico, nano, ..., tiny, small, "
        "base), built on the meta device in that order until three have attention, "
        "and the one with the fewest parameters is kept. It is made small where the "
        f"family allows: `depth={SMALL_DEPTH}` for a variant over "
        f"{BIG // 1_000_000}M parameters that takes an int depth, and the smallest "
        "image size it runs at (64, 96, 128, 160 or the `min_input_size` of its "
        "config; as `img_size` where the family takes one), else its default input "
        "size. The list is `masasurgery/zoo/timm_families.json` (`--refresh` "
        "writes it).",
        "",
        "A model has attention when one of its modules is an "
        "`nn.MultiheadAttention`, or has `Attention`, `Attn`, `MHSA`, `MultiHead` "
        "or `SelfAttn` in its class name, or is kept under the name `attn`, "
        "`attention`, `mha` or `self_attn`, or owns projections named `qkv`, "
        "`to_qkv`, `q` and `k`, `q` and `kv`, or `query` and `key`; timm's channel "
        "gates (squeeze-excite, ECA, CBAM, gather-excite, global context, "
        "coordinate attention, selective kernel, split attention) and "
        "`nn.Identity` placeholders do not "
        "count (`masasurgery.zoo.catalog.is_attention_module`). "
        f"{len(timm_rows)} of timm {_timm_version()}'s "
        f"{_timm_family_count()} families pass.",
        "",
        "## Results",
        "",
        _markdown_table(HEADERS, [o.row() for o in outcomes]),
        "",
        "## Unsupported families, and why",
        "",
        _markdown_table(
            ["family", "reason"],
            [[family, u.reason] for family, u in sorted(UNSUPPORTED.items())],
        ),
        "",
        f"Supported timm families: {supported} of {len(timm_rows)}. "
        f"Run time: {seconds / 60:.1f} min on {platform.machine()} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
    ]
    DOCS.write_text("\n".join(lines))
    print(f"wrote {DOCS.relative_to(ROOT)}")


def _share_line(outcomes: list[Outcome]) -> str:
    parts = []
    for source in ("timm", "torchvision", "transformers"):
        rows = [o for o in outcomes if o.case.source == source]
        if rows:
            ok = sum(o.supported for o in rows)
            parts.append(f"{source} {ok} of {len(rows)} ({ok / len(rows):.0%})")
    return "Supported: " + ", ".join(parts) + "."


def _markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _timm_version() -> str:
    import timm

    return timm.__version__


def _timm_family_count() -> int:
    from timm.models import _registry

    return len(_registry._module_to_models)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="rewrite the JSON")
    parser.add_argument("--only", default="", help="comma-separated families")
    parser.add_argument("--no-extra", action="store_true", help="timm only")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or None
    logging.getLogger("transformers").setLevel(logging.ERROR)

    if args.refresh:
        refresh(only)
        return 0

    started = time.perf_counter()
    outcomes = []
    for case in cases(only, extra=not args.no_extra):
        outcome = run_case(case)
        outcomes.append(outcome)
        print(format_table(HEADERS, [outcome.row()]).splitlines()[-1], flush=True)
    seconds = time.perf_counter() - started

    print()
    print(format_table(HEADERS, [o.row() for o in outcomes]))
    print()
    print(_share_line(outcomes), f"({seconds / 60:.1f} min)")
    if not args.no_docs and only is None:
        write_docs(outcomes, seconds)
    undocumented = [o.case.family for o in outcomes if not o.documented]
    if undocumented:
        print("not as documented in UNSUPPORTED:", ", ".join(undocumented))
    return 1 if undocumented else 0


if __name__ == "__main__":
    sys.exit(main())
