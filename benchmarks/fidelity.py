"""Fidelity per parameter on real pretrained models (issue 7), in one run.

For DINOv2 ViT-S/14, all-MiniLM-L6-v2 and SmolLM2-135M-Instruct, every method of
``fidelity_methods.METHODS`` (per-layer SVD, whitened low rank, Matrix PCA, the
paper's pipeline, our best, our best healed) compresses the q, k, v, o weights
at each budget (20%, 30%, 50%, 66.7% of them removed, at equal parameter
count), and the compressed model is scored against the original on held-out
data: feature cosine, embedding cosine and neighbours, perplexity.

Run: ``python benchmarks/fidelity.py`` (all models, about 20 minutes on two
CPU cores) writes docs/fidelity.md, docs/fidelity.json and docs/img/fidelity.png.
``--quick`` (small data, two budgets, MiniLM only unless ``--models`` says
otherwise) prints the tables and writes nothing unless ``--out`` is given.
``--models smollm2`` reruns one model and merges it into the stored results.

How a method plugs in: see ``fidelity_api`` (the signature) and
``fidelity_methods`` (the table of rows).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path

import torch
from fidelity_api import Budget, Method, attention_weights, unique_parameters
from fidelity_methods import METHODS, TARGETS
from fidelity_models import QUICK, SETUPS, ModelSetup, Sizes
from fidelity_report import model_tables, write_page, write_plot
from fidelity_results import Cell, ModelResult, load_results, save_results
from torch import nn

BUDGETS = (0.2, 0.3, 0.5, 2 / 3)
QUICK_BUDGETS = (0.3, 2 / 3)
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    methods = [m for m in METHODS if args.methods is None or m.key in args.methods]

    # One model at a time: set up, run every method at every budget, print
    results = {}
    for key in args.models:
        result = run_model(SETUPS[key], sizes, args.budgets, methods, args.quick)
        print(f"\n## {result.title}\n\n{model_tables(result, _targets(methods))}\n")
        results[key] = result

    # Write the page, the JSON and the plot (merged over stored results)
    if args.out is not None:
        _write(Path(args.out), results, methods)


def run_model(
    make_setup,
    sizes: Sizes,
    budgets: tuple[float, ...],
    methods: list[Method],
    quick: bool,
) -> ModelResult:
    """Every method at every budget on one model, in this process."""
    start = time.perf_counter()
    setup: ModelSetup = make_setup(sizes)
    setup_seconds = time.perf_counter() - start
    print(f"[{setup.key}] set up in {setup_seconds:.0f} s", flush=True)

    # The original's scores, and the statistics shared by the calibrated methods
    original = setup.evaluate(setup.model)
    setup.data.statistics()
    dense = attention_weights(setup.model, setup.data.targets)
    outside = unique_parameters(setup.model) - dense
    print(
        f"[{setup.key}] original {_format(original)}; statistics in "
        f"{setup.data.statistics_seconds:.1f} s",
        flush=True,
    )

    # Budget by budget, so that a row can start from another row's fit
    cells = []
    for compression in budgets:
        budget = Budget(compression, dense)
        fitted: dict[str, nn.Module | None] = {}
        for method in methods:
            cell, model = _run_cell(setup, method, budget, outside, fitted)
            fitted[method.key] = model if _needed(method.key, methods) else None
            cells.append(cell)
            print(
                f"[{setup.key}] {budget.label} {method.label}: {_line(cell)}",
                flush=True,
            )
        fitted.clear()

    return ModelResult(
        key=setup.key,
        title=setup.title,
        calibration=setup.data.description,
        evaluation=setup.evaluation,
        metrics=list(setup.metrics),
        original=original,
        dense_parameters=dense,
        budgets=list(budgets),
        methods=[_method_dict(m) for m in methods],
        cells=cells,
        statistics_seconds=setup.data.statistics_seconds,
        setup_seconds=setup_seconds,
        total_seconds=time.perf_counter() - start,
        run=_run_info(quick),
    )


def _run_cell(
    setup: ModelSetup,
    method: Method,
    budget: Budget,
    outside: int,
    fitted: dict[str, nn.Module | None],
) -> tuple[Cell, nn.Module | None]:
    """Fit one method at one budget on a fresh copy, then count and score it."""
    cell = Cell(method=method.key, budget=budget.compression, status="n/a")
    if method.fit is None:
        cell.note = "not provided yet"
        return cell, None
    base = setup.model if method.start_from is None else fitted.get(method.start_from)
    if base is None:
        cell.note = f"needs the fit of {method.start_from!r}, which has none"
        return cell, None

    # Fit, timed; NotImplementedError means "not available yet"
    model = copy.deepcopy(base)
    start = time.perf_counter()
    try:
        result = method.fit(model, budget, setup.data)
    except NotImplementedError as e:
        cell.note = str(e) or "not implemented"
        return cell, None
    except Exception as e:  # a failed method must not lose the other rows
        traceback.print_exc()
        cell.status, cell.note = "error", f"{type(e).__name__}: {e}"
        return cell, None
    seconds = time.perf_counter() - start

    # Count the parameters ourselves, then score on the held-out data
    parameters = unique_parameters(result.model) - outside
    cell.status = "ok"
    cell.parameters = parameters
    cell.compression = 1.0 - parameters / budget.dense_parameters
    cell.over_budget = parameters > budget.max_parameters
    cell.seconds = result.seconds if result.seconds is not None else seconds
    cell.info = dict(result.info)
    if result.parameters is not None and result.parameters != parameters:
        cell.info["own_count"] = result.parameters
    result.model.eval()
    cell.scores = setup.evaluate(result.model)
    return cell, result.model


def _needed(key: str, methods: list[Method]) -> bool:
    return any(m.start_from == key for m in methods)


def _targets(methods: list[Method]) -> tuple[str, ...]:
    keys = {m.key for m in methods}
    return tuple(t for t in TARGETS if t in keys)


def _method_dict(method: Method) -> dict:
    return {
        "key": method.key,
        "label": method.label,
        "start_from": method.start_from,
        "uses_statistics": method.uses_statistics,
    }


def _run_info(quick: bool) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "command": " ".join(["python", "benchmarks/fidelity.py", *sys.argv[1:]]),
    }


def _line(cell: Cell) -> str:
    if cell.status != "ok":
        return f"{cell.status} ({cell.note})"
    return (
        f"{_format(cell.scores)}, {cell.compression:.1%} removed "
        f"({cell.parameters:,} params), {cell.seconds:.1f} s"
        + (" OVER BUDGET" if cell.over_budget else "")
    )


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())


def _write(out: Path, results: dict[str, ModelResult], methods: list[Method]) -> None:
    json_path = out / "fidelity.json"
    save_results(json_path, results)
    stored = load_results(json_path)
    write_plot(out / "img" / "fidelity.png", stored)
    write_page(out / "fidelity.md", stored, _targets(methods), "img/fidelity.png")
    print(f"wrote {out / 'fidelity.md'}, {json_path}, {out / 'img' / 'fidelity.png'}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, 2 budgets")
    parser.add_argument("--models", help=f"comma-separated, of {','.join(SETUPS)}")
    parser.add_argument("--budgets", help="comma-separated compressions, e.g. 0.2,2/3")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, see docs)"
    )
    parser.add_argument("--methods", help="comma-separated method keys (default all)")
    parser.add_argument("--out", help="folder for fidelity.md/.json and img/")
    args = parser.parse_args(argv)

    # Defaults depend on --quick; check the names given
    default_models = "minilm" if args.quick else ",".join(SETUPS)
    args.models = (args.models or default_models).split(",")
    unknown = [m for m in args.models if m not in SETUPS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(SETUPS)}")
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    args.budgets = (
        tuple(float(Fraction(b)) for b in args.budgets.split(","))
        if args.budgets
        else budgets
    )
    if args.methods is not None:
        args.methods = args.methods.split(",")
    if args.out is None and not args.quick:
        args.out = str(ROOT / "docs")
    return args


if __name__ == "__main__":
    main()
